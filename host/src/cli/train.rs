use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::printer::TrainPrinter;
use crate::config::RunConfig;
use crate::dist::World;
use crate::train::{train, Session, Start, Stopped, TrainOutcome};

#[derive(Debug, Args)]
#[command(
    after_help = "Trains the projector (and, with a [lora] section, LoRA adapters on the \
LLM; the base weights stay frozen). Writes metrics.jsonl (one JSON object per \
step: loss, target-token accuracy, mean probability of the correct token, gradient norm, \
per-tensor log10 update ratio) and projector.safetensors (every trained tensor) into \
train.run-dir; with [lora] also adapter/ in PEFT's layout.\n\nStarted by mpirun or srun (a build \
with the mpi feature, as scripts/setup.sh makes where it can), it trains data-parallel: \
train.batch-size is the global batch, split over the ranks; gradients are summed over them \
each step; rank 0 alone evaluates, writes and prints. A run resumes on any number of ranks.\n\nExample:\n  earshot train configs/cpu-smollm2-tones.toml --max-steps 5 --set 'train.run-dir=\"runs/try\"'"
)]
pub struct TrainArgs {
    /// Run config (TOML)
    #[arg(
        value_name = "CONFIG",
        required_unless_present = "config_flag",
        conflicts_with = "config_flag"
    )]
    pub config: Option<PathBuf>,
    /// The run config given as `caption --config` and `eval --config` take it (the same as
    /// CONFIG)
    #[arg(long = "config", id = "config_flag", value_name = "CONFIG")]
    pub config_flag: Option<PathBuf>,
    /// Stop after this many steps (overrides train.steps)
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_steps: Option<usize>,
    /// Override a config value, e.g. --set train.lr=1e-3 (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from the newest checkpoint in the run directory
    #[arg(long)]
    pub resume: bool,
    /// With --resume: continue even if models, tokenizer, template, mel settings or the
    /// projector config differ from the checkpoint's
    #[arg(long, requires = "resume")]
    pub allow_mismatch: bool,
    /// Start afresh even if the run directory holds an earlier run (it is replaced)
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Under mpirun or srun: seconds a step (with rank 0's evaluation and checkpoint after
    /// it) may take before a rank gives up and the job ends (a rank hung or died; the run
    /// resumes from its newest checkpoint)
    #[arg(long, value_name = "S", default_value_t = 1800.0, value_parser = positive_seconds)]
    pub rank_timeout_s: f64,
}

fn positive_seconds(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 1e7 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 1e7]")),
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    // Under mpirun or srun: this rank's place in the data-parallel job.
    super::common::on_this_rank(|world| train_on_rank(&args, world))
}

fn train_on_rank(args: &TrainArgs, world: &mut World) -> Result<()> {
    crate::models::device::keep_elementwise_on_caller();
    let path = args
        .config
        .as_ref()
        .or(args.config_flag.as_ref())
        .ok_or_else(|| anyhow::anyhow!("no run config given (CONFIG or --config)"))?;
    let config = RunConfig::load(path, &args.set)?;
    if let Some(warning) = config.train.schedule_warning().filter(|_| world.is_root()) {
        tracing::warn!("{}: {warning}", path.display());
    }
    world.watch(std::time::Duration::from_secs_f64(args.rank_timeout_s));
    let steps = args.max_steps.unwrap_or(config.train.steps);
    let log_every = config.train.log_every.max(1);
    let mut printer = if world.is_root() {
        TrainPrinter::new(steps, log_every)
    } else {
        TrainPrinter::silent(steps)
    };
    let session = Session::load_sharded(config, world, &mut |e| printer.event(e));
    let session = match session {
        Ok(s) => s,
        Err(e) => {
            printer.finish();
            return Err(e.into());
        }
    };
    printer.line(&banner(&session, steps));
    // Ctrl-C: finish the current step, write a checkpoint, exit cleanly.
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = interrupted.clone();
    if let Err(e) =
        ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::SeqCst))
    {
        tracing::warn!("cannot install the Ctrl-C handler: {e}");
    }
    let start = if args.resume {
        Start::Resume {
            allow_mismatch: args.allow_mismatch,
        }
    } else {
        Start::Fresh {
            overwrite: args.overwrite,
        }
    };
    if world.size() > 1 {
        printer.line(&format!(
            "data-parallel over {} ranks: each takes about {} of every batch of {}",
            world.size(),
            session.config.train.batch_size.min(session.examples.len()) / world.size(),
            session.config.train.batch_size.min(session.examples.len())
        ));
    }
    let result = train(&session, world, steps, start, Some(interrupted), &mut |e| {
        printer.event(e)
    });
    printer.finish();
    let outcome = result?;
    if !world.is_root() {
        // Rank 0 reports the run.
        return Ok(());
    }
    report(&session, &outcome)
}

/// The line that opens a run: what trains, on what, and where the encodings came from.
fn banner(session: &Session, steps: usize) -> String {
    // Both splits' clips went through the encoder cache.
    let clips = session.examples.len() + session.eval_examples.len();
    format!(
        "training the projector{} on {} example(s){} up to step {steps}{}; encoder: {} clip(s) encoded, {} from the cache",
        match &session.config.lora {
            Some(l) => format!(
                " and LoRA adapters (rank {}, {})",
                l.rank,
                l.targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
            ),
            None => String::new(),
        },
        session.examples.len(),
        if session.tasks.len() > 1 {
            let parts: Vec<String> = session
                .tasks
                .iter()
                .map(|t| format!("{} {} (weight {})", t.name, t.train.len(), t.weight))
                .collect();
            format!(" of {} tasks: {}", session.tasks.len(), parts.join(", "))
        } else {
            String::new()
        },
        skipped_note(session.skipped),
        session.fresh_encodings,
        clips.saturating_sub(session.fresh_encodings)
    )
}

/// The run's results on stdout: where it ended, the encoder mix, the best checkpoint.
fn report(session: &Session, outcome: &TrainOutcome) -> Result<()> {
    let metrics = &outcome.metrics;
    let last = metrics.last().map(|m| m.loss).unwrap_or(f64::NAN);
    let reached = metrics.last().map(|m| m.step).unwrap_or(0);
    let run_dir = &session.config.train.run_dir;
    let projector = run_dir.join("projector.safetensors");
    println!(
        "trained to step {reached} ({} step(s) now); final loss {last:.4}; projector: {}",
        metrics.len(),
        projector.display()
    );
    let why = match outcome.stopped {
        Stopped::Finished => format!("reached step {reached}"),
        Stopped::Interrupted => "interrupted (Ctrl-C)".into(),
        Stopped::EarlyStop { evaluations } => format!(
            "stopped early: no better eval loss in {evaluations} evaluation(s) \
             (train.early-stop-patience)"
        ),
    };
    if let (Some(mix), Some(layers)) = (
        outcome.projector.layer_mix()?,
        &session.manifest.encoder_layers,
    ) {
        let parts: Vec<String> = layers
            .iter()
            .zip(mix)
            .map(|(l, w)| format!("{l}: {w:.3}"))
            .collect();
        println!(
            "encoder hidden-state mix of the final projector: {}",
            parts.join(", ")
        );
    }
    match outcome.best {
        Some(b) => println!(
            "{why}; best checkpoint: step {} (lowest eval loss, {:.4}): {}",
            b.step,
            b.eval_loss,
            run_dir.join("best").display()
        ),
        None => println!("{why}"),
    }
    Ok(())
}

/// The banner's word on examples left out (the log has a warning for each).
fn skipped_note(skipped: crate::train::Skipped) -> String {
    let mut parts = Vec::new();
    if skipped.over_bound > 0 {
        parts.push(format!(
            "{} over a plugin bound (data.bad-examples = \"refuse\" stops instead)",
            skipped.over_bound
        ));
    }
    if skipped.other > 0 {
        parts.push(format!(
            "{} without a usable target or audio",
            skipped.other
        ));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(
            " ({} skipped: {})",
            skipped.over_bound + skipped.other,
            parts.join(", ")
        )
    }
}
