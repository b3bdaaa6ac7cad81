#!/usr/bin/env bash
# Long-prompt prefill (issue #27, item 7), one run on this machine (2 threads): SmolLM2-135M
# (Q4_1 GGUF) appends a prompt of 2,000 / 8,000 tokens to its KV cache in one piece (as
# before chunked prefill) and in chunks of 512 positions (what earshot does now), each in its
# own process; prints the time, the peak memory over the loaded model, and the ratios.
# Usage: bash scripts/bench_prefill.sh [TOKENS...]   (default: 2000 8000)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
models=${EARSHOT_HOME:-$HOME/.cache/earshot}/models
export RAYON_NUM_THREADS=2
cargo build --release --quiet -p earshot-tests --example bench_prefill
gguf=$models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(2000 8000)
lines=""
for n in "${sizes[@]}"; do
  for chunk in 0 512; do
    lines+="$(target/release/examples/bench_prefill "$gguf" "$n" "$chunk")"$'\n'
  done
done
python3 - "$lines" <<'PY'
import json, sys
rows = [json.loads(l) for l in sys.argv[1].splitlines() if l.strip()]
print(f"{'tokens':>7} {'prefill':>10} {'seconds':>8} {'peak MiB over model':>20}")
for r in rows:
    how = "one piece" if r["chunk"] == 0 else f"chunks {r['chunk']}"
    print(f"{r['tokens']:>7} {how:>10} {r['seconds']:>8.1f} {r['peak_over_model_mib']:>20.0f}")
for n in sorted({r["tokens"] for r in rows}):
    whole = next(r for r in rows if r["tokens"] == n and r["chunk"] == 0)
    chunked = next(r for r in rows if r["tokens"] == n and r["chunk"] != 0)
    print(f"{n} tokens: chunked takes {chunked['seconds'] / whole['seconds']:.2f}x the time and "
          f"{chunked['peak_over_model_mib'] / max(whole['peak_over_model_mib'], 1):.2f}x the memory of one piece")
PY
