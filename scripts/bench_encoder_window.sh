#!/usr/bin/env bash
# Encoder cost per clip, full 30 s windows vs clip-length windows (`[mel] window`), side by
# side in one run, on real recordings: the main job's config (FluidR3 GM notes, 1-4 s each),
# its train split cut to 4 recordings per family (32 clips), one training step, each way
# under a fresh EARSHOT_HOME (nothing from the cache). Prints the time inside the `mel` and
# `encoder forward` spans (RUST_LOG=earshot=debug) per clip, and the ratio.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
home=${EARSHOT_HOME:-$HOME/.cache/earshot}
export RAYON_NUM_THREADS=2
# The features set-up builds with, so the binary stays the one the suite runs.
source scripts/features.sh
cargo build --release --quiet -p earshot "${earshot_features[@]}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
run() {
  local window=$1
  rm -rf "$tmp/home" && mkdir -p "$tmp/home"
  ln -s "$home/models" "$tmp/home/models"
  ln -s "$home/data" "$tmp/home/data"
  EARSHOT_HOME="$tmp/home" RUST_LOG=earshot=debug target/release/earshot train \
    configs/cpu-smollm2-soundfont.toml --overwrite \
    --set "train.run-dir=\"$tmp/run\"" --set train.steps=1 --set train.eval-every=0 \
    --set "mel.window=\"$window\"" --set 'data.eval-split="train"' \
    --set 'data.options="{\"file\": \"fluid-soundfont-gm/FluidR3_GM.sf2\", \"max_per_family\": 4}"' \
    2> "$tmp/$window.log" > /dev/null
}
run full
run clip
python3 - "$tmp/full.log" "$tmp/clip.log" <<'PY'
import re, sys
def unit(v, u):
    return float(v) * {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}[u]
def spans(text, name):
    return [unit(m.group(1), m.group(2)) for m in re.finditer(
        re.escape(name) + r"\{[^}]*\}: close time\.busy=([0-9.]+)(ns|µs|us|ms|s)", text)]
per_clip = {}
for label, path in zip(["full 30 s", "clip-length"], sys.argv[1:]):
    text = open(path).read()
    mel, fwd = spans(text, "mel"), spans(text, "encoder forward")
    n = len(fwd)
    per_clip[label] = (sum(mel) + sum(fwd)) / n
    print(f"{label:11}: {n} clips | mel {sum(mel) / n * 1e3:7.2f} ms/clip | encoder "
          f"{sum(fwd) / n * 1e3:7.2f} ms/clip | together {per_clip[label] * 1e3:7.2f} ms/clip")
print(f"clip-length / full: {per_clip['clip-length'] / per_clip['full 30 s']:.3f}")
PY
