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
use super::TaskSpan;
use super::{Event, Prepared, Session, Start, StepMetrics};
use crate::dist::World;
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::projector::Projector;
use crate::models::trainable::{is_lora_tensor, Trainable};
use crate::pipeline::loss::caption_loss;
use crate::pipeline::TextPieces;

/// What trains (projector, LoRA adapters), its optimizer and the position in the data, for
/// one run.
pub struct Trainer<'s> {
    session: &'s Session,
    /// The ranks this step's batches are split over (one without a launcher).
    world: &'s World,
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
    /// With several ranks, each computes its share of every micro-batch and the gradients
    /// are summed over the ranks before every rank applies the same update; only rank 0
    /// prepares the run folder.
    pub fn new(
        session: &'s Session,
        world: &'s World,
        run: &RunDir,
        start: &Start,
    ) -> Result<Self> {
        let cfg = &session.config.train;
        let batch = cfg.batch_size.min(session.examples.len());
        if world.size() > batch {
            return Err(TrainError::TooManyRanks {
                ranks: world.size(),
                batch,
            });
        }
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
            tasks: task_record(session),
        };
        let mut trainer = Self {
            session,
            world,
            trained,
            opt,
            state,
            orders: HashMap::new(),
            nonfinite_run: 0,
        };
        match *start {
            Start::Resume { allow_mismatch } => trainer.resume(run, allow_mismatch)?,
            Start::Fresh { overwrite } if world.is_root() => run.start_fresh(overwrite)?,
            Start::Fresh { .. } => {}
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
        let tasks = task_record(self.session);
        if saved.tasks != tasks {
            let show = |t: &[(String, usize, f64)]| -> String {
                if t.is_empty() {
                    return "one task".into();
                }
                t.iter()
                    .map(|(name, n, w)| format!("{name} ({n} examples, weight {w})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(bad_checkpoint(
                &ckpt,
                format!(
                    "its run trained {}, this config trains {}: the data order would differ",
                    show(&saved.tasks),
                    show(&tasks)
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
        hang_for_test(self.world.rank(), step);
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
                let tasks = &self.session.tasks;
                self.orders.entry(epoch).or_insert_with(|| {
                    if tasks.len() > 1 {
                        mixed_epoch_order(seed, epoch, tasks)
                    } else {
                        epoch_order(seed, epoch, n)
                    }
                })[i]
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
            // This rank's share of the micro-batch (all of it with one rank).
            let (size, rank) = (self.world.size(), self.world.rank());
            let share = rank * bs / size..(rank + 1) * bs / size;
            // LoRA dropout masks drawn per example from (seed, its sample position): a
            // resumed run, and a run on another number of ranks, draws the same ones.
            let lora = self.trained.lora.as_ref();
            if let Some(l) = lora {
                let seeds = share
                    .clone()
                    .map(|k| cfg.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (first + k as u64))
                    .collect();
                l.set_dropout_seed(Some(seeds));
            }
            let mine = &examples[share];
            let world = self.world;
            let result = self
                .session
                .batch_loss(&self.trained.projector, mine, true)
                .and_then(|(out, pieces, audio)| {
                    if size == 1 {
                        let g = (&out.loss / micro as f64)?.backward()?;
                        return Ok((out, pieces, audio, g, 1.0));
                    }
                    // The micro-batch's loss is the mean over all ranks' target tokens:
                    // this rank's mean weighted by its share of them; the gradients are
                    // summed over the ranks after the last micro-batch.
                    let mut tokens = [out.target_tokens as f64];
                    world.sum_f64(&mut tokens);
                    let share = out.target_tokens as f64 / tokens[0];
                    let g = (&out.loss * (share / micro as f64))?.backward()?;
                    Ok((out, pieces, audio, g, share))
                });
            if let Some(l) = lora {
                l.set_dropout_seed(None);
            }
            let (out, pieces, audio, g, share) = result?;
            let mut diagnostics = [
                out.value()? * share,
                out.accuracy * share,
                out.mean_prob * share,
            ];
            if size > 1 {
                world.sum_f64(&mut diagnostics);
            }
            let per_micro = |v: f64| v / micro as f64;
            let (loss, accuracy, mean_prob) = (
                per_micro(diagnostics[0]),
                per_micro(diagnostics[1]),
                per_micro(diagnostics[2]),
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
        let mut total = total.expect("at least one micro-batch");
        if self.world.size() > 1 {
            sum_over_ranks(self.world, &self.trained, &mut total.grads)?;
        }
        Ok(total)
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
/// `EARSHOT_TEST_HANG=RANK@STEP`: that rank stops answering at that step (tests of the
/// watchdog that ends a job whose rank hangs).
fn hang_for_test(rank: usize, step: usize) {
    if std::env::var("EARSHOT_TEST_HANG").is_ok_and(|v| v == format!("{rank}@{step}")) {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// Every trainable tensor's gradient summed over the ranks: one all-reduce of them all,
/// flattened in the trainable set's order (the same on every rank).
fn sum_over_ranks(world: &World, trained: &Trainable, grads: &mut GradStore) -> Result<()> {
    let params = trained.params();
    let mut flat: Vec<f32> = Vec::new();
    let mut shapes = Vec::with_capacity(params.len());
    for (name, var) in &params {
        let g = grads
            .get(var.as_tensor())
            .ok_or_else(|| TrainError::NoGradient(name.clone()))?;
        shapes.push((g.shape().clone(), g.dtype()));
        flat.extend(
            g.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    world.sum_f32(&mut flat);
    let mut at = 0;
    for ((_, var), (shape, dtype)) in params.iter().zip(shapes) {
        let n = shape.elem_count();
        let summed = Tensor::from_slice(&flat[at..at + n], shape, var.as_tensor().device())?
            .to_dtype(dtype)?;
        grads.insert(var.as_tensor(), summed);
        at += n;
    }
    Ok(())
}

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

/// What a checkpoint records of a multi-task session's tasks (nothing for one task).
fn task_record(session: &Session) -> Vec<(String, usize, f64)> {
    if session.tasks.len() < 2 {
        return Vec::new();
    }
    session
        .tasks
        .iter()
        .map(|t| (t.name.clone(), t.train.len(), t.weight))
        .collect()
}

/// The order of `epoch`'s samples when several tasks train together. An epoch is as many
/// samples as there are training examples in all; task t gets the share w_t / sum(w) of
/// them (largest remainders, at least one each), drawn from the task's own fixed shuffles
/// one after another, so that its examples come round evenly over the epochs whatever its
/// share; the epoch's samples are then shuffled together. A function of (seed, epoch) and
/// the tasks alone, like [`epoch_order`], so the data position is still the number of
/// samples seen.
pub(super) fn mixed_epoch_order(seed: u64, epoch: u64, tasks: &[TaskSpan]) -> Vec<usize> {
    let n: usize = tasks.iter().map(|t| t.train.len()).sum();
    let quotas = task_quotas(n, &tasks.iter().map(|t| t.weight).collect::<Vec<_>>());
    let mut order = Vec::with_capacity(n);
    for (t, (task, &quota)) in tasks.iter().zip(&quotas).enumerate() {
        let len = task.train.len() as u64;
        if len == 0 {
            continue;
        }
        let first = epoch * quota as u64;
        let mut round_order: Option<(u64, Vec<usize>)> = None;
        for c in first..first + quota as u64 {
            let (round, i) = (c / len, (c % len) as usize);
            if round_order.as_ref().is_none_or(|(r, _)| *r != round) {
                let task_seed = seed ^ (t as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
                round_order = Some((round, epoch_order(task_seed, round, len as usize)));
            }
            let (_, within) = round_order.as_ref().expect("set above");
            order.push(task.train.start + within[i]);
        }
    }
    order.shuffle(&mut StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch ^ 0x05EE_D0F7_A5C5_u64,
    ));
    order
}

/// `n` samples split by `weights` (positive): largest remainders, then at least one each
/// (taken from the largest share) when `n` allows.
fn task_quotas(n: usize, weights: &[f64]) -> Vec<usize> {
    let total: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| n as f64 * w / total).collect();
    let mut quotas: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    by_remainder.sort_by(|&a, &b| {
        let ra = exact[a] - exact[a].floor();
        let rb = exact[b] - exact[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    let short = n.saturating_sub(quotas.iter().sum());
    for &i in by_remainder.iter().cycle().take(short) {
        quotas[i] += 1;
    }
    if n >= weights.len() {
        while let Some(zero) = quotas.iter().position(|&q| q == 0) {
            let largest = (0..quotas.len())
                .max_by_key(|&i| (quotas[i], std::cmp::Reverse(i)))
                .expect("tasks");
            quotas[largest] -= 1;
            quotas[zero] += 1;
        }
    }
    quotas
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &str, train: std::ops::Range<usize>, weight: f64) -> TaskSpan {
        TaskSpan {
            name: name.into(),
            weight,
            train,
            valid: 0..0,
        }
    }

    #[test]
    fn quotas_follow_the_weights_and_sum_to_the_epoch() {
        assert_eq!(task_quotas(10, &[1.0, 1.0]), vec![5, 5]);
        assert_eq!(task_quotas(10, &[3.0, 1.0]), vec![8, 2]);
        assert_eq!(task_quotas(7, &[1.0, 1.0, 1.0]), vec![3, 2, 2]);
        // A tiny weight still gets a sample.
        assert_eq!(task_quotas(100, &[1.0, 1e-9]), vec![99, 1]);
        for (n, w) in [(13usize, vec![0.2, 0.3, 0.5]), (1000, vec![1.0, 2.0, 7.0])] {
            assert_eq!(task_quotas(n, &w).iter().sum::<usize>(), n);
        }
    }

    #[test]
    fn mixed_orders_draw_each_task_by_weight_and_cover_its_examples() {
        // 10 examples of a and 90 of b, weighted 1:1: each epoch of 100 draws 50 of each,
        // so a's examples come round five times an epoch, b's over two epochs.
        let tasks = [span("a", 0..10, 1.0), span("b", 10..100, 1.0)];
        let e0 = mixed_epoch_order(7, 0, &tasks);
        let e1 = mixed_epoch_order(7, 1, &tasks);
        assert_eq!(e0.len(), 100);
        for e in [&e0, &e1] {
            assert_eq!(e.iter().filter(|&&i| i < 10).count(), 50);
            for i in 0..10 {
                assert_eq!(e.iter().filter(|&&j| j == i).count(), 5, "example {i}");
            }
        }
        let mut b: Vec<usize> = e0.iter().chain(&e1).copied().filter(|&i| i >= 10).collect();
        b.sort();
        // 100 of b's samples over two epochs: all 90, then 10 of its next round.
        b.dedup();
        assert_eq!(b.len(), 90);
        // Fixed by (seed, epoch): what resume relies on.
        assert_eq!(e0, mixed_epoch_order(7, 0, &tasks));
        assert_ne!(e0, mixed_epoch_order(8, 0, &tasks));
        assert_ne!(e0, e1);
    }
}
