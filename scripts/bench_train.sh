#!/usr/bin/env bash
# Training benchmarks, one run on this machine (2 threads):
#   - one training step of the default models at batch 4 with 25 prompt + 64 audio + 5 suffix
#     + 20 target positions through the training code's loss: time, examples/s and peak RSS,
#     each variant in its own process: as `earshot train` runs it (the prompt text before the
#     audio computed once), the same recomputing that prompt every step, and the baseline
#     (candle's stock matmul and composed ops, prompt recomputed); and the first once more
#     with candle's elementwise worker pool (what `earshot train` turns off);
#   - the encoder cache: `earshot train --max-steps 1` on the bundled clips with an empty
#     encoder cache (every clip encoded) and again with it filled (no clip encoded).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export RAYON_NUM_THREADS=2
models=${EARSHOT_HOME:-$HOME/.cache/earshot}/models
gguf=$models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
cargo build --release --quiet -p earshot --example bench_models
bench=target/release/examples/bench_models
prefix=$("$bench" train-step "$gguf" prefix 7)
full=$("$bench" train-step "$gguf" full 7)
stock=$("$bench" train-step "$gguf" stock 5)
pool=$(CANDLE_NUM_THREADS=$RAYON_NUM_THREADS "$bench" train-step "$gguf" prefix 7)
echo "$prefix"; echo "$full"; echo "$stock"; echo "$pool"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A private EARSHOT_HOME whose models are the real ones, so the encoder cache starts empty.
mkdir -p "$work/home"
ln -s "$models" "$work/home/models"
run() {
  local start end
  start=$(date +%s.%N)
  EARSHOT_HOME="$work/home" ./target/release/earshot train configs/cpu-smollm2-tones.toml --max-steps 1 \
    --overwrite --set "train.run-dir=\"$work/run\"" > /dev/null 2> "$work/log"
  end=$(date +%s.%N)
  grep -o "encoder: .*" "$work/log" >&2
  echo "$end - $start" | bc
}
cold=$(run)
warm=$(run)
python3 - "$prefix" "$full" "$stock" "$pool" "$cold" "$warm" <<'PY'
import sys, json
px, fu, st, po = (json.loads(a) for a in sys.argv[1:5])
cold, warm = float(sys.argv[5]), float(sys.argv[6])
print(f"train step B=4 (25+64+5+20), as earshot train runs it: {px['median_s']:.2f} s (min {px['min_s']:.2f}, {4/px['median_s']:.2f} ex/s), peak RSS {px['peak_rss_mb']:.0f} MB")
print(f"  prompt recomputed every step: {fu['median_s']:.2f} s (min {fu['min_s']:.2f}), peak RSS {fu['peak_rss_mb']:.0f} MB")
print(f"  with candle's elementwise worker pool: {po['median_s']:.2f} s (min {po['min_s']:.2f})")
print(f"  stock baseline (candle matmul + composed ops): {st['median_s']:.2f} s, peak RSS {st['peak_rss_mb']:.0f} MB -> time x{st['median_s']/px['median_s']:.2f}, memory x{st['peak_rss_mb']/px['peak_rss_mb']:.2f}")
print(f"earshot train --max-steps 1 on 8 clips: empty encoder cache {cold:.1f} s, filled cache {warm:.1f} s (x{cold/warm:.2f})")
PY
