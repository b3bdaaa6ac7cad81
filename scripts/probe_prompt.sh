#!/usr/bin/env bash
# Asks a trained checkpoint a question none of its tasks was trained on, over held-out clips
# of two kinds and over silence, and counts which kind each answer names. The seed hoped
# that a model taught several audio tasks would answer such prompts; this measures whether
# it does.
#
#   bash scripts/probe_prompt.sh CHECKPOINT ["question"]
#   (default question: "Is this speech or music?"; CHECKPOINT: a best/ folder or
#   projector.safetensors of a run of configs/cpu-smollm2-multitask.toml, e.g.
#   runs/bench/multitask-s0/best)
#
# Music: the instrument task's test split (191 FluidR3 notes, presets no training heard);
# speech: the speaker-traits task's test split (360 Tux Paint recordings); silence: 5 s of
# zeros, once. Each split is captioned through its own single-task config with the prompt
# options replaced by the question (same template, models and projector shape as the
# multi-task run, so the checkpoint's manifest matches). An answer "says music" when it
# contains music/musical/instrument/note/melody/song, "says speech" when it contains
# speech/speak/spoken/voice/talk/word; both, or neither, are counted apart.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
checkpoint=${1:?usage: probe_prompt.sh CHECKPOINT [QUESTION]}
question=${2:-Is this speech or music?}
earshot=./target/release/earshot
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The options string (JSON) as a TOML basic string for --set (a JSON string literal is one).
options=$(python3 -c 'import json, sys; print(json.dumps(json.dumps({"instruction": sys.argv[1]})))' "$question")
caption() { # config, then caption's own arguments
  local config=$1
  shift
  "$earshot" caption --config "$config" --checkpoint "$checkpoint" \
    --set "plugins.prompt-options=$options" \
    --set projector.positions=16 --max-tokens 16 --jsonl "$@"
}
caption configs/cpu-smollm2-soundfont.toml --split test > "$out/music.jsonl"
caption configs/cpu-smollm2-speaker-traits.toml --split test > "$out/speech.jsonl"
python3 - "$out/silence.wav" <<'PY'
import sys, wave
with wave.open(sys.argv[1], "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
    w.writeframes(b"\0\0" * 16000 * 5)
PY
caption configs/cpu-smollm2-soundfont.toml "$out/silence.wav" > "$out/silence.jsonl"
echo "commit $(git rev-parse --short HEAD), checkpoint $checkpoint, question: $question"
python3 - "$out" <<'PY'
import json, re, sys, os
music_words = re.compile(r"\b(music|musical|instrument\w*|note|notes|melody|song)\b", re.I)
speech_words = re.compile(r"\b(speech|speak\w*|spoken|voice\w*|talk\w*|word\w*)\b", re.I)
def kind(text):
    m, s = bool(music_words.search(text)), bool(speech_words.search(text))
    return "both" if m and s else "music" if m else "speech" if s else "neither"
print("| clips | n | says music | says speech | both | neither | most common answer |")
print("|---|---|---|---|---|---|---|")
for name in ("music", "speech", "silence"):
    lines = [json.loads(l) for l in open(os.path.join(sys.argv[1], name + ".jsonl"))]
    captions = [l["caption"] for l in lines if "caption" in l]
    counts = {k: 0 for k in ("music", "speech", "both", "neither")}
    for c in captions:
        counts[kind(c)] += 1
    n = len(captions)
    common = max(set(captions), key=captions.count) if captions else ""
    share = lambda k: f"{counts[k] / n:.3f}" if n else "-"
    print(f"| {name} | {n} | {share('music')} | {share('speech')} | {share('both')} | {share('neither')} | {common!r} ({captions.count(common)}) |")
PY
