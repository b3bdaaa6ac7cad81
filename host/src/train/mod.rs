//! Projector training: examples from the dataset-adapter plugin, prompts from the
//! prompt-template plugin, audio through the frozen encoder (computed once per clip), the
//! projector as the only trainable parameters, caption-only loss, AdamW.

pub mod batch;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::audio::{self, Segment};
use crate::config::RunConfig;
use crate::mel::{LogMelExtractor, MelSettings, N_FRAMES};
use crate::models::llm::{load_llm, LoadedLlm};
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::projector::Projector;
use crate::models::whisper::WhisperEncoder;
use crate::models::Runtime;
use crate::plugins::{AudioSource, DatasetAdapter, Example, PluginHost, PromptTemplate};
use batch::{caption_loss, TextPieces};

/// One training example ready for the loop.
pub struct Prepared {
    pub id: String,
    pub pieces: TextPieces,
    /// Frozen encoder output (1, 1500, d_enc).
    pub encoded: Tensor,
}

/// A dataset path from an (untrusted) adapter, resolved under `root` or refused.
pub fn resolve_audio(root: &Path, rel: &str) -> Result<PathBuf> {
    let p = Path::new(rel);
    if p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        bail!("audio path {rel:?} from the dataset adapter leaves the dataset root; refused");
    }
    Ok(root.join(p))
}

/// Decodes and encodes an example's audio: (1, 1500, d_enc). Clips longer than 30 s use
/// their first window (with a warning).
pub fn encode_example(
    ex: &Example,
    root: &Path,
    encoder: &WhisperEncoder,
    mel: &mut LogMelExtractor,
    settings: &MelSettings,
    rt: &Runtime,
) -> Result<Tensor> {
    let segment = Segment {
        start: ex.start_s,
        end: ex.end_s,
    };
    let samples = match &ex.audio {
        AudioSource::Path(rel) => audio::load_16k_mono(&resolve_audio(root, rel)?, segment)?,
        AudioSource::Inline(bytes) => {
            let tmp = tempfile::NamedTempFile::new()?;
            std::fs::write(tmp.path(), bytes)?;
            audio::load_16k_mono(tmp.path(), segment)
                .with_context(|| format!("example {}: inline audio", ex.id))?
        }
    };
    let (n, data) = mel.windows(&samples, settings)?;
    if n > 1 {
        tracing::warn!(
            "example {}: {:.1} s of audio; training uses the first 30 s",
            ex.id,
            samples.len() as f64 / 16000.0
        );
    }
    let x = Tensor::from_slice(
        &data[..settings.n_mels * N_FRAMES],
        (1, settings.n_mels, N_FRAMES),
        &rt.device,
    )?;
    Ok(encoder.forward(&x, NonFiniteTrace::default())?)
}

/// Everything a run needs, loaded and checked.
pub struct Session {
    pub config: RunConfig,
    pub rt: Runtime,
    pub llm: LoadedLlm,
    pub encoder: WhisperEncoder,
    pub examples: Vec<Prepared>,
}

impl Session {
    pub fn load(config: RunConfig) -> Result<Self> {
        let rt = Runtime::best_available();
        let encoder = WhisperEncoder::load_dir(&config.models.whisper, &rt)
            .with_context(|| format!("loading Whisper from {}", config.models.whisper.display()))?;
        let llm = load_llm(&config.models.llm, &rt)
            .with_context(|| format!("loading the LLM from {}", config.models.llm.display()))?;
        let host = PluginHost::new(config.plugins.sandbox, PluginHost::default_cache_dir());
        let mut template = PromptTemplate::load(&host, &config.plugins.prompt_template)?;
        let mut adapter = DatasetAdapter::open(
            &host,
            &config.data.adapter,
            &config.data.root,
            &config.data.options,
        )?;
        for w in &adapter.dataset.warnings {
            tracing::warn!("dataset: {w}");
        }
        let split = &config.data.train_split;
        if !adapter.dataset.splits.contains(split) {
            bail!(
                "{}: no split {split:?} (have: {})",
                config.data.root.display(),
                adapter.dataset.splits.join(", ")
            );
        }
        let settings = MelSettings {
            n_mels: encoder.config.num_mel_bins,
            padding: config.mel.padding,
            window_hop_s: 30.0,
        };
        let mut mel = LogMelExtractor::new(settings.n_mels)?;
        let mut examples = Vec::new();
        let mut pos = 0;
        loop {
            let b = adapter.read(split, pos, 256)?;
            for ex in b.examples {
                let Some(target) = ex.target.clone() else {
                    tracing::warn!("example {}: no target text; skipped", ex.id);
                    continue;
                };
                let prompt = template.render(&ex.metadata, &config.plugins.prompt_options)?;
                let target = template.format_target(
                    &target,
                    &ex.metadata,
                    &config.plugins.prompt_options,
                )?;
                let tok = &llm.tokenizer;
                let pieces = TextPieces {
                    before: tok.encode(&prompt.before_audio)?,
                    after: tok.encode_piece(&prompt.after_audio)?,
                    target: tok.encode_piece(&target)?,
                };
                if pieces.target.is_empty() {
                    tracing::warn!("example {}: empty target; skipped", ex.id);
                    continue;
                }
                let encoded = match encode_example(
                    &ex,
                    &config.data.root,
                    &encoder,
                    &mut mel,
                    &settings,
                    &rt,
                ) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!("example {}: {e:#}; skipped", ex.id);
                        continue;
                    }
                };
                examples.push(Prepared {
                    id: ex.id,
                    pieces,
                    encoded,
                });
            }
            match b.next {
                Some(n) => pos = n,
                None => break,
            }
        }
        if examples.is_empty() {
            bail!(
                "split {split:?} of {} has no usable examples",
                config.data.root.display()
            );
        }
        Ok(Self {
            config,
            rt,
            llm,
            encoder,
            examples,
        })
    }
}

/// Metrics of one optimisation step (one JSON line in `metrics.jsonl`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub mean_prob: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub examples_per_s: f64,
    /// log10(||delta w|| / ||w||) per parameter tensor.
    pub update_ratio_log10: HashMap<String, f64>,
    pub skipped: bool,
}

fn sq_norm(t: &Tensor) -> Result<f64> {
    Ok(t.sqr()?
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?)
}

/// Trains the projector for `steps`; writes metrics.jsonl and projector.safetensors in the
/// run directory; returns the per-step metrics.
pub fn train(
    session: &Session,
    steps: usize,
    progress: &mut dyn FnMut(&StepMetrics),
) -> Result<(Projector, Vec<StepMetrics>)> {
    let cfg = &session.config.train;
    std::fs::create_dir_all(&cfg.run_dir)
        .with_context(|| format!("creating {}", cfg.run_dir.display()))?;
    let d_enc = session.encoder.config.d_model;
    let d_llm = session.llm.model.config.hidden_size;
    let projector = Projector::new(
        &session.config.projector,
        d_enc,
        d_llm,
        cfg.seed,
        &session.rt.device,
    )?;
    let vars: Vec<Var> = projector.params().iter().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        },
    )?;
    let mut metrics_file = std::fs::File::create(cfg.run_dir.join("metrics.jsonl"))?;
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = Vec::new();
    let mut all = Vec::with_capacity(steps);
    let mut nonfinite_run = 0;
    for step in 1..=steps {
        let started = Instant::now();
        let mut batch = Vec::with_capacity(cfg.batch_size);
        while batch.len() < cfg.batch_size.min(session.examples.len()) {
            if order.is_empty() {
                order = (0..session.examples.len()).collect();
                order.shuffle(&mut rng);
            }
            batch.push(order.pop().expect("refilled"));
        }
        let pieces: Vec<TextPieces> = batch
            .iter()
            .map(|&i| session.examples[i].pieces.clone())
            .collect();
        let audio: Vec<Tensor> = batch
            .iter()
            .map(|&i| projector.forward(&session.examples[i].encoded))
            .collect::<Result<_, _>>()?;
        let out = caption_loss(
            &session.llm.model,
            &pieces,
            &audio,
            NonFiniteTrace::default(),
        )?;
        let loss = out
            .loss
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        let grads = out.loss.backward()?;
        let mut grad_sq = 0.0;
        for (name, var) in projector.params() {
            let g = grads
                .get(var.as_tensor())
                .with_context(|| format!("projector parameter {name} received no gradient"))?;
            grad_sq += sq_norm(g)?;
        }
        let grad_norm = grad_sq.sqrt();
        let skipped = !loss.is_finite() || !grad_norm.is_finite();
        let mut update = HashMap::new();
        if skipped {
            nonfinite_run += 1;
            tracing::warn!("step {step}: non-finite loss or gradient; step skipped");
            if nonfinite_run >= cfg.max_nonfinite_steps {
                bail!("{nonfinite_run} steps in a row with non-finite loss or gradients; stopping");
            }
        } else {
            nonfinite_run = 0;
            let mut grads = grads;
            if cfg.grad_clip > 0.0 && grad_norm > cfg.grad_clip {
                let scale = cfg.grad_clip / grad_norm;
                for (_, var) in projector.params() {
                    let g = grads.remove(var.as_tensor()).expect("checked above");
                    grads.insert(var.as_tensor(), (g * scale)?);
                }
            }
            let before: Vec<Tensor> = vars
                .iter()
                .map(|v| v.as_tensor().copy())
                .collect::<Result<_, _>>()?;
            opt.step(&grads)?;
            for ((name, var), old) in projector.params().iter().zip(&before) {
                let delta = sq_norm(&(var.as_tensor() - old)?)?.sqrt();
                let norm = sq_norm(old)?.sqrt().max(1e-12);
                update.insert(name.clone(), (delta / norm).max(1e-30).log10());
            }
        }
        let m = StepMetrics {
            step,
            loss,
            accuracy: out.accuracy,
            mean_prob: out.mean_prob,
            grad_norm,
            lr: cfg.lr,
            examples_per_s: batch.len() as f64 / started.elapsed().as_secs_f64(),
            update_ratio_log10: update,
            skipped,
        };
        writeln!(metrics_file, "{}", serde_json::to_string(&m)?)?;
        progress(&m);
        all.push(m);
    }
    metrics_file.sync_all()?;
    projector.save(&cfg.run_dir.join("projector.safetensors"))?;
    Ok((projector, all))
}
