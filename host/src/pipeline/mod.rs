//! The path every example takes between the plugins and the models, shared by training,
//! captioning and evaluation (which sit above it and never reach into each other):
//!
//! - [`examples`]: examples from a dataset adapter (split checks, paging), their audio
//!   opened beneath the dataset root or from inline bytes;
//! - [`clip`]: audio into frozen-encoder outputs, one per 30 s window, through the on-disk
//!   encoder cache ([`encoder_cache`], looked up before any mel is computed);
//! - [`prompt`]: the prompt template rendered and tokenized into [`prompt::TextPieces`];
//! - [`layout`]: the one function that lays out `[prompt][audio][prompt end][target]`;
//! - [`manifest`]: checksums of everything a trained projector depends on, and the check a
//!   checkpoint must pass before it is used.

pub mod audit;
pub mod clip;
pub mod encoder_cache;
pub mod error;
pub mod examples;
pub mod layout;
pub mod loss;
pub mod manifest;
pub mod models;
pub mod prompt;

pub use clip::{mel_settings, ClipEncoder};
pub use error::{PipelineError, Result};
pub use examples::{example_segment, load_example_audio, open_beneath, open_dataset};
pub use layout::{project_windows, sequence_embeddings};
pub use manifest::{build_manifest, sha256_files, Manifest};
pub use models::{attach_lora, load_models};
pub use prompt::{Prompt, TextPieces};
