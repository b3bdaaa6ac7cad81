//! Projector training: examples from the dataset-adapter plugin, prompts from the
//! prompt-template plugin, audio through the frozen encoder (computed once per clip), the
//! projector as the only trainable parameters, caption-only loss, AdamW.

pub mod batch;
pub mod checkpoint;
pub mod optim;
pub mod plots;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::config::RunConfig;
use crate::models::llm::{load_llm_with, GgufBlocks, LoadedLlm, PrefixCache};
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::projector::Projector;
use crate::models::whisper::WhisperEncoder;
use crate::models::Runtime;
use crate::pipeline::clip::EncodeCounts;
use crate::pipeline::{
    build_manifest, mel_settings, open_dataset, prompt, ClipEncoder, Manifest, TextPieces,
};
use crate::plugins::{DatasetAdapter, PluginHost, PromptTemplate, PAGE_SIZE};
use batch::{caption_loss, BatchLoss};
use checkpoint::TrainState;
use optim::{AdamW, AdamWParams};

/// One training example ready for the loop.
pub struct Prepared {
    pub id: String,
    pub pieces: TextPieces,
    /// Frozen encoder output (1, 1500, d_enc).
    pub encoded: Tensor,
}

/// Everything a run needs, loaded and checked.
pub struct Session {
    pub config: RunConfig,
    pub rt: Runtime,
    pub llm: LoadedLlm,
    pub encoder: WhisperEncoder,
    pub examples: Vec<Prepared>,
    /// The held-out split (`data.eval-split`), if configured.
    pub eval_examples: Vec<Prepared>,
    pub manifest: Manifest,
    /// Clips that had to go through the encoder (not found in the cache).
    pub fresh_encodings: usize,
    /// What encoding both splits took: windows from the cache, mel and encoder runs.
    pub encode_counts: EncodeCounts,
    /// Prompt text before the audio, through the LLM once (see [`PrefixCache`]).
    pub prefixes: PrefixCache,
}

impl Session {
    /// Projected audio and caption loss of `examples`, as the training step and the eval
    /// compute them; `keep_graph` keeps the audio's graph back to the projector (training).
    fn batch_loss(
        &self,
        projector: &Projector,
        examples: &[&Prepared],
        keep_graph: bool,
    ) -> Result<(BatchLoss, Vec<TextPieces>, Vec<Tensor>)> {
        let pieces: Vec<TextPieces> = examples.iter().map(|e| e.pieces.clone()).collect();
        let audio: Vec<Tensor> = examples
            .iter()
            .map(|e| {
                let a = projector.forward(&e.encoded)?;
                Ok(if keep_graph { a } else { a.detach() })
            })
            .collect::<Result<_>>()?;
        let out = caption_loss(
            &self.llm.model,
            &pieces,
            &audio,
            Some(&self.prefixes),
            NonFiniteTrace::default(),
        )?;
        Ok((out, pieces, audio))
    }

    pub fn load(config: RunConfig) -> Result<Self> {
        Self::load_reporting(config, &mut |_| {})
    }

    /// [`Self::load`], reporting the encoding of each split's clips through `progress`.
    pub fn load_reporting(config: RunConfig, progress: &mut dyn FnMut(Event)) -> Result<Self> {
        let rt = Runtime::best_available();
        let encoder = WhisperEncoder::load_dir(&config.models.whisper, &rt)
            .with_context(|| format!("loading Whisper from {}", config.models.whisper.display()))?;
        // Training never decodes: the GGUF blocks kept for decoding would only take memory.
        let llm = load_llm_with(&config.models.llm, &rt, GgufBlocks::Skip)
            .with_context(|| format!("loading the LLM from {}", config.models.llm.display()))?;
        let host = PluginHost::new(config.plugins.sandbox, PluginHost::default_cache_dir());
        let mut template = PromptTemplate::load(&host, &config.plugins.prompt_template)?;
        let splits: Vec<&str> = std::iter::once(&config.data.train_split)
            .chain(&config.data.eval_split)
            .map(String::as_str)
            .collect();
        let mut adapter = open_dataset(&host, &config, &splits)?;
        let settings = mel_settings(&config, &encoder);
        let manifest = build_manifest(&config, &settings)?;
        let mut clips = ClipEncoder::with_default_cache(encoder, rt.clone(), settings, &manifest)?;
        let mut inputs = SplitInputs {
            adapter: &mut adapter,
            template: &mut template,
            llm: &llm,
            clips: &mut clips,
            config: &config,
        };
        let examples = inputs.load(&config.data.train_split, progress)?;
        let eval_examples = match &config.data.eval_split {
            Some(split) => inputs.load(split, progress)?,
            None => Vec::new(),
        };
        let ClipEncoder {
            encoder, counts, ..
        } = clips;
        Ok(Self {
            config,
            rt,
            llm,
            encoder,
            examples,
            eval_examples,
            manifest,
            fresh_encodings: counts.encoder_runs,
            encode_counts: counts,
            prefixes: PrefixCache::default(),
        })
    }
}

/// What turning a split into training examples needs.
struct SplitInputs<'a> {
    adapter: &'a mut DatasetAdapter,
    template: &'a mut PromptTemplate,
    llm: &'a LoadedLlm,
    clips: &'a mut ClipEncoder,
    config: &'a RunConfig,
}

impl SplitInputs<'_> {
    /// Every usable example of `split`: prompt and target tokens, encoder output. Examples
    /// without a target or whose audio fails are skipped with a warning.
    fn load(&mut self, split: &str, progress: &mut dyn FnMut(Event)) -> Result<Vec<Prepared>> {
        let config = self.config;
        let options = &config.plugins.prompt_options;
        // The split is listed first so that progress can say how much is left; what it
        // holds is far smaller than the encoder outputs kept for it below.
        let mut listed = Vec::new();
        let mut pages = self.adapter.pages(split, PAGE_SIZE);
        while let Some(page) = pages.next_page()? {
            listed.extend(page);
        }
        let total = listed.len();
        let mut examples = Vec::new();
        for (done, ex) in listed.into_iter().enumerate() {
            progress(Event::Progress {
                phase: format!("encoding {split}"),
                done,
                total,
            });
            let Some(target) = ex.target.clone() else {
                tracing::warn!("example {}: no target text; skipped", ex.id);
                continue;
            };
            let pieces = prompt::render(
                self.template,
                &self.llm.tokenizer,
                &ex.metadata,
                options,
                Some(&target),
            )?
            .pieces;
            if pieces.target.is_empty() {
                tracing::warn!("example {}: empty target; skipped", ex.id);
                continue;
            }
            let encoded = match self.clips.encode_example_first_window(
                &ex,
                &config.data.root,
                config.data.max_audio_s,
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
        progress(Event::Progress {
            phase: format!("encoding {split}"),
            done: total,
            total,
        });
        if examples.is_empty() {
            bail!(
                "split {split:?} of {} has no usable examples",
                config.data.root.display()
            );
        }
        Ok(examples)
    }
}

/// The order of the examples in `epoch`: a fixed shuffle for (seed, epoch), so the data
/// position is just the number of samples seen.
fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch,
    ));
    order
}

/// How a run starts.
pub enum Start {
    /// A new run; `overwrite` allows replacing an earlier run in the same folder.
    Fresh { overwrite: bool },
    /// From the newest checkpoint in the run directory; `allow_mismatch` skips the
    /// manifest check.
    Resume { allow_mismatch: bool },
}

/// Keeps the JSON lines of `path` whose "step" is at most `max_step`.
fn truncate_jsonl(path: &Path, max_step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= max_step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(path, kept)?;
    Ok(())
}

/// Token-weighted mean caption loss of the held-out examples (no gradients kept).
pub fn eval_loss(
    session: &Session,
    projector: &Projector,
    progress: &mut dyn FnMut(Event),
) -> Result<f64> {
    let (mut sum, mut tokens, mut done) = (0.0, 0usize, 0);
    let total = session.eval_examples.len();
    for chunk in session
        .eval_examples
        .chunks(session.config.train.batch_size.max(1))
    {
        let chunk: Vec<&Prepared> = chunk.iter().collect();
        let (out, ..) = session.batch_loss(projector, &chunk, false)?;
        sum += out.value()? * out.target_tokens as f64;
        tokens += out.target_tokens;
        done += chunk.len();
        progress(Event::Progress {
            phase: "evaluating".into(),
            done,
            total,
        });
    }
    Ok(sum / tokens.max(1) as f64)
}

/// The best eval loss so far, as recorded next to the best checkpoint.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Best {
    pub step: usize,
    pub eval_loss: f64,
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
    /// Passes over the training examples completed after this step (fractional).
    pub epoch: f64,
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

/// What the training loop reports as it goes (the CLI prints it through one printer).
pub enum Event<'a> {
    /// The loop starts at `from` (0, or the resumed step) and runs to `to`.
    Start {
        from: usize,
        to: usize,
    },
    Step(&'a StepMetrics),
    Eval {
        step: usize,
        loss: f64,
        examples: usize,
        best: bool,
    },
    /// Something the user should read (a warning, where the checkpoint went).
    Note(String),
    /// `done` of `total` items of a long phase (encoding a split's clips, an evaluation).
    Progress {
        phase: String,
        done: usize,
        total: usize,
    },
}

/// Why a training run ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stopped {
    /// It reached its last step.
    Finished,
    /// Ctrl-C.
    Interrupted,
    /// `train.early-stop-patience` evaluations in a row without a better eval loss.
    EarlyStop { evaluations: usize },
}

/// What a training run leaves: the projector, every step's metrics, why it ended, and the
/// best evaluation (when there is an eval split).
pub struct TrainOutcome {
    pub projector: Projector,
    pub metrics: Vec<StepMetrics>,
    pub stopped: Stopped,
    pub best: Option<Best>,
}

/// Trains the projector up to step `steps`; writes metrics.jsonl, eval.jsonl, plots
/// (loss.png, update_ratios.png), config.toml, checkpoints and projector.safetensors in the
/// run directory; returns what the run leaves (see [`TrainOutcome`]).
pub fn train(
    session: &Session,
    steps: usize,
    start: Start,
    interrupted: Option<Arc<AtomicBool>>,
    progress: &mut dyn FnMut(Event),
) -> Result<TrainOutcome> {
    let cfg = &session.config.train;
    let run_dir = &cfg.run_dir;
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let ckpt_dir = run_dir.join("checkpoints");
    let d_enc = session.encoder.config.d_model;
    let d_llm = session.llm.model.config.hidden_size;
    let projector = Projector::new(
        &session.config.projector,
        d_enc,
        d_llm,
        cfg.seed,
        &session.rt.device,
    )?;
    let mut opt = AdamW::new(
        projector.params().to_vec(),
        AdamWParams {
            lr: cfg.lr,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        },
    )?;
    let n = session.examples.len();
    let mut state = TrainState {
        step: 0,
        samples_seen: 0,
        optimizer_steps: 0,
        seed: cfg.seed,
        batch_size: cfg.batch_size,
        accumulate: cfg.accumulate,
        examples: n,
        manifest: session.manifest.clone(),
    };
    let metrics_path = run_dir.join("metrics.jsonl");
    if let Start::Resume { allow_mismatch } = &start {
        let allow_mismatch = *allow_mismatch;
        let Some(ckpt) = checkpoint::latest(&ckpt_dir)? else {
            bail!("--resume: no checkpoint in {}", ckpt_dir.display());
        };
        let loaded = checkpoint::load(&ckpt, &session.rt.device)?;
        let diff = loaded.state.manifest.differences(&session.manifest);
        if !diff.is_empty() && !allow_mismatch {
            bail!(
                "{}: trained against a different {}; refusing to resume (--allow-mismatch overrides)",
                ckpt.display(),
                diff.join(", ")
            );
        }
        if loaded.state.seed != cfg.seed
            || loaded.state.batch_size != cfg.batch_size
            || loaded.state.accumulate != cfg.accumulate
            || loaded.state.examples != n
        {
            bail!(
                "{}: seed/batch size/dataset size were {}/{}/{}, now {}/{}/{}: the data order would differ",
                ckpt.display(),
                loaded.state.seed,
                loaded.state.batch_size,
                loaded.state.examples,
                cfg.seed,
                cfg.batch_size,
                n
            );
        }
        for (name, var) in projector.params() {
            let t = loaded
                .projector
                .get(name)
                .with_context(|| format!("{}: no tensor {name}", ckpt.display()))?;
            var.set(t)?;
        }
        opt.restore(&loaded.optimizer, loaded.state.optimizer_steps)?;
        state = loaded.state;
        state.manifest = session.manifest.clone();
        // Keep the records of the steps the checkpoint covers, drop any written after it.
        truncate_jsonl(&metrics_path, state.step)?;
        truncate_jsonl(&run_dir.join("eval.jsonl"), state.step)?;
        tracing::info!("resumed from {} at step {}", ckpt.display(), state.step);
    } else {
        // A fresh run: nothing of an earlier run in this folder may mix with it, and an
        // earlier run is never deleted unless asked to.
        let earlier = ["metrics.jsonl", "checkpoints"]
            .iter()
            .any(|f| run_dir.join(f).exists());
        if earlier && !matches!(start, Start::Fresh { overwrite: true }) {
            bail!(
                "{} already holds a run; continue it with --resume, or replace it with --overwrite",
                run_dir.display()
            );
        }
        for f in [
            "metrics.jsonl",
            "eval.jsonl",
            "best.json",
            "loss.png",
            "update_ratios.png",
        ] {
            let p = run_dir.join(f);
            if p.exists() {
                std::fs::remove_file(&p)?;
            }
        }
        for d in ["best", "checkpoints"] {
            let p = run_dir.join(d);
            if p.exists() {
                std::fs::remove_dir_all(&p)?;
            }
        }
    }
    // The settings this run trains with, for `earshot compare` and for the record.
    let config_tmp = run_dir.join("config.toml.tmp");
    std::fs::write(&config_tmp, toml::to_string(&session.config)?)?;
    std::fs::rename(&config_tmp, run_dir.join("config.toml"))?;
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)?;
    let refresh_plots = |progress: &mut dyn FnMut(Event)| {
        if let Err(e) = plots::write_run_plots(run_dir) {
            progress(Event::Note(format!(
                "warning: cannot draw the plots: {e:#}"
            )));
        }
    };
    // Projector, optimizer state and position into a checkpoint folder under `dir`.
    let save_checkpoint = |dir: &Path,
                           keep: usize,
                           state: &TrainState,
                           projector: &Projector,
                           opt: &AdamW|
     -> Result<PathBuf> {
        let p: HashMap<String, Tensor> = projector
            .params()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let (o, t) = opt.state();
        let mut st = state.clone();
        st.optimizer_steps = t;
        checkpoint::save(dir, &st, &p, &o, keep)
    };
    let best_path = run_dir.join("best.json");
    let mut best: Option<Best> = std::fs::read_to_string(&best_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(|b: &Best| b.step <= state.step);
    let mut eval_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join("eval.jsonl"))?;
    let mut orders: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut all = Vec::new();
    let mut nonfinite_run = 0;
    let mut evals_without_improvement = 0;
    let mut stopped = Stopped::Finished;
    progress(Event::Start {
        from: state.step,
        to: steps,
    });
    while state.step < steps {
        let step = state.step + 1;
        let started = Instant::now();
        let bs = cfg.batch_size.min(n);
        let micro = cfg.accumulate.max(1);
        let lr = cfg.lr_at(step);
        let mut summed: Option<candle_core::backprop::GradStore> = None;
        let (mut loss, mut accuracy, mut mean_prob) = (0.0, 0.0, 0.0);
        let mut last_inputs = None;
        for mb in 0..micro {
            let first = state.samples_seen + (mb * bs) as u64;
            let batch: Vec<usize> = (0..bs as u64)
                .map(|k| {
                    let c = first + k;
                    let (epoch, i) = (c / n as u64, (c % n as u64) as usize);
                    orders
                        .entry(epoch)
                        .or_insert_with(|| epoch_order(cfg.seed, epoch, n))[i]
                })
                .collect();
            let examples: Vec<&Prepared> = batch.iter().map(|&i| &session.examples[i]).collect();
            let (out, pieces, audio) = session.batch_loss(&projector, &examples, true)?;
            loss += out.value()? / micro as f64;
            accuracy += out.accuracy / micro as f64;
            mean_prob += out.mean_prob / micro as f64;
            // Mean over micro-batches: each contributes 1/micro of the gradient.
            let g = (&out.loss / micro as f64)?.backward()?;
            summed = Some(match summed {
                None => g,
                Some(mut acc) => {
                    for (name, var) in projector.params() {
                        let a = acc.remove(var.as_tensor());
                        let b = g.get(var.as_tensor()).with_context(|| {
                            format!("projector parameter {name} received no gradient")
                        })?;
                        acc.insert(
                            var.as_tensor(),
                            match a {
                                Some(a) => (a + b)?,
                                None => b.clone(),
                            },
                        );
                    }
                    acc
                }
            });
            last_inputs = Some((pieces, audio));
        }
        orders.retain(|&e, _| e + 1 >= state.samples_seen / n as u64);
        let grads = summed.expect("at least one micro-batch");
        let (pieces, audio) = last_inputs.expect("at least one micro-batch");
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
            progress(Event::Note(format!(
                "warning: step {step}: non-finite loss or gradient; step skipped"
            )));
            if nonfinite_run >= cfg.max_nonfinite_steps {
                // Name the first layer that produces non-finite values, in the forward or
                // else in the backward.
                let trace = caption_loss(
                    &session.llm.model,
                    &pieces,
                    &audio,
                    None,
                    NonFiniteTrace::on(),
                )
                .map_err(anyhow::Error::from)
                .and_then(|out| Ok(out.loss.backward()?))
                .err();
                bail!(
                    "{nonfinite_run} steps in a row with non-finite loss or gradients; stopping{}",
                    trace.map(|e| format!(" ({e})")).unwrap_or_default()
                );
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
            let before: Vec<Tensor> = projector
                .params()
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<Result<_, _>>()?;
            opt.step(&grads, lr)?;
            for ((name, var), old) in projector.params().iter().zip(&before) {
                let delta = sq_norm(&(var.as_tensor() - old)?)?.sqrt();
                // Against the larger of the old and new norms: a tensor initialised to zero
                // (a LayerNorm bias) would otherwise report an infinite first ratio.
                let norm = sq_norm(old)?
                    .sqrt()
                    .max(sq_norm(var.as_tensor())?.sqrt())
                    .max(1e-12);
                update.insert(name.clone(), (delta / norm).max(1e-30).log10());
            }
        }
        state.step = step;
        state.samples_seen += (bs * micro) as u64;
        let m = StepMetrics {
            step,
            loss,
            accuracy,
            mean_prob,
            grad_norm,
            lr,
            epoch: state.samples_seen as f64 / n as f64,
            examples_per_s: (bs * micro) as f64 / started.elapsed().as_secs_f64(),
            update_ratio_log10: update,
            skipped,
        };
        writeln!(metrics_file, "{}", serde_json::to_string(&m)?)?;
        progress(Event::Step(&m));
        all.push(m);
        let due = step == steps || (cfg.eval_every > 0 && step % cfg.eval_every == 0);
        if !session.eval_examples.is_empty() && due {
            let eval = eval_loss(session, &projector, progress)?;
            writeln!(
                eval_file,
                "{}",
                serde_json::json!({"step": step, "eval_loss": eval})
            )?;
            let is_best = eval.is_finite() && best.is_none_or(|b| eval < b.eval_loss);
            progress(Event::Eval {
                step,
                loss: eval,
                examples: session.eval_examples.len(),
                best: is_best,
            });
            evals_without_improvement = if is_best {
                0
            } else {
                evals_without_improvement + 1
            };
            if cfg.early_stop_patience > 0 && evals_without_improvement >= cfg.early_stop_patience {
                stopped = Stopped::EarlyStop {
                    evaluations: evals_without_improvement,
                };
            }
            if is_best {
                save_checkpoint(&run_dir.join("best"), 1, &state, &projector, &opt)?;
                let b = Best {
                    step,
                    eval_loss: eval,
                };
                let tmp = run_dir.join("best.json.tmp");
                std::fs::write(&tmp, serde_json::to_string(&b)?)?;
                std::fs::rename(&tmp, &best_path)?;
                best = Some(b);
            }
            refresh_plots(progress);
        }
        if interrupted
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
        {
            stopped = Stopped::Interrupted;
        }
        let stop = stopped != Stopped::Finished;
        if stop || step == steps || (cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0) {
            metrics_file.sync_all()?;
            let p = save_checkpoint(&ckpt_dir, cfg.keep_last, &state, &projector, &opt)?;
            tracing::info!("checkpoint {}", p.display());
            if session.eval_examples.is_empty() {
                refresh_plots(progress);
            }
        }
        match stopped {
            Stopped::Finished => {}
            Stopped::Interrupted => {
                progress(Event::Note(format!(
                    "interrupted: checkpoint saved at step {step}; continue with --resume"
                )));
                break;
            }
            Stopped::EarlyStop { evaluations } => {
                progress(Event::Note(format!(
                    "stopping early at step {step}: the eval loss has not improved for \
                     {evaluations} evaluation(s) (train.early-stop-patience)"
                )));
                break;
            }
        }
    }
    projector.save(&run_dir.join("projector.safetensors"))?;
    Ok(TrainOutcome {
        projector,
        metrics: all,
        stopped,
        best,
    })
}
