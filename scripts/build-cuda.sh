#!/usr/bin/env bash
# Builds `earshot --features cuda` on this CPU machine: no GPU, no system CUDA, no nvidia-smi.
#   1. nvcc, the CUDA headers and libraries from NVIDIA's PyPI wheels (CUDA 13.0: candle's
#      kernels are loaded as PTX that the driver JIT-compiles, and nvcc 13.0's PTX (.version
#      9.0) loads on any CUDA 13 driver >= 580; cudarc 0.19 knows CUDA <= 13.4), laid out like
#      a toolkit in $EARSHOT_HOME/tools/cuda-13.0 (pip download --no-deps, checked against
#      scripts/cuda-wheels.sha256);
#   2. a link stub for libcuda.so (no wheel ships one; cudarc links -lcuda). At run time the
#      real driver's libcuda.so.1 is loaded; where there is none the binary does not start;
#      with a driver but no usable GPU it warns and runs on the CPU;
#   3. CUDA_COMPUTE_CAP (default 90: H200, sm_90) set explicitly, so nothing probes a GPU;
#   4. cargo build --release --features cuda into its own target folder (target/cuda), then
#      target/cuda/earshot-cuda (stripped) and earshot-cuda.xz (~13 MB: what a GPU machine
#      is sent; see scripts/device-check.sh);
#   5. a smoke test here: the binary runs `selftest --shape tiny` on the CPU through the stub.
# With EARSHOT_CUDA_TOOLKIT=/usr/local/cuda-12.x (any installed toolkit: bin/nvcc and
# lib64/stubs/libcuda.so, as NVIDIA's installers lay it out) steps 1-2 are skipped and the
# binary is built against that toolkit's libraries: the way to a CUDA 12 binary, since candle
# links cuBLAS/cudart by soname (a CUDA 13 build needs libcublas.so.13) and NVIDIA's CUDA 12
# nvcc wheels ship ptxas but no nvcc.
# On the GPU machine the binary finds libcudart/libcublas/libcurand (CUDA 13) through
# LD_LIBRARY_PATH (scripts/device-check.sh sets it to /usr/local/cuda/lib64 and the usual
# system folders). Cold, from a clean clone with an empty $EARSHOT_HOME: ~31 minutes on 2
# cores (BENCHMARKS.md); an incremental rebuild ~2 minutes.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
home=${EARSHOT_HOME:-$HOME/.cache/earshot}
tk=${EARSHOT_CUDA_TOOLKIT:-$home/tools/cuda-13.0}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
log() { echo "[build-cuda] $*" >&2; }
if [ -n "${EARSHOT_CUDA_TOOLKIT:-}" ]; then
  for need in bin/nvcc lib64/stubs/libcuda.so; do
    [ -e "$tk/$need" ] || { log "EARSHOT_CUDA_TOOLKIT=$tk has no $need: expected an installed CUDA toolkit (bin/nvcc, lib64/stubs/libcuda.so)"; exit 1; }
  done
  log "using the toolkit in $tk ($("$tk/bin/nvcc" --version | grep -o 'release [0-9.]*'))"
fi

wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35 nvidia-cuda-cccl==13.0.85)

if [ ! -x "$tk/bin/nvcc" ]; then
  log "fetching the CUDA 13.0 toolkit wheels (~650 MB) into $tk"
  mkdir -p "$home/tools"
  stage=$(mktemp -d "$home/tools/.stage-cuda.XXXXXX")
  trap 'rm -rf "$stage"' EXIT
  mkdir -p "$stage/wheels" "$stage/unpacked"
  for spec in "${wheels[@]}"; do
    python3 -m pip download --no-deps --quiet -d "$stage/wheels" "$spec" >&2
  done
  (cd "$stage/wheels" && sha256sum --quiet --strict -c "$root/scripts/cuda-wheels.sha256") || {
    log "the downloaded wheels do not match scripts/cuda-wheels.sha256"
    exit 1
  }
  for w in "$stage"/wheels/*.whl; do unzip -q -o "$w" -d "$stage/unpacked"; done
  mv "$stage/unpacked/nvidia/cu13" "$stage/cuda"
  chmod +x "$stage"/cuda/bin/* "$stage"/cuda/nvvm/bin/*
  ln -s lib "$stage/cuda/lib64"
  (cd "$stage/cuda/lib" && for f in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 \
    libcurand.so.10 libnvrtc.so.13; do ln -sf "$f" "${f%%.so*}.so"; done)
  rm -rf "$tk" && mkdir -p "$(dirname "$tk")" && mv "$stage/cuda" "$tk"
  rm -rf "$stage"
  trap - EXIT
fi

export CUDA_ROOT=$tk CUDA_HOME=$tk PATH=$tk/bin:$PATH
# Its own target folder per toolkit: the kernels' PTX and cudarc's bindings follow the nvcc
# and the libraries they were built with.
out=target/cuda
[ -z "${EARSHOT_CUDA_TOOLKIT:-}" ] || out=target/cuda-$(basename "$(cd "$tk" && pwd -P)")
export CARGO_TARGET_DIR=$root/$out
cd "$root"
cargo fetch --quiet
# The libcuda.so stub: every driver entry point cudarc declares, each answering
# CUDA_ERROR_STUB_LIBRARY (34).
cudarc_version=$(awk '/^name = "cudarc"/{getline; gsub(/"/, "", $3); print $3}' Cargo.lock)
cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"$cudarc_version" | head -1)
if [ ! -f "$tk/lib64/stubs/libcuda.so" ]; then
  log "building the libcuda.so link stub from cudarc $cudarc_version's driver bindings"
  mkdir -p "$tk/lib64/stubs"
  grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$cudarc_src/src/driver/sys/mod.rs" | awk '{print $4}' \
    | sort -u | sed 's/.*/int &(void) { return 34; }/' > "$tk/lib64/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tk/lib64/stubs/libcuda.so" "$tk/lib64/stubs/libcuda_stub.c"
fi

log "cargo build --release -p earshot --features cuda (sm_$CUDA_COMPUTE_CAP) into $out"
cargo build --release --quiet -p earshot --features cuda
strip -o "$out/earshot-cuda" "$out/release/earshot"
xz -T2 -6 -f -k "$out/earshot-cuda"
log "built $out/earshot-cuda ($(du -h "$out/earshot-cuda" | cut -f1)), earshot-cuda.xz ($(du -h "$out/earshot-cuda.xz" | cut -f1))"

# Smoke test: no GPU here; the stub stands in for the driver, so CUDA is refused cleanly and
# the CPU path of this binary passes its self-test.
stub=$(mktemp -d)
ln -sf "$tk/lib64/stubs/libcuda.so" "$stub/libcuda.so.1"
export LD_LIBRARY_PATH=$tk/lib64:$stub
if "$out/earshot-cuda" selftest --device cuda >/dev/null 2>"$stub/err"; then
  log "unexpected: --device cuda succeeded on a machine without a GPU"; exit 1
fi
grep -q "no CUDA device (this binary was built with the cuda feature)" "$stub/err" || {
  cat "$stub/err" >&2; log "unexpected error for --device cuda"; exit 1; }
"$out/earshot-cuda" selftest --shape tiny >&2
rm -rf "$stub"
log "ok: the CUDA build runs (CPU path checked here; the GPU run is scripts/device-check.sh)"
