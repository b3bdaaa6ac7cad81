#!/usr/bin/env bash
# All set-up, then the main job on the embedded default: a short CPU training run of the
# projector (Whisper tiny.en + SmolLM2-135M-Instruct, both frozen) on the bundled clips in
# configs/data/tones, then captioning of those clips, each caption printed beside its
# target. About a minute on 2 cores after the build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup.sh"
cd "$root"
config=configs/cpu-smollm2-tones.toml
run_dir=runs/cpu-smollm2-tones
./target/release/earshot train "$config" --overwrite
./target/release/earshot caption --config "$config" --checkpoint "$run_dir/projector.safetensors" \
  --split train > "$run_dir/captions.jsonl"
python3 - "$run_dir/captions.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ok = sum(r.get("caption") == (r.get("references") or [None])[0] for r in rows)
for r in rows:
    print(f"{r['id']:>6}  caption: {r.get('caption', r.get('error'))!r:34}  target: {(r.get('references') or [''])[0]!r}")
print(f"{ok}/{len(rows)} captions equal their targets")
PY
