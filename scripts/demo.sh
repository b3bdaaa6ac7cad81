#!/usr/bin/env bash
# All set-up, then the main job: the projector between the frozen Whisper tiny.en encoder and
# the frozen SmolLM2-135M-Instruct LLM is trained (CPU) to say which instrument family plays
# a note and in which register, on real recordings (the FluidR3 General MIDI SoundFont,
# fetched by the set-up), then the held-out presets (never heard in training) are captioned
# and scored: attribute accuracy, caption metrics, the listening check (silence, shuffled
# audio) and an HTML report in the run folder. About 12 minutes on 2 cores after the build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
config=configs/cpu-smollm2-soundfont.toml
run_dir=runs/cpu-smollm2-soundfont
./target/release/earshot train "$config" --overwrite
./target/release/earshot eval --config "$config" --checkpoint "$run_dir/projector.safetensors" \
  --json > "$run_dir/eval.json"
python3 - "$run_dir" <<'PY'
import json, sys
run = sys.argv[1]
r = json.load(open(f"{run}/eval.json"))
c = r["listening_check"]
print(f"held-out presets: {r['examples']} notes ({r['failed']} failed)")
for name, a in r["attributes"].items():
    sil = c["silence"]["attributes"][name]["accuracy"]
    shu = c["shuffled"]["attributes"][name]["accuracy"]
    chance = 1 / len(a["confusion"]) if a["confusion"] else 0
    print(f"  {name:<9} accuracy {a['accuracy']:.3f}   silence {sil:.3f}   shuffled {shu:.3f}   (chance ~{chance:.3f})")
print(f"  eval loss {c['real_loss']:.3f} real, {c['silence_loss']:.3f} silence, {c['shuffled_loss']:.3f} shuffled")
print(f"listening check: {c['primary']} {c['real_score']:.3f} real vs {c['silence_score']:.3f} silence, "
      f"{c['shuffled_score']:.3f} shuffled: " + ("the model uses the audio" if c["clearly_better"] else "WARNING: not clearly better"))
print(f"report: {run}/report.html   scores: {run}/eval.json")
PY
