//! One optimisation step at a time: [`Trainer::step`] draws the next batch in the fixed
//! data order, accumulates micro-batch gradients, skips non-finite steps (naming the first
//! bad layer when they persist), clips, applies AdamW and measures update ratios.

use std::collections::HashMap;
use std::time::Instant;

use super::error::{bad_checkpoint, Result, TrainError};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::checkpoint::{self, TrainState};
use super::optim::{AdamW, AdamWParams};
use super::run_dir::RunDir;
use super::{Event, Prepared, Session, Start, StepMetrics};
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::projector::Projector;
use crate::models::trainable::{is_lora_tensor, Trainable};
use crate::pipeline::loss::caption_loss;
use crate::pipeline::TextPieces;

/// What trains (projector, LoRA adapters), its optimizer and the position in the data, for
/// one run.
pub struct Trainer<'s> {
    session: &'s Session,
    pub trained: Trainable,
    pub opt: AdamW,
    pub state: TrainState,
    /// Shuffled orders of the epochs the next batches draw from.
    orders: HashMap<u64, Vec<usize>>,
    /// Non-finite steps in a row.
    nonfinite_run: usize,
}

/// Summed gradients of one step's micro-batches, their mean diagnostics, and the last
/// micro-batch's inputs (to trace non-finite values through).
struct Accumulated {
    grads: GradStore,
    loss: f64,
    accuracy: f64,
    mean_prob: f64,
    last_inputs: (Vec<TextPieces>, Vec<Tensor>),
}

impl<'s> Trainer<'s> {
    /// A fresh projector and optimizer, or (resuming) those of the newest checkpoint in
    /// `run`, which must have been trained against the same models, settings and data.
    pub fn new(session: &'s Session, run: &RunDir, start: &Start) -> Result<Self> {
        let cfg = &session.config.train;
        let projector = Projector::new_mixed(
            &session.config.projector,
            session.manifest.encoder_layer_count(),
            session.encoder.config.d_model,
            session.llm.model.config.hidden_size,
            cfg.seed,
            &session.rt.device,
        )?;
        let trained = Trainable {
            projector,
            lora: session.llm.model.adapter().cloned(),
        };
        let mut opt = AdamW::new(
            trained.params(),
            AdamWParams {
                lr: cfg.lr,
                beta1: cfg.beta1,
                beta2: cfg.beta2,
                eps: cfg.eps,
                weight_decay: cfg.weight_decay,
            },
        )?;
        // The adapters' own rate follows train's schedule as a fixed multiple of train.lr.
        if let Some(lr) = session.config.lora.as_ref().and_then(|l| l.lr) {
            opt.scale_lr(is_lora_tensor, lr / cfg.lr);
        }
        let state = TrainState {
            step: 0,
            samples_seen: 0,
            optimizer_steps: 0,
            seed: cfg.seed,
            batch_size: cfg.batch_size,
            accumulate: cfg.accumulate,
            examples: session.examples.len(),
            manifest: session.manifest.clone(),
        };
        let mut trainer = Self {
            session,
            trained,
            opt,
            state,
            orders: HashMap::new(),
            nonfinite_run: 0,
        };
        match *start {
            Start::Resume { allow_mismatch } => trainer.resume(run, allow_mismatch)?,
            Start::Fresh { overwrite } => run.start_fresh(overwrite)?,
        }
        Ok(trainer)
    }

    fn resume(&mut self, run: &RunDir, allow_mismatch: bool) -> Result<()> {
        let cfg = &self.session.config.train;
        let ckpt = run.latest_checkpoint()?;
        let loaded = checkpoint::load(&ckpt, &self.session.rt.device)?;
        loaded
            .state
            .manifest
            .check(&self.session.manifest, &ckpt, "resume", allow_mismatch)?;
        let saved = &loaded.state;
        let n = self.session.examples.len();
        if saved.seed != cfg.seed
            || saved.batch_size != cfg.batch_size
            || saved.accumulate != cfg.accumulate
            || saved.examples != n
        {
            return Err(bad_checkpoint(
                &ckpt,
                format!(
                    "seed/batch size/dataset size were {}/{}/{}, now {}/{}/{}: the data order \
                     would differ",
                    saved.seed, saved.batch_size, saved.examples, cfg.seed, cfg.batch_size, n
                ),
            ));
        }
        for (name, var) in self.trained.params() {
            let t = loaded
                .projector
                .get(&name)
                .ok_or_else(|| bad_checkpoint(&ckpt, format!("no tensor {name}")))?;
            var.set(t)?;
        }
        if let Some(lora) = &self.trained.lora {
            lora.touch();
        }
        self.opt
            .restore(&loaded.optimizer, loaded.state.optimizer_steps)?;
        self.state = loaded.state;
        self.state.manifest = self.session.manifest.clone();
        // Keep the records of the steps the checkpoint covers, drop any written after it.
        run.truncate_records(self.state.step)?;
        tracing::info!(
            "resumed from {} at step {}",
            ckpt.display(),
            self.state.step
        );
        Ok(())
    }

    /// Runs the next optimisation step and returns its metrics.
    pub fn step(&mut self, progress: &mut dyn FnMut(Event)) -> Result<StepMetrics> {
        let _span = tracing::debug_span!("train step", step = self.state.step + 1).entered();
        let cfg = &self.session.config.train;
        let step = self.state.step + 1;
        let started = Instant::now();
        let n = self.session.examples.len();
        let seen = (cfg.batch_size.min(n) * cfg.accumulate.max(1)) as u64;
        let lr = cfg.lr_at(step);
        let acc = self.accumulate()?;
        let grad_norm = grad_norm(&self.trained, &acc.grads)?;
        let skipped = !acc.loss.is_finite() || !grad_norm.is_finite();
        let update = if skipped {
            self.nonfinite_run += 1;
            progress(Event::Note(format!(
                "warning: step {step}: non-finite loss or gradient; step skipped"
            )));
            if self.nonfinite_run >= cfg.max_nonfinite_steps {
                return Err(self.nonfinite_failure(&acc.last_inputs));
            }
            HashMap::new()
        } else {
            self.nonfinite_run = 0;
            self.apply(acc.grads, grad_norm, lr)?
        };
        self.state.step = step;
        self.state.samples_seen += seen;
        Ok(StepMetrics {
            step,
            loss: acc.loss,
            accuracy: acc.accuracy,
            mean_prob: acc.mean_prob,
            grad_norm,
            lr,
            epoch: self.state.samples_seen as f64 / n as f64,
            examples_per_s: seen as f64 / started.elapsed().as_secs_f64(),
            update_ratio_log10: update,
            skipped,
        })
    }

    /// The example indices of the micro-batch that starts `first` samples into the run.
    fn batch_at(&mut self, first: u64, size: usize) -> Vec<usize> {
        let n = self.session.examples.len();
        let seed = self.session.config.train.seed;
        (0..size as u64)
            .map(|k| {
                let c = first + k;
                let (epoch, i) = (c / n as u64, (c % n as u64) as usize);
                self.orders
                    .entry(epoch)
                    .or_insert_with(|| epoch_order(seed, epoch, n))[i]
            })
            .collect()
    }

    /// Forward and backward over the step's micro-batches; each contributes 1/micro of the
    /// gradient and of the diagnostics.
    fn accumulate(&mut self) -> Result<Accumulated> {
        let cfg = &self.session.config.train;
        let n = self.session.examples.len();
        let bs = cfg.batch_size.min(n);
        let micro = cfg.accumulate.max(1);
        let mut total: Option<Accumulated> = None;
        for mb in 0..micro {
            let first = self.state.samples_seen + (mb * bs) as u64;
            let batch = self.batch_at(first, bs);
            let examples: Vec<&Prepared> =
                batch.iter().map(|&i| &self.session.examples[i]).collect();
            // LoRA dropout masks drawn from (seed, sample position): a resumed run draws
            // the same ones.
            let lora = self.trained.lora.as_ref();
            if let Some(l) = lora {
                l.set_dropout_seed(Some(cfg.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ first));
            }
            let result = self
                .session
                .batch_loss(&self.trained.projector, &examples, true)
                .and_then(|(out, pieces, audio)| {
                    let g = (&out.loss / micro as f64)?.backward()?;
                    Ok((out, pieces, audio, g))
                });
            if let Some(l) = lora {
                l.set_dropout_seed(None);
            }
            let (out, pieces, audio, g) = result?;
            let share = |v: f64| v / micro as f64;
            let (loss, accuracy, mean_prob) = (
                share(out.value()?),
                share(out.accuracy),
                share(out.mean_prob),
            );
            total = Some(match total {
                None => Accumulated {
                    grads: g,
                    loss,
                    accuracy,
                    mean_prob,
                    last_inputs: (pieces, audio),
                },
                Some(mut acc) => {
                    add_grads(&self.trained, &mut acc.grads, &g)?;
                    acc.loss += loss;
                    acc.accuracy += accuracy;
                    acc.mean_prob += mean_prob;
                    acc.last_inputs = (pieces, audio);
                    acc
                }
            });
        }
        let drawn = self.state.samples_seen / n as u64;
        self.orders.retain(|&e, _| e + 1 >= drawn);
        Ok(total.expect("at least one micro-batch"))
    }

    /// Clips the gradients, steps the optimizer, and returns log10 of each tensor's update
    /// ratio.
    fn apply(
        &mut self,
        mut grads: GradStore,
        grad_norm: f64,
        lr: f64,
    ) -> Result<HashMap<String, f64>> {
        let clip = self.session.config.train.grad_clip;
        if clip > 0.0 && grad_norm > clip {
            let scale = clip / grad_norm;
            for (_, var) in self.trained.params() {
                let g = grads.remove(var.as_tensor()).expect("checked by grad_norm");
                grads.insert(var.as_tensor(), (g * scale)?);
            }
        }
        let params = self.trained.params();
        let before: Vec<Tensor> = params
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<Result<_, _>>()?;
        self.opt.step(&grads, lr)?;
        if let Some(lora) = &self.trained.lora {
            lora.touch();
        }
        let mut update = HashMap::new();
        for ((name, var), old) in params.iter().zip(&before) {
            let delta = sq_norm(&(var.as_tensor() - old)?)?.sqrt();
            // Against the larger of the old and new norms: a tensor initialised to zero
            // (a LayerNorm bias) would otherwise report an infinite first ratio.
            let norm = sq_norm(old)?
                .sqrt()
                .max(sq_norm(var.as_tensor())?.sqrt())
                .max(1e-12);
            update.insert(name.clone(), (delta / norm).max(1e-30).log10());
        }
        Ok(update)
    }

    /// The error that stops a run after too many non-finite steps, naming the first layer
    /// that produces non-finite values in the forward or else in the backward.
    fn nonfinite_failure(&self, (pieces, audio): &(Vec<TextPieces>, Vec<Tensor>)) -> TrainError {
        let trace = caption_loss(
            &self.session.llm.model,
            pieces,
            audio,
            None,
            NonFiniteTrace::on(),
        )
        .and_then(|out| Ok(out.loss.backward()?))
        .err();
        TrainError::NonFinite {
            steps: self.nonfinite_run,
            trace: trace.map(|e| format!(" ({e})")).unwrap_or_default(),
        }
    }

    pub fn session(&self) -> &'s Session {
        self.session
    }

    /// Saves a checkpoint of the current step under the run's `checkpoints/`.
    pub fn save_checkpoint(&self, run: &RunDir) -> Result<std::path::PathBuf> {
        let keep = self.session.config.train.keep_last;
        run.save_checkpoint(keep, &self.state, &self.trained, &self.opt)
    }
}

/// `acc += g` for every trained tensor.
fn add_grads(trained: &Trainable, acc: &mut GradStore, g: &GradStore) -> Result<()> {
    for (name, var) in trained.params() {
        let b = g
            .get(var.as_tensor())
            .ok_or_else(|| TrainError::NoGradient(name.clone()))?;
        let sum = match acc.remove(var.as_tensor()) {
            Some(a) => (a + b)?,
            None => b.clone(),
        };
        acc.insert(var.as_tensor(), sum);
    }
    Ok(())
}

/// The global gradient norm over every trained tensor.
fn grad_norm(trained: &Trainable, grads: &GradStore) -> Result<f64> {
    let mut sq = 0.0;
    for (name, var) in trained.params() {
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| TrainError::NoGradient(name.clone()))?;
        sq += sq_norm(g)?;
    }
    Ok(sq.sqrt())
}

pub(super) fn sq_norm(t: &Tensor) -> Result<f64> {
    Ok(t.sqr()?
        .sum_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?)
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
