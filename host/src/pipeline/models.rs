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

/// Puts fresh LoRA adapters on the LLM when the config has `[lora]` (drawn from
/// train.seed; a checkpoint's values are loaded into them afterwards).
pub fn attach_lora(
    config: &RunConfig,
    llm: &mut LoadedLlm,
    device: &candle_core::Device,
) -> Result<()> {
    if let Some(lora) = &config.lora {
        let shape = llm.model.config.decoder_shape();
        let adapter =
            crate::models::lora::LoraAdapter::new(lora, &shape, config.train.seed, device)
                .map_err(|cause| PipelineError::LoadModel {
                    what: "LoRA adapters for the LLM",
                    path: config.models.llm.clone(),
                    cause: Box::new(cause),
                })?;
        llm.model.set_adapter(Some(std::sync::Arc::new(adapter)));
    }
    Ok(())
}
