//! Projector training: examples from the dataset-adapter plugin, prompts from the
//! prompt-template plugin, audio through the frozen encoder (computed once per clip), the
//! projector as the only trainable parameters, caption-only loss, AdamW.

pub mod checkpoint;
pub mod error;
pub mod optim;
pub mod plots;
pub mod run_dir;
pub mod trainer;

pub use error::{Result, TrainError};
pub use run_dir::RunDir;
pub use trainer::Trainer;

use std::collections::HashMap;
use std::io::Write;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::Tensor;

use crate::config::{BadExamples, LeakPolicy, RunConfig};
use crate::dist::World;
use crate::models::llm::{GgufBlocks, LoadedLlm, PrefixCache};
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::projector::Projector;
use crate::models::whisper::WhisperEncoder;
use crate::models::Runtime;
use crate::pipeline::audit::{AuditOptions, AuditReport, LeakFinder};
use crate::pipeline::clip::EncodeCounts;
use crate::pipeline::loss::{caption_loss, BatchLoss};
use crate::pipeline::{
    attach_lora, build_manifest, load_models, mel_settings, open_dataset, prompt, ClipEncoder,
    Manifest, TextPieces,
};
use crate::plugins::{DatasetAdapter, Example, PluginHost, PromptTemplate, PAGE_SIZE};
use error::io;

/// One training example ready for the loop.
#[derive(Clone)]
pub struct Prepared {
    pub id: String,
    pub pieces: TextPieces,
    /// Frozen encoder output (1, frames, d_enc): 1500 frames for a full window.
    pub encoded: Tensor,
}

/// Everything a run needs, loaded and checked.
pub struct Session {
    pub config: RunConfig,
    pub rt: Runtime,
    pub llm: LoadedLlm,
    pub encoder: WhisperEncoder,
    pub examples: Vec<Prepared>,
    /// The validation split (`data.valid-split`), if configured: eval loss, early stopping,
    /// `best/`.
    pub eval_examples: Vec<Prepared>,
    pub manifest: Manifest,
    /// Clips that had to go through the encoder (not found in the cache).
    pub fresh_encodings: usize,
    /// What encoding both splits took: windows from the cache, mel and encoder runs.
    pub encode_counts: EncodeCounts,
    /// Prompt text before the audio, through the LLM once (see [`PrefixCache`]).
    pub prefixes: PrefixCache,
    /// Examples of both splits left out, by cause.
    pub skipped: Skipped,
    /// The tasks trained together (one without `[[task]]`): where each one's examples sit.
    pub tasks: Vec<TaskSpan>,
}

/// One task's place in a session's examples.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpan {
    pub name: String,
    /// Share of the training samples drawn from it, relative to the other tasks'.
    pub weight: f64,
    /// Its examples in [`Session::examples`] and [`Session::eval_examples`].
    pub train: std::ops::Range<usize>,
    pub valid: std::ops::Range<usize>,
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
        // With LoRA the prompt prefix's keys and values depend on the adapters being
        // trained: it goes through the LLM with the rest (its gradient counts), uncached.
        let prefixes = self.llm.model.adapter().is_none().then_some(&self.prefixes);
        let out = caption_loss(
            &self.llm.model,
            &pieces,
            &audio,
            prefixes,
            NonFiniteTrace::default(),
        )?;
        Ok((out, pieces, audio))
    }

    pub fn load(config: RunConfig) -> Result<Self> {
        Self::load_reporting(config, &mut |_| {})
    }

    /// [`Self::load`], reporting the encoding of each split's clips through `progress`.
    pub fn load_reporting(config: RunConfig, progress: &mut dyn FnMut(Event)) -> Result<Self> {
        Self::load_sharded(config, &World::single(), progress)
    }

    /// [`Self::load_reporting`] on each rank of a data-parallel job: each rank first encodes
    /// its share of every split's clips into the shared encoder cache, then (after every rank
    /// has) reads the rest from it, so a split is encoded once, in parallel. Without an
    /// encoder cache, or on one rank, every clip is encoded here.
    pub fn load_sharded(
        config: RunConfig,
        world: &World,
        progress: &mut dyn FnMut(Event),
    ) -> Result<Self> {
        // Training never decodes: the GGUF blocks kept for decoding would only take memory.
        let (rt, encoder, mut llm) = load_models(&config, GgufBlocks::Skip)?;
        attach_lora(&config, &mut llm, &rt.device)?;
        let host = PluginHost::new(config.plugins.sandbox, PluginHost::default_cache_dir());
        let settings = mel_settings(&config, &encoder);
        let manifest = build_manifest(&config, &settings)?;
        let mut clips = ClipEncoder::with_default_cache(
            encoder,
            rt.clone(),
            settings,
            &manifest.encoder_identity(),
        )?;
        let mut examples = Vec::new();
        let mut eval_examples = Vec::new();
        let mut spans = Vec::new();
        let mut skipped = Skipped::default();
        // Each task with its own adapter, template options and leak check: a task's splits
        // are compared with each other (tasks share no split).
        for task in config.tasks()? {
            let task_config = &task.config;
            let mut template = PromptTemplate::load(&host, &task_config.plugins.prompt_template)?;
            let splits = task_config.data.run_splits();
            let mut adapter = open_dataset(&host, task_config, &splits)?;
            let mut inputs = SplitInputs {
                world,
                adapter: &mut adapter,
                template: &mut template,
                llm: &llm,
                clips: &mut clips,
                config: task_config,
                // Progress names the task when there are several.
                label: if config.is_multi_task() {
                    format!("{} ", task.name)
                } else {
                    String::new()
                },
                skipped: Skipped::default(),
                leaks: (task_config.data.leaks != LeakPolicy::Ignore).then(|| {
                    LeakFinder::new(AuditOptions {
                        decoded: false,
                        text_targets: task_config.data.text_targets,
                        max_audio_s: task_config.data.max_audio_s,
                    })
                }),
            };
            let train = inputs.load(&task_config.data.train_split, progress)?;
            let valid = match &task_config.data.valid_split {
                // The training split as its own eval (overfitting checks): the same examples.
                Some(split) if split == &task_config.data.train_split => train.clone(),
                Some(split) => inputs.load(split, progress)?,
                None => Vec::new(),
            };
            // The test split is not trained or chosen on: listed only, for the leak check
            // (an example over a bound there is eval's business, not training's).
            let data = &task_config.data;
            let test_only = data
                .test_split
                .as_deref()
                .filter(|t| *t != data.train_split && Some(*t) != data.valid_split.as_deref());
            if let Some(test) = test_only.filter(|_| inputs.leaks.is_some()) {
                inputs.list(test, false)?;
            }
            skipped.over_bound += inputs.skipped.over_bound;
            skipped.other += inputs.skipped.other;
            if let Some(report) = inputs.leaks.take().map(LeakFinder::finish) {
                check_leaks(&report, data.leaks)?;
            }
            spans.push(TaskSpan {
                name: task.name,
                weight: task.weight,
                train: examples.len()..examples.len() + train.len(),
                valid: eval_examples.len()..eval_examples.len() + valid.len(),
            });
            examples.extend(train);
            eval_examples.extend(valid);
        }
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
            skipped,
            prefixes: PrefixCache::default(),
            tasks: spans,
        })
    }
}

/// What turning a split into training examples needs.
struct SplitInputs<'a> {
    /// The ranks that share the encoding of each split (one without a launcher).
    world: &'a World,
    adapter: &'a mut DatasetAdapter,
    template: &'a mut PromptTemplate,
    llm: &'a LoadedLlm,
    clips: &'a mut ClipEncoder,
    config: &'a RunConfig,
    /// What progress lines put before the split's name: the task's name and a space in a
    /// multi-task run, else nothing.
    label: String,
    skipped: Skipped,
    /// The splits compared as they are listed (audio bytes and, with data.text-targets,
    /// normalised targets; no decoding beyond what training does).
    leaks: Option<LeakFinder>,
}

/// The start-of-training leak check: a warning naming the count and the first offender, or
/// under `data.leaks = "refuse"` an error.
fn check_leaks(report: &AuditReport, policy: LeakPolicy) -> Result<()> {
    let leaking = report.leaking();
    let Some(first) = report.first.first() else {
        return Ok(());
    };
    let summary = format!(
        "{leaking} example(s) share content with an earlier split of the run (first: \
         {} example {} has {} as {} example {}); `earshot dataset audit` lists them",
        first.split,
        first.id,
        first.shared.describe(),
        first.with_split,
        first.with_id
    );
    match policy {
        LeakPolicy::Refuse => Err(TrainError::Leaks(summary)),
        _ => {
            tracing::warn!("{summary}; figures on such a split overstate what the model hears");
            Ok(())
        }
    }
}

/// Examples left out of training, both splits together (each with a warning in the log).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Returned by the adapter over a per-example bound (see `data.bad-examples`).
    pub over_bound: usize,
    /// No or empty target, or audio that could not be decoded or encoded.
    pub other: usize,
}

impl SplitInputs<'_> {
    /// Every example of `split` the adapter returns within its bounds (the others are
    /// skipped or refused, by `data.bad-examples`), compared with the earlier splits.
    /// `trained`: the split is trained or evaluated on (a bad example counts as skipped).
    fn list(&mut self, split: &str, trained: bool) -> Result<Vec<Example>> {
        let config = self.config;
        // The split is listed first so that progress can say how much is left; what it
        // holds is far smaller than the encoder outputs kept for it below.
        let mut listed = Vec::new();
        let mut pages = self.adapter.pages(split, PAGE_SIZE);
        while let Some(page) = pages.next_page()? {
            for ex in page {
                match ex {
                    Ok(ex) => listed.push(ex),
                    Err(bad) if !trained => {
                        tracing::debug!("{split}: {bad} (not trained on)");
                    }
                    Err(bad) if config.data.bad_examples == BadExamples::Refuse => {
                        return Err(TrainError::BadExample {
                            split: split.to_string(),
                            bad,
                        });
                    }
                    Err(bad) => {
                        tracing::warn!("{bad}; skipped");
                        self.skipped.over_bound += 1;
                    }
                }
            }
        }
        if let Some(finder) = self.leaks.as_mut() {
            finder.begin_split(split);
            for ex in &listed {
                finder.add(ex, &config.data.root);
            }
        }
        Ok(listed)
    }

    /// With several ranks and an encoder cache: this rank encodes its share of `listed`
    /// (every size-th clip from its rank) into the cache, then waits for the others. A clip
    /// that fails is left for the pass that follows to report.
    fn encode_share(&mut self, split: &str, listed: &[Example], progress: &mut dyn FnMut(Event)) {
        let (rank, size) = (self.world.rank(), self.world.size());
        if size < 2 || !self.clips.has_cache() {
            return;
        }
        let config = self.config;
        let mine: Vec<&Example> = listed.iter().skip(rank).step_by(size).collect();
        let phase = format!("encoding {}{split} (this rank's share)", self.label);
        for (done, ex) in mine.iter().enumerate() {
            progress(Event::Progress {
                phase: phase.clone(),
                done,
                total: mine.len(),
            });
            let _ = self.clips.encode_example_first_window(
                ex,
                &config.data.root,
                config.data.max_audio_s,
            );
        }
        progress(Event::Progress {
            phase,
            done: mine.len(),
            total: mine.len(),
        });
        self.world.barrier();
    }

    /// Every usable example of `split`: prompt and target tokens, encoder output. Examples
    /// without a target or whose audio fails are skipped with a warning.
    fn load(&mut self, split: &str, progress: &mut dyn FnMut(Event)) -> Result<Vec<Prepared>> {
        let config = self.config;
        let options = &config.plugins.prompt_options;
        let listed = self.list(split, true)?;
        let total = listed.len();
        self.encode_share(split, &listed, progress);
        let mut examples = Vec::new();
        for (done, ex) in listed.into_iter().enumerate() {
            progress(Event::Progress {
                phase: format!("encoding {}{split}", self.label),
                done,
                total,
            });
            let Some(target) = ex.target.clone() else {
                tracing::warn!("example {}: no target text; skipped", ex.id);
                self.skipped.other += 1;
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
                self.skipped.other += 1;
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
                    self.skipped.other += 1;
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
            phase: format!("encoding {}{split}", self.label),
            done: total,
            total,
        });
        if examples.is_empty() {
            return Err(TrainError::NoUsableExamples {
                split: split.to_string(),
                root: config.data.root.clone(),
            });
        }
        Ok(examples)
    }
}

/// How a run starts.
pub enum Start {
    /// A new run; `overwrite` allows replacing an earlier run in the same folder.
    Fresh { overwrite: bool },
    /// From the newest checkpoint in the run directory; `allow_mismatch` skips the
    /// manifest check.
    Resume { allow_mismatch: bool },
}

/// The held-out caption loss (no gradients kept): token-weighted within a task, then the
/// mean over the tasks that have held-out examples, so that a task with long targets
/// (transcription) does not outweigh the others by its token count. One task: its loss.
pub fn eval_loss(
    session: &Session,
    projector: &Projector,
    progress: &mut dyn FnMut(Event),
) -> Result<f64> {
    Ok(eval_losses(session, projector, progress)?.0)
}

/// [`eval_loss`] and each task's own (name, loss), for the tasks with held-out examples.
pub fn eval_losses(
    session: &Session,
    projector: &Projector,
    progress: &mut dyn FnMut(Event),
) -> Result<(f64, Vec<(String, f64)>)> {
    let total = session.eval_examples.len();
    let mut done = 0;
    let mut per_task = Vec::new();
    for task in &session.tasks {
        let (mut sum, mut tokens) = (0.0, 0usize);
        let examples = &session.eval_examples[task.valid.clone()];
        if examples.is_empty() {
            continue;
        }
        for chunk in examples.chunks(session.config.train.batch_size.max(1)) {
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
        per_task.push((task.name.clone(), sum / tokens.max(1) as f64));
    }
    let mean = per_task.iter().map(|(_, l)| l).sum::<f64>() / per_task.len().max(1) as f64;
    Ok((mean, per_task))
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
        /// The mean of the tasks' losses (one task: its loss).
        loss: f64,
        examples: usize,
        best: bool,
        /// Each task's loss (name, loss), for the tasks with held-out examples.
        tasks: &'a [(String, f64)],
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
/// best evaluation (when there is a validation split).
pub struct TrainOutcome {
    pub projector: Projector,
    pub metrics: Vec<StepMetrics>,
    pub stopped: Stopped,
    pub best: Option<Best>,
}

/// Trains the projector up to step `steps`; writes metrics.jsonl, eval.jsonl, plots
/// (loss.png, update_ratios.png), config.toml, checkpoints and projector.safetensors in the
/// run directory; returns what the run leaves (see [`TrainOutcome`]). With several ranks
/// (`world`), every rank runs the same steps on its share of each batch; rank 0 alone
/// evaluates and writes, and its decisions to stop reach the others.
pub fn train(
    session: &Session,
    world: &World,
    steps: usize,
    start: Start,
    interrupted: Option<Arc<AtomicBool>>,
    progress: &mut dyn FnMut(Event),
) -> Result<TrainOutcome> {
    let cfg = &session.config.train;
    let root = world.is_root();
    let run = RunDir::create(&cfg.run_dir)?;
    let mut trainer = Trainer::new(session, world, &run, &start)?;
    let mut records = if root {
        run.write_config(&session.config)?;
        Some((
            run.append("metrics.jsonl")?,
            Evaluations {
                file: run.append("eval.jsonl")?,
                best: run.best(trainer.state.step),
                without_improvement: 0,
            },
        ))
    } else {
        None
    };
    let mut all = Vec::new();
    let mut stopped = Stopped::Finished;
    progress(Event::Start {
        from: trainer.state.step,
        to: steps,
    });
    while trainer.state.step < steps {
        world.step(trainer.state.step + 1);
        let m = trainer.step(progress)?;
        let step = m.step;
        if let Some((metrics_file, _)) = records.as_mut() {
            writeln!(metrics_file, "{}", run_dir::json(&m))
                .map_err(io(&run.path, "cannot write metrics.jsonl"))?;
        }
        progress(Event::Step(&m));
        all.push(m);
        let due = step == steps || (cfg.eval_every > 0 && step % cfg.eval_every == 0);
        if let Some((_, evals)) = records.as_mut().filter(|_| due) {
            if !session.eval_examples.is_empty() {
                evals.run(&trainer, &run, progress)?;
                if cfg.early_stop_patience > 0
                    && evals.without_improvement >= cfg.early_stop_patience
                {
                    stopped = Stopped::EarlyStop {
                        evaluations: evals.without_improvement,
                    };
                }
            }
        }
        if interrupted
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
            && stopped == Stopped::Finished
        {
            stopped = Stopped::Interrupted;
        }
        // Rank 0 decides (it alone evaluates) and every rank stops at the same step, or the
        // others would wait for it forever; rank 0 reports why.
        if world.size() > 1 {
            let root_stops = world.root_says(stopped != Stopped::Finished);
            if !root {
                stopped = if root_stops {
                    Stopped::Interrupted
                } else {
                    Stopped::Finished
                };
            }
        }
        let stop = stopped != Stopped::Finished;
        let checkpoint =
            stop || step == steps || (cfg.checkpoint_every > 0 && step % cfg.checkpoint_every == 0);
        if let Some((metrics_file, _)) = records.as_mut().filter(|_| checkpoint) {
            metrics_file
                .sync_all()
                .map_err(io(&run.path, "cannot write metrics.jsonl"))?;
            let p = trainer.save_checkpoint(&run)?;
            tracing::info!("checkpoint {}", p.display());
            if session.eval_examples.is_empty() {
                refresh_plots(&run, progress);
            }
        }
        if stop {
            progress(Event::Note(stopped.note(step)));
            break;
        }
    }
    if root {
        run.save_final(
            &trainer.trained,
            &session.config.models.llm.display().to_string(),
        )?;
    }
    Ok(TrainOutcome {
        projector: trainer.trained.projector,
        metrics: all,
        stopped,
        best: records.and_then(|(_, evals)| evals.best),
    })
}

fn refresh_plots(run: &RunDir, progress: &mut dyn FnMut(Event)) {
    if let Err(e) = run.refresh_plots() {
        progress(Event::Note(format!(
            "warning: cannot draw the plots: {e:#}"
        )));
    }
}

impl Stopped {
    /// What the user is told when a run stops before its last step.
    fn note(&self, step: usize) -> String {
        match self {
            Stopped::Finished => format!("reached step {step}"),
            Stopped::Interrupted => {
                format!("interrupted: checkpoint saved at step {step}; continue with --resume")
            }
            Stopped::EarlyStop { evaluations } => format!(
                "stopping early at step {step}: the eval loss has not improved for \
                 {evaluations} evaluation(s) (train.early-stop-patience)"
            ),
        }
    }
}

/// The held-out evaluations of a run: their record, the best so far, and how many in a
/// row did not improve on it.
struct Evaluations {
    file: std::fs::File,
    best: Option<Best>,
    without_improvement: usize,
}

impl Evaluations {
    /// Evaluates the current projector, records it, and saves it as the best when it is.
    fn run(
        &mut self,
        trainer: &Trainer,
        run: &RunDir,
        progress: &mut dyn FnMut(Event),
    ) -> Result<()> {
        let step = trainer.state.step;
        let session = trainer.session();
        let (eval, per_task) = eval_losses(session, &trainer.trained.projector, progress)?;
        let mut record = serde_json::json!({"step": step, "eval_loss": eval});
        if session.tasks.len() > 1 {
            record["tasks"] = per_task
                .iter()
                .map(|(name, loss)| (name.clone(), serde_json::json!(loss)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        writeln!(self.file, "{record}").map_err(io(&run.path, "cannot write eval.jsonl"))?;
        let is_best = eval.is_finite() && self.best.is_none_or(|b| eval < b.eval_loss);
        progress(Event::Eval {
            step,
            loss: eval,
            examples: session.eval_examples.len(),
            best: is_best,
            tasks: &per_task,
        });
        if is_best {
            let best = Best {
                step,
                eval_loss: eval,
            };
            run.save_best(best, &trainer.state, &trainer.trained, &trainer.opt)?;
            self.best = Some(best);
            self.without_improvement = 0;
        } else {
            self.without_improvement += 1;
        }
        refresh_plots(run, progress);
        Ok(())
    }
}
