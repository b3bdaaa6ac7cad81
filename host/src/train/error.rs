//! Training's errors: what went wrong with the run folder, a checkpoint, the data or the
//! optimisation, naming the file or step; the pipeline's and models' errors pass through.

use std::path::PathBuf;

use crate::models::weights::ModelError;
use crate::pipeline::PipelineError;
use crate::plugins::PluginError;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0} already holds a run; continue it with --resume, or replace it with --overwrite")]
    RunExists(PathBuf),
    #[error("--resume: no checkpoint in {0}")]
    NoCheckpoint(PathBuf),
    /// A checkpoint (or `--checkpoint` path) that cannot be used, and why.
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("split {split:?}: {bad}; refused (data.bad-examples = \"refuse\"; \"skip\" trains without it)")]
    BadExample {
        split: String,
        bad: crate::plugins::BadExample,
    },
    #[error("{0}; refused (data.leaks = \"refuse\")")]
    Leaks(String),
    #[error("split {split:?} of {root} has no usable examples")]
    NoUsableExamples { split: String, root: PathBuf },
    #[error("{steps} steps in a row with non-finite loss or gradients; stopping{trace}")]
    NonFinite { steps: usize, trace: String },
    #[error(
        "{ranks} ranks but a batch of {batch} example(s) (train.batch-size is the global \
         batch, split over the ranks): use at most {batch} ranks or a larger batch"
    )]
    TooManyRanks { ranks: usize, batch: usize },
    #[error("projector parameter {0} received no gradient")]
    NoGradient(String),
    #[error("{path}: {reason}")]
    Records { path: PathBuf, reason: String },
    #[error("{0}")]
    Plot(String),
    /// Only with `EARSHOT_TEST_KILL_IN_CHECKPOINT`-style stops in tests.
    #[error("checkpoint write stopped at {0} (test)")]
    TestStop(&'static str),
}

impl From<candle_core::Error> for TrainError {
    fn from(e: candle_core::Error) -> Self {
        TrainError::Model(e.into())
    }
}

/// An I/O error on `path` while doing `action` (the pipeline's one I/O error).
pub fn io(
    path: impl Into<PathBuf>,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> TrainError {
    let to_error = crate::pipeline::error::io(path, action);
    move |cause| TrainError::Pipeline(to_error(cause))
}

/// A checkpoint-level error on `path`.
pub fn bad_checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.into(),
        reason: reason.into(),
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
