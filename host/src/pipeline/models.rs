//! The frozen models a run config names, loaded once for training or captioning.

use super::error::{PipelineError, Result};
use crate::config::RunConfig;
use crate::models::llm::{load_llm_with, GgufBlocks, LoadedLlm};
use crate::models::whisper::WhisperEncoder;
use crate::models::Runtime;

/// The device, the Whisper encoder and the LLM of `config`. `blocks` says whether a GGUF
/// LLM keeps its packed blocks for decoding (captioning) or not (training never decodes;
/// they would only take memory).
pub fn load_models(
    config: &RunConfig,
    blocks: GgufBlocks,
) -> Result<(Runtime, WhisperEncoder, LoadedLlm)> {
    let rt = Runtime::best_available();
    let whisper = &config.models.whisper;
    let encoder =
        WhisperEncoder::load_dir(whisper, &rt).map_err(|cause| PipelineError::LoadModel {
            what: "Whisper",
            path: whisper.clone(),
            cause: Box::new(cause),
        })?;
    let llm_path = &config.models.llm;
    let llm = load_llm_with(llm_path, &rt, blocks).map_err(|cause| PipelineError::LoadModel {
        what: "the LLM",
        path: llm_path.clone(),
        cause: Box::new(cause),
    })?;
    Ok((rt, encoder, llm))
}
