#!/usr/bin/env bash
# Frozen-model benchmarks, side by side in one run on this machine (2 threads everywhere):
#   - Whisper tiny.en encoder, one 30 s window, f32: earshot vs CTranslate2 (faster-whisper's
#     WhisperModel, float32);
#   - SmolLM2-135M: prompt throughput (256-token prompt) and greedy decode tokens/s (128
#     tokens) vs llama.cpp (llama-cpp-python), decoding from the GGUF blocks and (A/B) from
#     the dequantized f32 matrices;
#   - a training-style forward+backward (B=4, 25+64+5+20 positions, loss on 20 targets) with
#     the frozen-weight gradient fix and with candle's stock matmul: time and peak RSS; and
#     the same step built from the code before issue #31 (EARSHOT_BENCH_BASELINE, a commit
#     or none), alternating with this build's.
# References live in a throwaway venv (target/bench-venv); llama-cpp-python builds from
# source there on first use (~5-10 minutes on 2 cores).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=target/bench-venv
models=${EARSHOT_HOME:-$HOME/.cache/earshot}/models
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -c "import faster_whisper" 2>/dev/null || "$venv/bin/pip" install -q faster-whisper==1.2.1
# llama.cpp is built for the instruction sets this CPU advertises, named one by one:
# GGML_NATIVE=ON also turns on AMX where the CPU advertises it, and a VM that does not allow
# AMX then dies with SIGILL (exit 132), as on the Intel Xeon machines of this kind.
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]]; }
ggml="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
for f in avx:AVX avx2:AVX2 fma:FMA f16c:F16C avx512f:AVX512 avx512_vnni:AVX512_VNNI \
  avx512_bf16:AVX512_BF16 avx512vbmi:AVX512_VBMI avx_vnni:AVX_VNNI; do
  if has "${f%%:*}"; then ggml+=" -DGGML_${f#*:}=ON"; else ggml+=" -DGGML_${f#*:}=OFF"; fi
done
llama_version=0.3.16
if ! "$venv/bin/python" -c "import llama_cpp" 2>/dev/null \
  || [ "$(cat "$venv/llama-cmake-args" 2>/dev/null)" != "$llama_version $ggml" ]; then
  # Its dependencies first; then the package itself rebuilt from source (no cached wheel).
  "$venv/bin/pip" install -q numpy diskcache jinja2 typing-extensions
  CMAKE_ARGS="$ggml" "$venv/bin/pip" install -q --force-reinstall --no-deps --no-cache-dir \
    "llama-cpp-python==$llama_version"
  echo "$llama_version $ggml" > "$venv/llama-cmake-args"
fi
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
# `if`, not `has && printf`: on a CPU without the last set the loop's status would be 1 and
# `set -e` would end the script here without a word (it did on an AVX2-only AMD EPYC).
simd_sets=$(for f in avx2 fma f16c avx512f avx512bw avx512dq avx512vl avx512_vnni avx512_bf16 amx_tile; do
  if has "$f"; then printf '%s ' "$f"; fi; done)
echo "CPU: $cpu, $(nproc) cores; advertises: $simd_sets"
echo "llama.cpp (llama-cpp-python $llama_version) built with: $ggml"
# The training step of the code before issue #31 (its last commit before gemm's AVX-512
# kernels), built once into target/bench-baseline and run beside this build's, so that "no
# slower than before" is measured in the same run. EARSHOT_BENCH_BASELINE=<commit> picks
# another build, =none skips it. Built first: the build shares target/ and its examples/
# copy, which the current build below then replaces.
baseline_commit=${EARSHOT_BENCH_BASELINE:-6a78fdc}
baseline_bench=""
if [ "$baseline_commit" != none ]; then
  baseline_bench=target/bench-baseline/bench_models-$baseline_commit
  if [ ! -x "$baseline_bench" ]; then
    mkdir -p target/bench-baseline
    src=target/bench-baseline/src
    git worktree remove --force "$src" 2>/dev/null || rm -rf "$src"
    git worktree add --detach --quiet "$src" "$baseline_commit"
    (cd "$src" && CARGO_TARGET_DIR="$root/target" cargo build --release --quiet -p earshot --example bench_models)
    cp target/release/examples/bench_models "$baseline_bench"
    git worktree remove --force "$src"
  fi
fi
cargo build --release --quiet -p earshot --example bench_models
bench=target/release/examples/bench_models
mel=../shared/oracle/whisper-tiny-en/expected/a_speech_mel_pad30s.npy
gguf=$models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf

ours_enc=$("$bench" encoder "$models/whisper-tiny.en" "$mel" 5)
# A/B in the same run: earshot's own kernels (softmax, GELU, the packed decode products)
# capped at AVX2 with EARSHOT_SIMD; gemm's matrix products choose for themselves either way.
ours_enc_avx2=$(EARSHOT_SIMD=avx2 "$bench" encoder "$models/whisper-tiny.en" "$mel" 5)
ref_enc=$("$venv/bin/python" - "$models/whisper-tiny.en-ct2" "$mel" <<'PY'
import sys, time, json, statistics, numpy as np, ctranslate2
from faster_whisper import WhisperModel
m = WhisperModel(sys.argv[1], device="cpu", compute_type="float32", cpu_threads=2)
mel = np.load(sys.argv[2])[None].astype(np.float32)
x = ctranslate2.StorageView.from_array(np.ascontiguousarray(mel))
m.model.encode(x, to_cpu=True)
ts = []
for _ in range(5):
    t = time.perf_counter(); m.model.encode(x, to_cpu=True); ts.append(time.perf_counter() - t)
print(json.dumps({"what": "ctranslate2 encoder", "median_s": statistics.median(ts)}))
PY
)
echo "$ours_enc"; echo "$ours_enc_avx2"; echo "$ref_enc"

ours_llm=$("$bench" llm "$gguf" 256 128)
ours_llm_avx2=$(EARSHOT_SIMD=avx2 "$bench" llm "$gguf" 256 128)
# A/B: decoding from the dequantized f32 matrices instead of the GGUF blocks.
ours_f32=$("$bench" llm "$gguf" 256 128 dequantized)
ref_llm=$("$venv/bin/python" - "$gguf" <<'PY'
import sys, time, json, statistics
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=2, n_threads_batch=2, n_ctx=512, n_batch=512, verbose=False)
prompt = [100 + (i * 37) % 40000 for i in range(256)]
def run():
    llm.reset()
    t0 = time.perf_counter(); llm.eval(prompt); p = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(128):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        llm.eval([tok])
    return p, time.perf_counter() - t1
run()
runs = [run() for _ in range(3)]
p = statistics.median(r[0] for r in runs); d = statistics.median(r[1] for r in runs)
import llama_cpp, re
isa = " ".join(re.findall(r"(\w+) = 1", llama_cpp.llama_print_system_info().decode()))
print(json.dumps({"what": "llama.cpp", "prompt_tokens_per_s": 256 / p, "decode_tokens_per_s": 128 / d, "isa": isa}))
PY
)
echo "$ours_llm"; echo "$ours_llm_avx2"; echo "$ours_f32"; echo "$ref_llm"

fixed=$("$bench" train-step "$gguf" full 3)
stock=$("$bench" train-step "$gguf" stock 3)
echo "$fixed"; echo "$stock"
# This build and the baseline's, alternating twice (the machine drifts between minutes).
steps_ab='{"pairs": []}'
if [ -n "$baseline_bench" ]; then
  pairs=()
  for _ in 1 2; do
    ours_step=$("$bench" train-step "$gguf" full 3)
    base_step=$("$baseline_bench" train-step "$gguf" full 3)
    echo "$ours_step"; echo "baseline $baseline_commit: $base_step"
    pairs+=("[$ours_step, $base_step]")
  done
  steps_ab="{\"commit\": \"$baseline_commit\", \"pairs\": [$(IFS=,; echo "${pairs[*]}")]}"
fi
peak=$("$bench" peak)
echo "$peak"
# The encoder's attention alone (one layer's two products per head and the softmax between).
attention=$("$bench" attention 20)
echo "$attention"
# The CPU's own ceiling (independent 8-wide FMA chains on every thread): how much of it gemm
# reaches says how much a faster matrix library could still win here.
fma_peak=$("$bench" fma-peak)
echo "$fma_peak"
# Another BLAS at the encoder's shapes (numpy's OpenBLAS, 2 threads): would swapping gemm win?
blas=$(OPENBLAS_NUM_THREADS=2 "$venv/bin/python" - <<'PY'
import json, time, numpy as np
out = {}
for m, k, n in [(1500, 384, 1536), (1500, 1536, 384), (1500, 384, 384), (96, 64, 1500), (96, 1500, 64)]:
    a = np.random.rand(m, k).astype(np.float32); b = np.random.rand(k, n).astype(np.float32)
    a @ b
    reps = max(3, int(2e10 / (2 * m * n * k)))
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    out[f"{m}x{k}x{n}"] = round(2 * m * n * k * reps / (time.perf_counter() - t) / 1e9, 1)
print(json.dumps({"what": "numpy blas gflops", "shapes": out}))
PY
)
echo "$blas"
# Memory read bandwidth with 2 threads (numpy sums release the GIL): decode of f32 weights
# cannot beat weight bytes / bandwidth.
bandwidth=$("$venv/bin/python" - <<'PY'
import json, threading, time, numpy as np
a = np.ones(540 * 2**20 // 4, dtype=np.float32)
parts = np.array_split(a, 2)
best = float("inf")
for _ in range(6):
    t = time.perf_counter()
    th = [threading.Thread(target=p.sum) for p in parts]
    [x.start() for x in th]; [x.join() for x in th]
    best = min(best, time.perf_counter() - t)
print(json.dumps({"what": "read bandwidth", "gb_per_s": a.nbytes / best / 1e9}))
PY
)
echo "$bandwidth"

python3 - "$ours_enc" "$ref_enc" "$ours_llm" "$ref_llm" "$fixed" "$stock" "$peak" "$bandwidth" "$ours_f32" "$models/whisper-tiny.en/config.json" "$ours_enc_avx2" "$ours_llm_avx2" "$fma_peak" "$blas" "$attention" "$steps_ab" <<'PY'
import sys, json
oe, re_, ol, rl, fx, st, pk, bw, of = (json.loads(a) for a in sys.argv[1:10])
c = json.load(open(sys.argv[10]))
oe2, ol2, fp, bl, at, ab = (json.loads(a) for a in sys.argv[11:17])
print(f"earshot's own kernels: {oe['kernels']} (A/B: EARSHOT_SIMD=avx2); llama.cpp's: {rl['isa']}")
# Multiply-adds of one 30 s window through the encoder: two convolutions, then per layer
# q/k/v/o and the MLP on 1500 frames, and the attention products (scores and values).
d, f, n, L, T = c["d_model"], c["encoder_ffn_dim"], c["num_mel_bins"], c["encoder_layers"], c["max_source_positions"]
flops = 2 * (2 * T * n * d * 3 + T * d * d * 3) + L * 2 * (T * (4 * d * d + 2 * d * f) + 2 * T * T * d)
floor = flops / (pk["gflops"] * 1e9)
print(f"encoder 30 s window: earshot {oe['median_s']:.3f} s, CTranslate2 {re_['median_s']:.3f} s, ratio {oe['median_s']/re_['median_s']:.2f}")
print(f"  with EARSHOT_SIMD=avx2: {oe2['median_s']:.3f} s, ratio {oe2['median_s']/re_['median_s']:.2f}")
print(f"  {flops/1e9:.1f} GFLOP per window; at this machine's f32 matmul peak ({pk['gflops']:.0f} GFLOP/s, candle/gemm, 2 threads) the floor is {floor:.3f} s: ratio >= {floor/re_['median_s']:.2f} for any implementation doing these FLOPs")
print(f"  the CPU's FMA peak: {fp['gflops']:.0f} GFLOP/s ({fp['threads']} threads), of which gemm reaches {100 * pk['gflops'] / fp['gflops']:.0f}%; at the FMA peak the floor is {flops / (fp['gflops'] * 1e9):.3f} s (ratio >= {flops / (fp['gflops'] * 1e9) / re_['median_s']:.2f})")
print(f"  its attention alone (one layer: 6 heads of 64 over 1500 frames, the two products and the softmax): {1e3 * at['median_s']:.1f} ms, {at['gflops']:.0f} GFLOP/s")
print("  numpy's BLAS (OpenBLAS, 2 threads) at the encoder's shapes, GFLOP/s: " + ", ".join(f"{s} {g}" for s, g in bl["shapes"].items()))
print(f"LLM prompt: earshot {ol['prompt_tokens_per_s']:.0f} tok/s, llama.cpp {rl['prompt_tokens_per_s']:.0f} tok/s, ratio {ol['prompt_tokens_per_s']/rl['prompt_tokens_per_s']:.2f}")
print(f"LLM decode: earshot {ol['decode_tokens_per_s']:.1f} tok/s ({ol['packed_projections']} projections from GGUF blocks), llama.cpp {rl['decode_tokens_per_s']:.1f} tok/s, ratio {ol['decode_tokens_per_s']/rl['decode_tokens_per_s']:.2f}")
print(f"  with EARSHOT_SIMD=avx2: {ol2['decode_tokens_per_s']:.1f} tok/s, ratio {ol2['decode_tokens_per_s']/rl['decode_tokens_per_s']:.2f}; prompt {ol2['prompt_tokens_per_s']:.0f} tok/s")
print(f"  from the dequantized f32 matrices: {of['decode_tokens_per_s']:.1f} tok/s, ratio {of['decode_tokens_per_s']/rl['decode_tokens_per_s']:.2f}")
# SmolLM2-135M's f32 weights read once per token (embeddings tied to the LM head): 134.5M x 4 bytes.
ceiling = bw["gb_per_s"] * 1e9 / (134.5e6 * 4)
print(f"  read bandwidth {bw['gb_per_s']:.1f} GB/s (2 threads): decode from f32 matrices <= {ceiling:.0f} tok/s, ratio <= {ceiling/rl['decode_tokens_per_s']:.2f}")
print(f"train step B=4: frozen-weight fix {fx['median_s']:.2f} s / {fx['peak_rss_mb']:.0f} MB; stock matmul {st['median_s']:.2f} s / {st['peak_rss_mb']:.0f} MB; time x{st['median_s']/fx['median_s']:.2f}, memory x{st['peak_rss_mb']/fx['peak_rss_mb']:.2f}")
if ab["pairs"]:
    ours = [p[0]["median_s"] for p in ab["pairs"]]
    base = [p[1]["median_s"] for p in ab["pairs"]]
    print(f"  against the build of {ab['commit']} (before issue #31), alternating: this build " + ", ".join(f"{t:.2f}" for t in ours) + " s, that build " + ", ".join(f"{t:.2f}" for t in base) + f" s; time x{sum(ours)/sum(base):.2f} of the baseline's (<= 1: no slower)")
PY
