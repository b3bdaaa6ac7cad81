#!/usr/bin/env bash
# Data-parallel training (issue #28) on this machine: the same run (the tones config, a
# global batch of 8, 20 steps) on 1 rank with 2 threads and on 2 ranks with 1 thread each
# under mpirun; prints the mean seconds per step (steps 2-20) of each and their ratio, and
# the all-reduce size per step (the trainable set's f32 gradients). Then the sharded
# commands, each 1 process x 2 threads against 2 ranks x 1 thread: `cache fill` of the
# English transcription config's splits into an empty cache, and `eval` of its test split
# (captions from the filled cache, no listening check), with a check that both evals
# printed the same scores.
# Needs the mpi build (scripts/setup.sh makes it where it can install Open MPI).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
earshot=$root/target/release/earshot
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
args=(train configs/cpu-smollm2-tones.toml --set train.steps=20 --set train.batch-size=8
      --set train.checkpoint-every=0)
mean_step() {
  python3 - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
per = [8 / r["examples_per_s"] for r in rows if r["step"] > 1]
print(f"{sum(per) / len(per):.3f}")
PY
}
RAYON_NUM_THREADS=2 "$earshot" "${args[@]}" --set "train.run-dir=\"$work/one\"" >/dev/null 2>&1
mpirun --allow-run-as-root --oversubscribe -np 2 -x RAYON_NUM_THREADS=1 \
  "$earshot" "${args[@]}" --set "train.run-dir=\"$work/two\"" >/dev/null 2>&1
one=$(mean_step "$work/one")
two=$(mean_step "$work/two")
floats=$(python3 - "$work/one/projector.safetensors" <<'PY'
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
total = 0
for name, t in header.items():
    if name == "__metadata__":
        continue
    count = 1
    for d in t["shape"]:
        count *= d
    total += count
print(total)
PY
)
echo "commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%d), $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
echo "1 rank x 2 threads: $one s/step; 2 ranks x 1 thread: $two s/step; ratio $(python3 -c "print(f'{$one / $two:.2f}')")x"
echo "all-reduce per step: $floats floats ($(python3 -c "print(f'{$floats * 4 / 1e6:.2f}')") MB)"

# Sharded cache fill and eval on the English speech config (its three splits).
speech=configs/cpu-smollm2-transcribe-en.toml
fresh() {
  mkdir -p "$1"
  ln -s "${EARSHOT_HOME:-$HOME/.cache/earshot}/models" "$1/models"
  ln -s "${EARSHOT_HOME:-$HOME/.cache/earshot}/data" "$1/data"
}
fresh "$work/home-one"
fresh "$work/home-two"
seconds() { python3 -c "import time; print(time.time())"; }
t0=$(seconds)
EARSHOT_HOME=$work/home-one RAYON_NUM_THREADS=2 "$earshot" cache fill "$speech" >"$work/fill-one" 2>/dev/null
t1=$(seconds)
EARSHOT_HOME=$work/home-two mpirun --allow-run-as-root --oversubscribe -np 2 \
  -x EARSHOT_HOME -x RAYON_NUM_THREADS=1 "$earshot" cache fill "$speech" >"$work/fill-two" 2>/dev/null
t2=$(seconds)
eval_args=(eval --config "$speech" --max-tokens 32 --no-listening-check --no-report --brief)
EARSHOT_HOME=$work/home-one RAYON_NUM_THREADS=2 "$earshot" "${eval_args[@]}" >"$work/eval-one" 2>/dev/null
t3=$(seconds)
EARSHOT_HOME=$work/home-two mpirun --allow-run-as-root --oversubscribe -np 2 \
  -x EARSHOT_HOME -x RAYON_NUM_THREADS=1 "$earshot" "${eval_args[@]}" >"$work/eval-two" 2>/dev/null
t4=$(seconds)
cmp -s "$work/eval-one" "$work/eval-two" || { echo "the sharded eval printed other scores" >&2; exit 1; }
python3 - "$t0" "$t1" "$t2" "$t3" "$t4" <<'PY'
import sys
t = [float(x) for x in sys.argv[1:]]
fill1, fill2, eval1, eval2 = t[1] - t[0], t[2] - t[1], t[3] - t[2], t[4] - t[3]
print(f"cache fill (English speech, 3 splits): 1 x 2 threads {fill1:.1f} s; "
      f"2 ranks x 1 thread {fill2:.1f} s; ratio {fill1 / fill2:.2f}x")
print(f"eval (its test split, from the cache): 1 x 2 threads {eval1:.1f} s; "
      f"2 ranks x 1 thread {eval2:.1f} s; ratio {eval1 / eval2:.2f}x (same scores)")
PY
head -1 "$work/fill-one"
