#!/usr/bin/env bash
# What a GPU machine runs, in one command of at most ~8 minutes: the CUDA self-test at both
# shapes, each printed as a table (bf16 errors vs CPU f32 on the same random weights,
# gradient vs finite difference, loss falling, KV-cache decoding vs recompute, step time,
# decode tokens/s, peak host memory, and the device memory of a training step: the memory
# pool's high-water mark, weights included). Nothing is downloaded: the models are random at
# named shapes. Each phase is logged on stderr with its time, so a timeout shows where.
#
# Bring along (the device tool's 64 MiB limit): this script and target/cuda/earshot-cuda.xz
# (~13 MB, from scripts/build-cuda.sh; the unstripped binary is ~100 MB). Nothing else: the
# CUDA libraries of the binary's major version (13 for the wheel build) come from the machine
# (/usr/local/cuda/lib64, the system folders, or Python's nvidia wheels where the toolkit has
# no cuBLAS).
#   bash scripts/device-check.sh [BINARY.xz]
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
packed=${1:-$root/target/cuda/earshot-cuda.xz}
work=$(mktemp -d)
# xz, or Python's lzma where the machine has no xz.
{ xz -dc "$packed" 2>/dev/null || python3 -c 'import lzma, shutil, sys
shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' "$packed"; } > "$work/earshot-cuda" &&
  chmod +x "$work/earshot-cuda" || { echo "device-check: cannot unpack $packed" >&2; exit 1; }
add_libs() { [ -d "$1" ] && LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$1; return 0; }
# The driver's folder (libcuda.so.1) where it is mounted rather than registered, then the
# toolkit's libraries.
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64 \
  /usr/local/cuda-13/lib64 /usr/local/cuda-12/lib64 /usr/lib/x86_64-linux-gnu; do
  add_libs "$d"
done
export LD_LIBRARY_PATH
# A toolkit with no cuBLAS/cuRAND (nvcc only): the libraries a Python CUDA stack installs as
# wheels (site-packages/nvidia/cu13/lib for CUDA 13, e.g. PyTorch's cu130 build;
# nvidia/cublas/lib and the like for CUDA 12).
if ldd "$work/earshot-cuda" | grep -q "not found" && command -v python3 >/dev/null; then
  for d in $(python3 -c 'import glob, site
for p in site.getsitepackages(): print("\n".join(sorted(glob.glob(p + "/nvidia/*/lib"))))' 2>/dev/null); do
    add_libs "$d"
  done
fi
echo "device-check: LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2
export RUST_LOG=${RUST_LOG:-earshot=info}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
missing=$(ldd "$work/earshot-cuda" | grep "not found")
[ -z "$missing" ] || { echo "device-check: missing libraries:" >&2; echo "$missing" >&2; exit 1; }
ldd "$work/earshot-cuda" | grep -E "libcuda|libcublas|libcudart|libcurand" >&2
status=0
# tiny: seconds. seed: ~32 GB of random f32 weights made on the host (~20 s on 16 cores), a
# CPU f32 reference of both forwards and an f64 gradient check (~1-2 minutes), then bf16 on
# the GPU; the training step is the write-up's setup at batch 1 (400 positions), so its peak
# is the figure for a 24 GB card. On this 2-core CPU machine the seed shape cut to 2 LLM
# layers took 5 min 20 s (`earshot selftest --shape seed --llm-layers 2`).
timeout 120 "$work/earshot-cuda" selftest --shape tiny --device cuda || status=1
timeout 330 "$work/earshot-cuda" selftest --shape seed --device cuda || status=1
echo "device-check: $([ $status = 0 ] && echo 'all checks passed' || echo 'FAILED')"
exit $status
