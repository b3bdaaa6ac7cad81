//! Model timings for scripts/bench_models.sh (which runs the references side by side).
//!
//! bench_models encoder WHISPER_DIR MEL.npy REPEATS   -> median s per 30 s window
//! bench_models llm GGUF PROMPT_TOKENS DECODE_TOKENS [composed|dequantized]  -> prompt tokens/s, decode tokens/s
//! bench_models train-step GGUF prefix|full|stock REPEATS   -> median step s, peak RSS
//! bench_models peak   -> f32 matmul GFLOP/s at the encoder's MLP shape
//! bench_models attention [REPEATS]   -> median s and GFLOP/s of the encoder's attention
//!   (tiny.en's shape: 1500 frames, 6 heads of 64)
//! bench_models packed ROWS COLS REPEATS [COPIES] [GAP_US]   -> GB/s of the packed Q4_1
//!   decode product (one input row) over COPIES matrices in turn (more than the caches hold
//!   when large), with GAP_US of single-threaded busy work between products (the rest of a
//!   decode step, during which the pool's workers go idle)
//! One JSON object on stdout per call.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use earshot::models::llm::PrefixCache;
use earshot::models::llm::{
    read_gguf, stack_projections, GgufBlocks, LanguageModel, Llama, LogitsAt,
};
use earshot::models::nonfinite::NonFiniteTrace;
use earshot::models::whisper::WhisperEncoder;
use earshot::models::Runtime;
use earshot::pipeline::loss::caption_loss;
use earshot::pipeline::TextPieces;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn peak_rss_mb() -> f64 {
    earshot::selftest::peak_rss_mib().unwrap_or(f64::NAN)
}

fn load_llama(gguf: &str, blocks: GgufBlocks) -> Llama {
    let rt = Runtime::cpu();
    // As `load_llm_with` does.
    let (mut store, cfg, _) = read_gguf(&PathBuf::from(gguf), &rt, blocks).unwrap();
    stack_projections(&mut store, &cfg).unwrap();
    Llama::load(&store, &cfg, DType::F32, &Device::Cpu).unwrap()
}

fn main() {
    earshot::models::device::count_threads_once();
    earshot::alloc::tune_for_tensors();
    let args: Vec<String> = std::env::args().collect();
    let trace = NonFiniteTrace::default();
    match args.get(1).map(|s| s.as_str()) {
        Some("encoder") => {
            let enc = WhisperEncoder::load_dir(&PathBuf::from(&args[2]), &Runtime::cpu()).unwrap();
            let (_, mel) = earshot::npy::read_f32(&PathBuf::from(&args[3])).unwrap();
            let x = Tensor::from_vec(mel, (1, 80, 3000), &Device::Cpu).unwrap();
            let repeats: usize = args[4].parse().unwrap();
            enc.forward(&x, trace).unwrap();
            let times = (0..repeats)
                .map(|_| {
                    let t = Instant::now();
                    enc.forward(&x, trace).unwrap();
                    t.elapsed().as_secs_f64()
                })
                .collect();
            println!(
                "{{\"what\":\"encoder\",\"median_s\":{},\"kernels\":\"{}\"}}",
                median(times),
                earshot::models::simd::level().name()
            );
        }
        Some("llm") => {
            let mut model = load_llama(&args[2], GgufBlocks::Keep);
            // A/B: candle's composed ops instead of the fused ones; decoding from the
            // dequantized f32 matrices instead of the GGUF blocks.
            match args.get(5).map(|s| s.as_str()) {
                Some("composed") => model.use_stock_backward(),
                Some("dequantized") => model.use_dequantized_products(),
                _ => {}
            }
            let (n_prompt, n_decode): (usize, usize) =
                (args[3].parse().unwrap(), args[4].parse().unwrap());
            let ids: Vec<u32> = (0..n_prompt as u32)
                .map(|i| 100 + (i * 37) % 40000)
                .collect();
            let run = || {
                let mut cache = model.new_cache();
                let x = Tensor::new(ids.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                let t0 = Instant::now();
                let logits = model
                    .forward(
                        &model.embed(&x).unwrap(),
                        0,
                        Some(&mut cache),
                        LogitsAt::Last,
                        trace,
                    )
                    .unwrap();
                let mut next = logits
                    .flatten_all()
                    .unwrap()
                    .argmax(0)
                    .unwrap()
                    .to_scalar::<u32>()
                    .unwrap();
                let prompt_s = t0.elapsed().as_secs_f64();
                let t1 = Instant::now();
                for i in 0..n_decode {
                    let x = Tensor::new(&[next], &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap();
                    let logits = model
                        .forward(
                            &model.embed(&x).unwrap(),
                            n_prompt + i,
                            Some(&mut cache),
                            LogitsAt::Last,
                            trace,
                        )
                        .unwrap();
                    next = logits
                        .flatten_all()
                        .unwrap()
                        .argmax(0)
                        .unwrap()
                        .to_scalar::<u32>()
                        .unwrap();
                }
                (prompt_s, t1.elapsed().as_secs_f64())
            };
            run();
            let runs: Vec<(f64, f64)> = (0..3).map(|_| run()).collect();
            let p = median(runs.iter().map(|r| r.0).collect());
            let d = median(runs.iter().map(|r| r.1).collect());
            println!(
                "{{\"what\":\"llm\",\"kernels\":\"{}\",\"packed_projections\":{},\"prompt_tokens_per_s\":{},\"decode_tokens_per_s\":{}}}",
                earshot::models::simd::level().name(),
                model.packed_projections(),
                n_prompt as f64 / p,
                n_decode as f64 / d
            );
        }
        Some("train-step") => {
            // As `earshot train` does.
            earshot::models::device::keep_elementwise_on_caller();
            // As `earshot train` loads it: no decoding blocks.
            let mut model = load_llama(&args[2], GgufBlocks::Skip);
            let variant = args[3].as_str();
            if variant == "stock" {
                model.use_stock_backward();
            }
            let repeats: usize = args[4].parse().unwrap();
            // B = 4: 25 prompt + 64 audio + 5 suffix + 20 target positions through the
            // training code's loss; the audio frames are the trainable input.
            let (b, n_pre, n_audio, n_post, n_tgt) = (4, 25, 64, 5, 20);
            let h = model.hidden_size();
            let ids = |n: usize, seed: u32| -> Vec<u32> {
                (0..n as u32)
                    .map(|i| 100 + ((i + seed) * 131) % 40000)
                    .collect()
            };
            let pieces: Vec<TextPieces> = (0..b as u32)
                .map(|row| TextPieces {
                    before: ids(n_pre, 1),
                    after: ids(n_post, 2),
                    target: ids(n_tgt, 3 + row),
                })
                .collect();
            let audio: Vec<Var> = (0..b)
                .map(|_| {
                    Var::from_tensor(
                        &Tensor::randn(0f32, 0.02, (1, n_audio, h), &Device::Cpu).unwrap(),
                    )
                    .unwrap()
                })
                .collect();
            let inputs: Vec<Tensor> = audio.iter().map(|v| v.as_tensor().clone()).collect();
            // "prefix": the prompt text before the audio computed once, as training does;
            // "full" and "stock" recompute it every step.
            let prefixes = PrefixCache::default();
            let cache = (variant == "prefix").then_some(&prefixes);
            let step = || {
                let t = Instant::now();
                let out = caption_loss(&model, &pieces, &inputs, cache, trace).unwrap();
                let tf = t.elapsed().as_secs_f64();
                let grads = out.loss.backward().unwrap();
                if std::env::var_os("BENCH_SPLIT").is_some() {
                    eprintln!(
                        "forward {tf:.3} s, backward {:.3} s",
                        t.elapsed().as_secs_f64() - tf
                    );
                }
                assert!(audio.iter().all(|a| grads.get(a.as_tensor()).is_some()));
                drop(grads);
                t.elapsed().as_secs_f64()
            };
            step();
            let times: Vec<f64> = (0..repeats).map(|_| step()).collect();
            let min = times.iter().copied().fold(f64::INFINITY, f64::min);
            println!(
                "{{\"what\":\"train-step\",\"variant\":\"{variant}\",\"median_s\":{},\"min_s\":{min},\"peak_rss_mb\":{}}}",
                median(times),
                peak_rss_mb()
            );
        }
        Some("peak") => {
            // The best f32 matmul throughput candle reaches here, at the encoder's MLP shape
            // (1500 frames x d 384 x 1536): the floor any implementation's encoder time has
            // on this CPU is its FLOP count over this.
            let (m, k, n) = (1500usize, 384usize, 1536usize);
            let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)
                .unwrap()
                .t()
                .unwrap();
            a.matmul(&w).unwrap();
            let reps = 40;
            let t = Instant::now();
            for _ in 0..reps {
                a.matmul(&w).unwrap();
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{{\"what\":\"matmul peak\",\"gflops\":{}}}",
                2.0 * (m * k * n) as f64 / s / 1e9
            );
        }
        Some("attention") => {
            // The encoder's attention alone at tiny.en's shape (1500 frames, 6 heads of 64):
            // the two products per head and the softmax between them.
            let (t, heads, hd) = (1500usize, 6usize, 64usize);
            let reps: usize = args.get(2).map_or(20, |s| s.parse().unwrap());
            let qkv: Vec<Tensor> = (0..3)
                .map(|_| Tensor::randn(0f32, 1.0, (1, t, heads * hd), &Device::Cpu).unwrap())
                .collect();
            let scale = (hd as f64).powf(-0.5);
            let run = || {
                earshot::models::fused::attention_inference(&qkv[0], &qkv[1], &qkv[2], heads, scale)
                    .unwrap()
            };
            run();
            let times = (0..reps)
                .map(|_| {
                    let s = Instant::now();
                    run();
                    s.elapsed().as_secs_f64()
                })
                .collect();
            let s = median(times);
            println!(
                "{{\"what\":\"attention\",\"median_s\":{s},\"gflops\":{}}}",
                4.0 * (t * t * hd * heads) as f64 / s / 1e9
            );
        }
        Some("fma-peak") => {
            // The CPU's own f32 ceiling: twelve independent chains of 8-wide FMAs per thread
            // (enough to cover the FMA latency on every x86 core), one chain set per rayon
            // thread, all threads at once. What gemm's peak above reaches is a share of this.
            let threads = rayon::current_num_threads();
            let iters = 300_000_000u64;
            let t = Instant::now();
            let sums: Vec<f32> = rayon::broadcast(|_| fma_chains(iters));
            let s = t.elapsed().as_secs_f64();
            assert!(sums.iter().all(|v| v.is_finite()));
            println!(
                "{{\"what\":\"fma peak\",\"gflops\":{},\"threads\":{threads}}}",
                threads as f64 * iters as f64 * 12.0 * 16.0 / s / 1e9
            );
        }
        Some("packed") => {
            use earshot::models::packed::{BlockFormat, PackedMatrix};
            let arg = |i: usize, default: usize| -> usize {
                args.get(i)
                    .map_or(default, |s| s.parse().expect("a number"))
            };
            let (rows, cols, reps) = (arg(2, 1536), arg(3, 576), arg(4, 300));
            let (copies, gap_us) = (arg(5, 30), arg(6, 0) as u128);
            // Q4_1 blocks: d = m = 1.0 (f16 0x3c00), nibbles from a fixed pattern.
            let bytes = rows * cols / 32 * 20;
            let matrices: Vec<PackedMatrix> = (0..copies)
                .map(|c| {
                    let mut data: Vec<u8> = (0..bytes).map(|i| ((i * 7 + c) % 251) as u8).collect();
                    for block in data.chunks_exact_mut(20) {
                        block[..4].copy_from_slice(&[0x00, 0x3c, 0x00, 0x3c]);
                    }
                    PackedMatrix::from_bytes(BlockFormat::Q4_1, rows, cols, data).unwrap()
                })
                .collect();
            let x: Vec<f32> = (0..cols).map(|i| (i as f32).sin()).collect();
            let mut in_products = 0.0;
            let mut checksum = 0.0f64;
            for rep in 0..=reps {
                for m in &matrices {
                    let t = Instant::now();
                    checksum += m.matmul_t(&x, 1)[0] as f64;
                    // The first pass warms the pool and the pages.
                    if rep > 0 {
                        in_products += t.elapsed().as_secs_f64();
                    }
                    let gap = Instant::now();
                    while gap.elapsed().as_micros() < gap_us {
                        std::hint::spin_loop();
                    }
                }
            }
            let n = (reps * copies) as f64;
            println!(
                "{{\"what\":\"packed product\",\"rows\":{rows},\"cols\":{cols},\"gap_us\":{gap_us},\"gb_per_s\":{},\"us_per_product\":{},\"checksum\":{checksum}}}",
                bytes as f64 * n / in_products / 1e9,
                in_products / n * 1e6
            );
        }
        _ => panic!("usage: see the header of examples/bench_models.rs"),
    }
}

/// `iters` rounds of twelve independent 8-wide fused multiply-adds (16 FLOPs each); the sum of
/// the chains, so that nothing is optimised away. AVX2 + FMA where the CPU has them, else the
/// same arithmetic in scalars (a figure that then says so by being small).
fn fma_chains(iters: u64) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected just above.
        return unsafe { fma_chains_avx2(iters) };
    }
    let mut acc = [[0.1f32; 8]; 12];
    for _ in 0..iters {
        for chain in &mut acc {
            for v in chain.iter_mut() {
                *v = v.mul_add(0.9999, 1e-4);
            }
        }
    }
    acc.iter().flatten().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_chains_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let (b, c) = (_mm256_set1_ps(0.9999), _mm256_set1_ps(1e-4));
    let mut a = [_mm256_set1_ps(0.1); 12];
    for _ in 0..iters {
        // Twelve chains, each FMA depending only on its own chain's last (the fixed-size
        // loop is unrolled, the chains kept in registers).
        for v in &mut a {
            *v = _mm256_fmadd_ps(*v, b, c);
        }
    }
    let mut lanes = [0f32; 8];
    let mut sum = 0.0;
    for v in a {
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        sum += lanes.iter().sum::<f32>();
    }
    sum
}
