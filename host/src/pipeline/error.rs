//! The pipeline's errors. Each names what failed (a file, a plugin, a checkpoint) and why;
//! the errors of the layers below pass through unchanged.

use std::path::PathBuf;

use crate::audio::AudioError;
use crate::mel::MelError;
use crate::models::weights::ModelError;
use crate::plugins::PluginError;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Audio(#[from] AudioError),
    #[error(transparent)]
    Mel(#[from] MelError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// A model that does not load, with where it was loaded from.
    #[error("loading {what} from {path}: {cause}")]
    LoadModel {
        what: &'static str,
        path: PathBuf,
        cause: Box<ModelError>,
    },
    #[error("{path}: {action}: {cause}")]
    Io {
        path: PathBuf,
        action: &'static str,
        cause: std::io::Error,
    },
    #[error("audio path {0:?} from the dataset adapter leaves the dataset root; refused")]
    LeavesRoot(String),
    #[error(
        "{path}: refused: it cannot be opened beneath the dataset root {root} ({cause}); a \
         symbolic link that leads out of the root is not followed"
    )]
    OutsideRoot {
        path: PathBuf,
        root: PathBuf,
        cause: std::io::Error,
    },
    #[error("dataset {root}: {cause}")]
    Dataset { root: PathBuf, cause: PluginError },
    #[error(
        "checkpoint {path} was made with a different {what}; refusing to {purpose} with it \
         (--allow-mismatch overrides)"
    )]
    Mismatch {
        path: PathBuf,
        what: String,
        purpose: String,
    },
    #[error("{what}: {cause}")]
    Json {
        what: &'static str,
        cause: serde_json::Error,
    },
}

impl From<candle_core::Error> for PipelineError {
    fn from(e: candle_core::Error) -> Self {
        PipelineError::Model(e.into())
    }
}

/// An I/O error on `path` while doing `action` ("cannot read", "cannot create" ...).
pub fn io(
    path: impl Into<PathBuf>,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> PipelineError {
    let path = path.into();
    move |cause| PipelineError::Io {
        path,
        action,
        cause,
    }
}

pub type Result<T, E = PipelineError> = std::result::Result<T, E>;
