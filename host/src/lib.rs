//! earshot: teach a frozen LLM to listen.
//!
//! Data flows one way: audio (decode, resample) -> mel -> Whisper encoder -> projector ->
//! LLM -> sampler -> post-processor. See ARCHITECTURE.md for where each concern lives.

pub mod alloc;
pub mod audio;
pub mod caption;
pub mod cli;
pub mod config;
pub mod dist;
pub mod eval;
pub mod files;
pub mod mel;
pub mod models;
pub mod npy;
pub mod pipeline;
pub mod plugins;
pub mod sampler;
pub mod selftest;
pub mod serve;
pub mod text;
pub mod train;
