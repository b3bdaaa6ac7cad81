#!/usr/bin/env bash
# A training epoch served from the encoder cache vs a cold one, side by side in one run:
# `earshot train` on the bundled tones (8 clips, batch 4: 2 steps = 1 epoch) under a fresh
# EARSHOT_HOME, then the same again. Prints wall time, the time inside the encode spans
# (decode + mel + encoder per clip, from RUST_LOG=earshot=debug), and how many windows went
# through the mel and the encoder each time.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
models=${EARSHOT_HOME:-$HOME/.cache/earshot}/models
export RAYON_NUM_THREADS=2
# The features set-up builds with, so the binary stays the one the suite runs.
source scripts/features.sh
cargo build --release --quiet -p earshot "${earshot_features[@]}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/home"
ln -s "$models" "$tmp/home/models"
run() {
  local name=$1
  local start end
  start=$(date +%s.%N)
  EARSHOT_HOME="$tmp/home" RUST_LOG=earshot=debug target/release/earshot train \
    configs/cpu-smollm2-tones.toml --overwrite \
    --set "train.run-dir=\"$tmp/run\"" --set train.steps=2 2> "$tmp/$name.log" > /dev/null
  end=$(date +%s.%N)
  python3 - "$name" "$start" "$end" "$tmp/$name.log" <<'PY'
import re, sys
name, start, end, log = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
text = open(log).read()
def unit(v, u):
    return float(v) * {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}[u]
def spans(name):
    return [unit(m.group(1), m.group(2)) for m in re.finditer(
        re.escape(name) + r"\{[^}]*\}: close time\.busy=([0-9.]+)(ns|µs|us|ms|s)", text)]
enc, mel, fwd = spans("encode"), spans("mel"), spans("encoder forward")
steps = spans("train step")
print(f"{name:5}: wall {float(end) - float(start):6.2f} s | encode {sum(enc):6.3f} s over "
      f"{len(enc)} clips | mel windows {len(mel)}, encoder runs {len(fwd)} | "
      f"2 train steps {sum(steps):6.2f} s")
PY
}
run cold
run warm
