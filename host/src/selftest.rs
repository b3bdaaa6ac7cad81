//! `earshot selftest`: the frozen models and the projector at named shapes, with seeded
//! random weights (nothing downloaded), checked on one device: forward passes against the
//! CPU in f32 on the same weights, the projector gradient against a finite difference, a few
//! training steps on a fixed batch (the loss must fall), KV-cache decoding against
//! recomputing the whole sequence; with step time, decode speed and peak memory.
//!
//! Shapes: `tiny` = Whisper tiny's encoder + a SmolLM2-135M-shaped Llama (what the test suite
//! runs on the CPU); `seed` = Whisper large-v3's encoder (128 mel bins) + a Mistral-7B-shaped
//! LLM with the write-up's projector (pool to 250, LayerNorm, Linear), for a GPU.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde::Serialize;

use crate::models::device::MemoryMeter;
use crate::models::llm::{
    decode_batch, DecodeOptions, DecodeRequest, KvCache, LanguageModel, Llama, LlamaConfig,
    LogitsAt,
};
use crate::models::lora::{LoraAdapter, LoraConfig, LoraTarget};
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::projector::{Projector, ProjectorConfig, ProjectorKind};
use crate::models::trainable::Trainable;
use crate::models::weights::{ModelError, WeightStore};
use crate::models::whisper::{WhisperConfig, WhisperEncoder};
use crate::pipeline::loss::caption_loss;
use crate::pipeline::TextPieces;
use crate::sampler::{Sampler, SamplingParams};
use crate::train::optim::{AdamW, AdamWParams};
use crate::train::TrainError;

#[derive(Debug, thiserror::Error)]
pub enum SelftestError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Sampling(#[from] crate::sampler::SamplingError),
    #[error("selftest: {0}")]
    Missing(String),
    #[error("selftest: {0}")]
    Usage(String),
}

pub type Result<T> = std::result::Result<T, SelftestError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shape {
    /// Whisper tiny encoder + a 135M Llama (SmolLM2-135M's shape).
    Tiny,
    /// Whisper large-v3 encoder + a 7B Mistral-shaped LLM, the write-up's projector.
    Seed,
}

/// Everything a shape fixes.
pub struct ShapeSpec {
    pub whisper: WhisperConfig,
    pub llm: LlamaConfig,
    pub projector: ProjectorConfig,
    /// Training batch and its lengths (tokens before and after the audio, target tokens).
    pub batch: usize,
    pub mel_frames: usize,
    pub text: (usize, usize, usize),
    pub decode_tokens: usize,
}

impl Shape {
    pub fn spec(self) -> ShapeSpec {
        let llama = |vocab, hidden, inter, layers, heads, kv, tie, theta| LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: theta,
            max_position_embeddings: 4096,
            sliding_window: None,
            tie_word_embeddings: tie,
            rope_interleaved: false,
        };
        match self {
            Shape::Tiny => ShapeSpec {
                whisper: WhisperConfig {
                    num_mel_bins: 80,
                    d_model: 384,
                    encoder_layers: 4,
                    encoder_attention_heads: 6,
                    encoder_ffn_dim: 1536,
                    max_source_positions: 1500,
                },
                llm: llama(49_152, 576, 1536, 30, 9, 3, true, 100_000.0),
                projector: ProjectorConfig {
                    kind: ProjectorKind::PoolLnLinear,
                    positions: 16,
                    ..ProjectorConfig::default()
                },
                batch: 4,
                mel_frames: 3000,
                text: (25, 5, 20),
                decode_tokens: 16,
            },
            Shape::Seed => ShapeSpec {
                whisper: WhisperConfig {
                    num_mel_bins: 128,
                    d_model: 1280,
                    encoder_layers: 32,
                    encoder_attention_heads: 20,
                    encoder_ffn_dim: 5120,
                    max_source_positions: 1500,
                },
                llm: llama(32_000, 4096, 14_336, 32, 32, 8, false, 10_000.0),
                // The write-up's: average-pool to 250 positions, LayerNorm, Linear.
                projector: ProjectorConfig {
                    kind: ProjectorKind::PoolLnLinear,
                    positions: 250,
                    ..ProjectorConfig::default()
                },
                // The write-up's setup at batch 1 (what fits 24 GB; BENCHMARKS.md): ~30 prompt
                // tokens, 250 audio positions, ~10 after, ~110 caption tokens.
                batch: 1,
                mel_frames: 3000,
                text: (30, 10, 110),
                decode_tokens: 16,
            },
        }
    }
}

/// One named check: its measured value against its limit.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub value: f64,
    pub limit: f64,
    pub passed: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct SelftestReport {
    pub shape: Shape,
    pub llm_layers: usize,
    pub device: String,
    pub dtype: String,
    pub checks: Vec<Check>,
    /// Mean time of one training step (forward + backward + AdamW) on the shape's batch.
    pub train_step_s: f64,
    /// The same with LoRA adapters (rank 8, q_proj and v_proj) trained too.
    pub lora_train_step_s: f64,
    /// Greedy decoding with the KV cache, one row.
    pub decode_tokens_per_s: f64,
    /// Peak resident memory of the process (CPU) so far, in MiB.
    pub peak_rss_mib: Option<f64>,
    /// On a CUDA device: its memory around the training steps (`None` on the CPU).
    pub device_memory: Option<DeviceMemoryReport>,
}

/// Device memory of the training steps, from the CUDA driver (`models::device::MemoryMeter`).
#[derive(Debug, Clone, Serialize)]
pub struct DeviceMemoryReport {
    /// Tensors resident before the steps: the LLM's weights, the encoder output.
    pub resident_mib: f64,
    /// Most tensor memory at once during the steps (forward, backward, AdamW): what a
    /// training step at the shape's batch and lengths needs, the weights included.
    pub train_step_peak_mib: f64,
    /// All the device had in use after the steps (tensors, the pool's reserve, the CUDA
    /// context, cuBLAS workspaces; other processes too).
    pub device_used_mib: f64,
}

impl SelftestReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }
}

/// Seeded N(0, std) weights, ones for norm gains, zeros for biases. Each tensor's values come
/// in blocks, each block from its own generator seeded by (seed, tensor, block): the same
/// weights on every machine whatever its thread count, made on every core (the seed shape's
/// 7.8 billion values take ~2 minutes on one).
struct RandomWeights {
    seed: u64,
    made: u64,
    tensors: HashMap<String, Tensor>,
}

impl RandomWeights {
    fn new(seed: u64) -> Self {
        Self {
            seed,
            made: 0,
            tensors: HashMap::new(),
        }
    }
    fn normal(&mut self, name: String, shape: &[usize], std: f32) -> Result<()> {
        const BLOCK: usize = 1 << 16;
        let n: usize = shape.iter().product();
        let tensor_seed = self
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(self.made << 32);
        self.made += 1;
        let mut data = vec![0f32; n];
        data.par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(block, values)| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(tensor_seed + block as u64);
                // Box-Muller.
                for x in values {
                    let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
                    *x = std * (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos();
                }
            });
        self.tensors
            .insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    }
    fn fill(&mut self, name: String, shape: &[usize], value: f32) -> Result<()> {
        let t = Tensor::full(value, shape, &Device::Cpu)?;
        self.tensors.insert(name, t);
        Ok(())
    }
    fn store(self, what: &str) -> WeightStore {
        WeightStore::new(what, self.tensors)
    }
}

fn whisper_weights(cfg: &WhisperConfig, seed: u64) -> Result<WeightStore> {
    let mut w = RandomWeights::new(seed);
    let (d, f, m) = (cfg.d_model, cfg.encoder_ffn_dim, cfg.num_mel_bins);
    let p = "model.encoder";
    let std = (1.0 / d as f32).sqrt();
    w.normal(
        format!("{p}.conv1.weight"),
        &[d, m, 3],
        (1.0 / (3 * m) as f32).sqrt(),
    )?;
    w.fill(format!("{p}.conv1.bias"), &[d], 0.0)?;
    w.normal(
        format!("{p}.conv2.weight"),
        &[d, d, 3],
        (1.0 / (3 * d) as f32).sqrt(),
    )?;
    w.fill(format!("{p}.conv2.bias"), &[d], 0.0)?;
    w.normal(
        format!("{p}.embed_positions.weight"),
        &[cfg.max_source_positions, d],
        0.02,
    )?;
    for i in 0..cfg.encoder_layers {
        let l = format!("{p}.layers.{i}");
        for ln in ["self_attn_layer_norm", "final_layer_norm"] {
            w.fill(format!("{l}.{ln}.weight"), &[d], 1.0)?;
            w.fill(format!("{l}.{ln}.bias"), &[d], 0.0)?;
        }
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            w.normal(format!("{l}.self_attn.{proj}.weight"), &[d, d], std)?;
            if proj != "k_proj" {
                w.fill(format!("{l}.self_attn.{proj}.bias"), &[d], 0.0)?;
            }
        }
        w.normal(format!("{l}.fc1.weight"), &[f, d], std)?;
        w.fill(format!("{l}.fc1.bias"), &[f], 0.0)?;
        w.normal(format!("{l}.fc2.weight"), &[d, f], (1.0 / f as f32).sqrt())?;
        w.fill(format!("{l}.fc2.bias"), &[d], 0.0)?;
    }
    w.fill(format!("{p}.layer_norm.weight"), &[d], 1.0)?;
    w.fill(format!("{p}.layer_norm.bias"), &[d], 0.0)?;
    Ok(w.store("selftest whisper"))
}

fn llama_weights(cfg: &LlamaConfig, seed: u64) -> Result<WeightStore> {
    let mut w = RandomWeights::new(seed);
    let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
    let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
    let std = (1.0 / h as f32).sqrt();
    w.normal(
        "model.embed_tokens.weight".into(),
        &[cfg.vocab_size, h],
        0.02,
    )?;
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        w.fill(format!("{p}.input_layernorm.weight"), &[h], 1.0)?;
        w.fill(format!("{p}.post_attention_layernorm.weight"), &[h], 1.0)?;
        w.normal(format!("{p}.self_attn.q_proj.weight"), &[nh * hd, h], std)?;
        w.normal(format!("{p}.self_attn.k_proj.weight"), &[nkv * hd, h], std)?;
        w.normal(format!("{p}.self_attn.v_proj.weight"), &[nkv * hd, h], std)?;
        w.normal(format!("{p}.self_attn.o_proj.weight"), &[h, nh * hd], std)?;
        w.normal(format!("{p}.mlp.gate_proj.weight"), &[i, h], std)?;
        w.normal(format!("{p}.mlp.up_proj.weight"), &[i, h], std)?;
        w.normal(
            format!("{p}.mlp.down_proj.weight"),
            &[h, i],
            (1.0 / i as f32).sqrt(),
        )?;
    }
    w.fill("model.norm.weight".into(), &[h], 1.0)?;
    if !cfg.tie_word_embeddings {
        w.normal("lm_head.weight".into(), &[cfg.vocab_size, h], std)?;
    }
    Ok(w.store("selftest llm"))
}

/// Relative L2 distance of `a` from the reference `b`.
fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?;
    let b = b
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(diff / norm.max(f64::MIN_POSITIVE))
}

fn check(name: &str, value: f64, limit: f64, detail: String) -> Check {
    Check {
        name: name.into(),
        value,
        limit,
        passed: value.is_finite() && value <= limit,
        detail,
    }
}

/// Peak resident set size of this process, from /proc (Linux).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The shape's spec with its LLM cut to `llm_layers` (every width, head count, the
/// vocabulary and the untied head stay the shape's).
fn spec_of(shape: Shape, llm_layers: Option<usize>) -> Result<ShapeSpec> {
    let mut spec = shape.spec();
    if let Some(layers) = llm_layers {
        if layers == 0 || layers > spec.llm.num_hidden_layers {
            return Err(SelftestError::Usage(format!(
                "--llm-layers {layers}: the {shape:?} shape's LLM has 1 to {} layers",
                spec.llm.num_hidden_layers
            )));
        }
        spec.llm.num_hidden_layers = layers;
    }
    Ok(spec)
}

/// Runs every check of `shape` on `device` (models in `dtype` there), `seed` for the weights;
/// `llm_layers` cuts the LLM to its first layers.
pub fn run(
    shape: Shape,
    device: &Device,
    dtype: DType,
    seed: u64,
    llm_layers: Option<usize>,
) -> Result<SelftestReport> {
    let spec = spec_of(shape, llm_layers)?;
    let started = Instant::now();
    // Progress on stderr: the seed shape takes minutes, and a GPU check runs under a timeout.
    let phase = |what: &str| {
        tracing::info!(
            "selftest: {what} ({:.1} s)",
            started.elapsed().as_secs_f64()
        )
    };
    let wstore = whisper_weights(&spec.whisper, seed)?;
    let lstore = llama_weights(&spec.llm, seed + 1)?;
    phase("random weights made");
    // bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%) per operation; through a
    // deep stack the errors add up in quadrature, so a few percent is a correct result and a
    // wrong kernel (transposed, mis-scaled, wrong mask) is off by ~100%.
    let tolerance = if dtype == DType::F32 { 1e-4 } else { 5e-2 };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 2);
    let (encoder_check, enc_ref, encoded) =
        check_encoder(&spec, wstore, device, dtype, tolerance, &mut rng)?;
    phase("encoder forward checked");
    let ids: Vec<u32> = (0..32)
        .map(|_| rng.random_range(0..spec.llm.vocab_size as u32))
        .collect();
    let (llm_check, mut llm) = check_llm(&spec, lstore, device, dtype, tolerance, &ids)?;
    phase("LLM forward checked");

    // KV cache: greedy decoding through the decode loop (prefix cache, then one token at a
    // time with the KV cache) against one forward pass over the prompt and the decoded
    // tokens, teacher-forced so a disagreement does not carry on into the next tokens.
    let decode_started = Instant::now();
    let cached = greedy_decode_loop(&llm, &ids[..8], spec.decode_tokens)?;
    let decode_s = decode_started.elapsed().as_secs_f64();
    let agreement = recomputed_agreement(&llm, &ids[..8], &cached, tolerance)?;
    let kv_check = check(
        "KV-cache decoding vs recompute (differing tokens)",
        (agreement.differing + spec.decode_tokens.abs_diff(cached.len())) as f64,
        0.0,
        format!(
            "{} tokens, {} near-tie(s) within rounding",
            cached.len(),
            agreement.near_ties
        ),
    );
    phase("KV-cache decoding checked");

    // The projector's gradient against a central finite difference, in f64 on the CPU (a
    // finite difference in bf16 measures rounding, not the gradient).
    let fd = gradient_check(&spec, &enc_ref, spec.whisper.d_model, seed)?;
    let gradient_check = check(
        "projector gradient vs finite difference (relative error)",
        fd,
        1e-4,
        "f64, CPU".into(),
    );
    phase("projector gradient checked");
    let lora_fd = lora_gradient_check(&spec, &enc_ref, spec.whisper.d_model, seed)?;
    let lora_gradient = check(
        "LoRA A/B gradients vs finite difference (relative error)",
        lora_fd,
        1e-4,
        "f64, CPU; q_proj, v_proj, down_proj".into(),
    );
    phase("LoRA gradients checked");
    let encoded = encoded.to_dtype(DType::F32)?;
    let (training_check, step_s, device_memory) =
        measured_training(&spec, &llm, None, &encoded, device, seed)?;
    phase("training steps done");
    let (lora_training, lora_step_s, lora_memory) =
        lora_training(&spec, &mut llm, &encoded, device, seed)?;
    phase("LoRA training steps done");
    let mut checks = vec![
        encoder_check,
        llm_check,
        kv_check,
        gradient_check,
        lora_gradient,
        training_check,
        lora_training,
    ];
    if let (Some(plain), Some(with_lora)) = (&device_memory, &lora_memory) {
        checks.push(lora_memory_check(plain, with_lora));
    }
    Ok(SelftestReport {
        shape,
        llm_layers: spec.llm.num_hidden_layers,
        device: format!("{device:?}"),
        dtype: format!("{dtype:?}"),
        checks,
        train_step_s: step_s,
        lora_train_step_s: lora_step_s,
        decode_tokens_per_s: spec.decode_tokens as f64 / decode_s.max(1e-9),
        peak_rss_mib: peak_rss_mib(),
        device_memory,
    })
}

/// The encoder on `device` in `dtype` against the CPU in f32 on a random mel: the check, the
/// reference output and the device's.
fn check_encoder(
    spec: &ShapeSpec,
    weights: WeightStore,
    device: &Device,
    dtype: DType,
    tolerance: f64,
    rng: &mut rand::rngs::StdRng,
) -> Result<(Check, Tensor, Tensor)> {
    let n_mels = spec.whisper.num_mel_bins;
    let mel: Vec<f32> = (0..n_mels * spec.mel_frames)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let mel = Tensor::from_vec(mel, (1, n_mels, spec.mel_frames), &Device::Cpu)?;
    // On the CPU in f32 this compares the encoder with itself (candle's layer norm has no
    // f64 kernel); the LLM below has an f64 reference.
    let reference = WhisperEncoder::load(&weights, &spec.whisper, DType::F32)?
        .forward(&mel, NonFiniteTrace::default())?;
    let encoder = WhisperEncoder::load(&weights.to_device(device)?, &spec.whisper, dtype)?;
    drop(weights);
    let encoded = encoder.forward(&mel.to_device(device)?, NonFiniteTrace::default())?;
    let c = check(
        "encoder forward vs CPU f32 (relative L2)",
        rel_l2(&encoded, &reference)?,
        tolerance,
        format!("{:?}", encoded.dims()),
    );
    Ok((c, reference, encoded))
}

/// The LLM's logits for `ids` on `device` in `dtype` against a CPU reference on the same
/// weights: f64 when the device is the CPU in f32 (its f32 path uses the fused kernels, the
/// f64 one candle's stock ops), f32 otherwise. Returns the device's model.
fn check_llm(
    spec: &ShapeSpec,
    weights: WeightStore,
    device: &Device,
    dtype: DType,
    tolerance: f64,
    ids: &[u32],
) -> Result<(Check, Llama)> {
    let (ref_dtype, ref_name) = if device.is_cpu() && dtype == DType::F32 {
        (DType::F64, "CPU f64")
    } else {
        (DType::F32, "CPU f32")
    };
    let logits_of = |m: &Llama, dev: &Device| -> Result<Tensor> {
        let x = m.embed(&Tensor::new(ids, dev)?.unsqueeze(0)?)?;
        Ok(m.forward(&x, 0, None, LogitsAt::All, NonFiniteTrace::default())?)
    };
    let reference = logits_of(
        &Llama::load(&weights, &spec.llm, ref_dtype, &Device::Cpu)?,
        &Device::Cpu,
    )?;
    let llm = Llama::load(&weights.to_device(device)?, &spec.llm, dtype, device)?;
    drop(weights);
    let logits = logits_of(&llm, device)?;
    let c = check(
        &format!("LLM forward vs {ref_name} (relative L2 of logits)"),
        rel_l2(&logits, &reference)?,
        tolerance,
        format!("{:?}", logits.dims()),
    );
    Ok((c, llm))
}

/// A few training steps on one fixed batch (the loss must fall), with the device memory they
/// take on CUDA: the pool's peak is reset first, so it is the resident tensors (the LLM's
/// weights, the encoder output) plus what a step adds.
fn measured_training(
    spec: &ShapeSpec,
    llm: &Llama,
    lora: Option<&Arc<LoraAdapter>>,
    encoded: &Tensor,
    device: &Device,
    seed: u64,
) -> Result<(Check, f64, Option<DeviceMemoryReport>)> {
    let meter = MemoryMeter::of(device);
    let resident = meter.as_ref().map(|m| {
        m.reset_peak();
        m.read()
    });
    let (first, last, step_s) = train_steps(spec, llm, lora, encoded, device, seed)?;
    let device_memory = meter.zip(resident).map(|(m, before)| {
        let after = m.read();
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        DeviceMemoryReport {
            resident_mib: mib(before.in_use),
            train_step_peak_mib: mib(after.peak),
            device_used_mib: mib(after.device_used),
        }
    });
    let c = check(
        "training: final / first loss on a fixed batch",
        last / first,
        0.9,
        format!("{first:.4} -> {last:.4}"),
    );
    Ok((c, step_s, device_memory))
}

fn argmax_last(logits: &Tensor) -> Result<u32> {
    let row = logits
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    Ok(row
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32))
}

/// Greedy decoding through the one decode loop captioning uses (`decode_batch`): the first
/// half of `ids` prefilled into a prefix cache, the rest after it, `n` new tokens.
fn greedy_decode_loop(llm: &Llama, ids: &[u32], n: usize) -> Result<Vec<u32>> {
    let embed = |part: &[u32]| -> Result<Tensor> {
        Ok(llm.embed(&Tensor::new(part, llm.device())?.unsqueeze(0)?)?)
    };
    let (head, tail) = ids.split_at(ids.len() / 2);
    let mut prefix: KvCache = llm.new_cache();
    llm.prefill(&embed(head)?, &mut prefix)?;
    let mut requests = [DecodeRequest {
        rest: embed(tail)?,
        sampler: Sampler::new(SamplingParams::default())?,
        max_tokens: n,
        stop_strings: Vec::new(),
    }];
    let options = DecodeOptions {
        tokenizer: None,
        eos: None,
        trace: NonFiniteTrace::default(),
        cancelled: None,
    };
    let mut decoded = decode_batch(llm, &prefix, &mut requests, &options, |_, _| {})?;
    Ok(decoded.remove(0).ids)
}

/// How the recomputed sequence agrees with tokens decoded with the KV cache.
struct Agreement {
    /// Tokens where the recomputed logits prefer another token by more than rounding.
    differing: usize,
    /// Tokens where they prefer another by less: two orders of summation in bf16 may pick
    /// either of two near-equal logits, so these are not errors.
    near_ties: usize,
}

/// One forward pass over `prompt` + `decoded` (all positions' logits) compared with each
/// decoded token: the pass's best token at the position before it must be the decoded one,
/// or lead it by at most `2 * rel_tolerance * RMS(logits)` (each of two logits off by the
/// forward check's tolerance). A wrong cache (stale keys, a wrong rotary offset, a lost
/// position) changes the logits by far more.
fn recomputed_agreement(
    llm: &Llama,
    prompt: &[u32],
    decoded: &[u32],
    rel_tolerance: f64,
) -> Result<Agreement> {
    let mut agreement = Agreement {
        differing: 0,
        near_ties: 0,
    };
    let Some((_, fed)) = decoded.split_last() else {
        return Ok(agreement);
    };
    let seq: Vec<u32> = prompt.iter().chain(fed).copied().collect();
    let x = llm.embed(&Tensor::new(seq.as_slice(), llm.device())?.unsqueeze(0)?)?;
    let logits = llm
        .forward(&x, 0, None, LogitsAt::All, NonFiniteTrace::default())?
        .squeeze(0)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    for (i, &token) in decoded.iter().enumerate() {
        let row = logits.get(prompt.len() - 1 + i)?.to_vec1::<f32>()?;
        let best = argmax_last(&Tensor::new(row.as_slice(), &Device::Cpu)?)?;
        if best == token {
            continue;
        }
        let rms = (row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / row.len() as f64).sqrt();
        let lead = (row[best as usize] - row[token as usize]) as f64;
        if lead <= 2.0 * rel_tolerance * rms {
            agreement.near_ties += 1;
        } else {
            agreement.differing += 1;
        }
    }
    Ok(agreement)
}

/// Random text pieces of the shape's lengths, one per batch row (targets of different
/// lengths, so the batch is padded). Each target repeats one token: something a projector
/// can learn to make a random LLM say in a few steps.
fn batch_pieces(spec: &ShapeSpec, seed: u64) -> Vec<TextPieces> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 3);
    let vocab = spec.llm.vocab_size as u32;
    let mut ids = |n: usize| {
        (0..n)
            .map(|_| rng.random_range(0..vocab))
            .collect::<Vec<u32>>()
    };
    let before = ids(spec.text.0);
    (0..spec.batch)
        .map(|r| TextPieces {
            before: before.clone(),
            after: ids(spec.text.1),
            target: vec![ids(1)[0]; spec.text.2 - r % 3],
        })
        .collect()
}

/// Largest relative error of the analytic gradient against a central difference, over a
/// the two coordinates of each projector parameter with the largest gradients; an LLM of
/// the shape's widths but one layer, in f64, keeps this affordable at any shape (17 forward
/// passes: ~5 TFLOP in f64 at the seed shape).
fn gradient_check(spec: &ShapeSpec, encoded: &Tensor, d_enc: usize, seed: u64) -> Result<f64> {
    let cfg = LlamaConfig {
        num_hidden_layers: 1,
        ..spec.llm.clone()
    };
    let llm = Llama::load(
        &llama_weights(&cfg, seed + 4)?,
        &cfg,
        DType::F64,
        &Device::Cpu,
    )?;
    let projector = Projector::new(&spec.projector, d_enc, cfg.hidden_size, seed, &Device::Cpu)?
        .to_dtype(DType::F64)?;
    let pieces: Vec<TextPieces> = batch_pieces(spec, seed).into_iter().take(2).collect();
    let encoded = encoded.to_dtype(DType::F64)?;
    let loss_of = |p: &Projector| -> Result<Tensor> {
        let audio: Vec<Tensor> = (0..pieces.len())
            .map(|i| p.forward(&(&encoded * (1.0 + 0.1 * i as f64))?))
            .collect::<std::result::Result<_, ModelError>>()?;
        Ok(caption_loss(&llm, &pieces, &audio, None, NonFiniteTrace::default())?.loss)
    };
    let grads = loss_of(&projector)?.backward()?;
    worst_fd_error(projector.params(), &grads, || {
        Ok(loss_of(&projector)?.to_scalar::<f64>()?)
    })
}

/// The training steps again with LoRA (rank 8, alpha 32, q_proj and v_proj: SALMONN's and
/// PEFT's usual) on the LLM, taken off afterwards: its loss must fall too (the check), the
/// step time, and on a GPU the device memory of the steps.
fn lora_training(
    spec: &ShapeSpec,
    llm: &mut Llama,
    encoded: &Tensor,
    device: &Device,
    seed: u64,
) -> Result<(Check, f64, Option<DeviceMemoryReport>)> {
    let config = LoraConfig {
        dropout: 0.0,
        ..LoraConfig::default()
    };
    let lora = Arc::new(LoraAdapter::new(
        &config,
        &spec.llm.decoder_shape(),
        seed,
        device,
    )?);
    llm.set_adapter(Some(lora.clone()));
    let measured = measured_training(spec, llm, Some(&lora), encoded, device, seed);
    llm.set_adapter(None);
    let (mut c, step_s, memory) = measured?;
    c.name = format!("LoRA {}", c.name);
    Ok((c, step_s, memory))
}

/// The LoRA step's device-memory peak within 10% of the projector-only step's: no gradient
/// or optimizer state for the frozen weights.
fn lora_memory_check(plain: &DeviceMemoryReport, with_lora: &DeviceMemoryReport) -> Check {
    check(
        "LoRA training-step peak / projector-only",
        with_lora.train_step_peak_mib / plain.train_step_peak_mib.max(1e-9),
        1.10,
        format!(
            "{:.0} MiB vs {:.0} MiB",
            with_lora.train_step_peak_mib, plain.train_step_peak_mib
        ),
    )
}

/// LoRA A and B (q_proj, v_proj, down_proj) of a one-layer LLM at the shape, against a
/// central finite difference in f64 on the CPU: the worst relative error over each tensor's
/// two largest-gradient coordinates. B is drawn (a fresh B is zero, and A's gradient with it).
fn lora_gradient_check(spec: &ShapeSpec, encoded: &Tensor, d_enc: usize, seed: u64) -> Result<f64> {
    let cfg = LlamaConfig {
        num_hidden_layers: 1,
        ..spec.llm.clone()
    };
    let mut llm = Llama::load(
        &llama_weights(&cfg, seed + 4)?,
        &cfg,
        DType::F64,
        &Device::Cpu,
    )?;
    let config = LoraConfig {
        dropout: 0.0,
        targets: vec![LoraTarget::QProj, LoraTarget::VProj, LoraTarget::DownProj],
        ..LoraConfig::default()
    };
    let adapter = LoraAdapter::new(&config, &cfg.decoder_shape(), seed, &Device::Cpu)?
        .to_dtype(DType::F64)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 5);
    for (name, var) in adapter.params() {
        if name.ends_with("lora_B.weight") {
            let v: Vec<f64> = (0..var.elem_count())
                .map(|_| rng.random_range(-0.02..0.02))
                .collect();
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
        }
    }
    let adapter = Arc::new(adapter);
    llm.set_adapter(Some(adapter.clone()));
    let projector = Projector::new(&spec.projector, d_enc, cfg.hidden_size, seed, &Device::Cpu)?
        .to_dtype(DType::F64)?;
    let pieces: Vec<TextPieces> = batch_pieces(spec, seed).into_iter().take(2).collect();
    let encoded = encoded.to_dtype(DType::F64)?;
    let audio: Vec<Tensor> = (0..pieces.len())
        .map(|i| projector.forward(&(&encoded * (1.0 + 0.1 * i as f64))?))
        .collect::<std::result::Result<_, ModelError>>()?;
    let loss_of = || -> Result<Tensor> {
        Ok(caption_loss(&llm, &pieces, &audio, None, NonFiniteTrace::default())?.loss)
    };
    let grads = loss_of()?.backward()?;
    worst_fd_error(&adapter.params(), &grads, || {
        Ok(loss_of()?.to_scalar::<f64>()?)
    })
}

/// The worst relative error between the analytic gradients in `grads` and central finite
/// differences of `loss_of`, over each parameter's two largest-gradient coordinates (a
/// relative error is meaningful there); every parameter is restored.
fn worst_fd_error(
    params: &[(String, candle_core::Var)],
    grads: &candle_core::backprop::GradStore,
    loss_of: impl Fn() -> Result<f64>,
) -> Result<f64> {
    let mut worst = 0f64;
    let eps = 1e-5;
    for (name, var) in params {
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| SelftestError::Missing(format!("no gradient for {name}")))?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let mut order: Vec<usize> = (0..g.len()).collect();
        order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
        for &k in order.iter().take(2) {
            let at = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[k] += delta;
                var.set(&Tensor::from_vec(v, var.as_tensor().shape(), &Device::Cpu)?)?;
                loss_of()
            };
            let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
            let rel = (numeric - g[k]).abs() / g[k].abs().max(1e-12);
            worst = worst.max(rel);
        }
        var.set(&Tensor::from_vec(
            base,
            var.as_tensor().shape(),
            &Device::Cpu,
        )?)?;
    }
    Ok(worst)
}

/// `steps` AdamW steps on one fixed batch: (first loss, last loss, mean step seconds).
fn train_steps(
    spec: &ShapeSpec,
    llm: &Llama,
    lora: Option<&Arc<LoraAdapter>>,
    encoded: &Tensor,
    device: &Device,
    seed: u64,
) -> Result<(f64, f64, f64)> {
    const STEPS: usize = 10;
    let projector = Projector::new(
        &spec.projector,
        spec.whisper.d_model,
        spec.llm.hidden_size,
        seed,
        device,
    )?;
    let trained = Trainable {
        projector,
        lora: lora.cloned(),
    };
    let projector = &trained.projector;
    let mut opt = AdamW::new(
        trained.params(),
        AdamWParams {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let pieces = batch_pieces(spec, seed);
    let prefixes = crate::models::llm::PrefixCache::default();
    let (mut first, mut last, mut total_s) = (f64::NAN, f64::NAN, 0.0);
    for step in 0..STEPS {
        let started = Instant::now();
        let audio: Vec<Tensor> = (0..pieces.len())
            .map(|i| projector.forward(&(encoded * (1.0 + 0.1 * i as f64))?))
            .collect::<std::result::Result<_, ModelError>>()?;
        // With LoRA the prompt prefix depends on the adapters: not cached (as in training).
        let out = caption_loss(
            llm,
            &pieces,
            &audio,
            lora.is_none().then_some(&prefixes),
            NonFiniteTrace::default(),
        )?;
        let grads = out.loss.backward()?;
        opt.step(&grads, 1e-2)?;
        if let Some(l) = lora {
            l.touch();
        }
        let value = out.value()?;
        if step > 0 {
            total_s += started.elapsed().as_secs_f64();
        }
        if step == 0 {
            first = value;
        }
        last = value;
    }
    Ok((first, last, total_s / (STEPS - 1) as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(threads: usize) -> Vec<f32> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut w = RandomWeights::new(7);
            w.normal("a".into(), &[3, 100_000], 0.5).unwrap();
            w.normal("b".into(), &[1000], 0.5).unwrap();
            let mut out = w.tensors["a"].flatten_all().unwrap().to_vec1().unwrap();
            out.extend(w.tensors["b"].to_vec1::<f32>().unwrap());
            out
        })
    }

    #[test]
    fn random_weights_do_not_depend_on_the_thread_count() {
        let one = values(1);
        assert_eq!(one, values(3));
        // N(0, 0.5): the sample's mean and spread, and two tensors that differ.
        let n = one.len() as f64;
        let mean = one.iter().map(|&x| x as f64).sum::<f64>() / n;
        let sd = (one.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 0.01 && (sd - 0.5).abs() < 0.01, "{mean} {sd}");
        assert_ne!(one[..1000], one[300_000..]);
    }

    #[test]
    fn seed_shape_is_the_write_ups_setup() {
        let spec = Shape::Seed.spec();
        assert_eq!(spec.whisper.num_mel_bins, 128);
        assert_eq!(spec.projector.positions, 250);
        let tokens = spec.text.0 + spec.projector.positions + spec.text.1 + spec.text.2;
        assert_eq!((spec.batch, tokens), (1, 400));
        assert!(!spec.llm.tie_word_embeddings);
    }
}
