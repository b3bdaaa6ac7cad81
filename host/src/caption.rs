//! Captioning: `[prompt before audio][projected audio][prompt after audio]` into the frozen
//! LLM, then decoding with a KV cache until EOS, a stop string or the token limit.

use candle_core::Tensor;

use crate::models::llm::{generate_from_embeds, ChatTokenizer, LanguageModel, Llama};
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::projector::Projector;
use crate::models::weights::Result;
use crate::sampler::Sampler;

/// The prompt embeddings for one clip: (1, T, hidden).
pub fn prompt_embeddings(
    llm: &Llama,
    before: &[u32],
    audio: &Tensor,
    after: &[u32],
) -> Result<Tensor> {
    let device = llm.device().clone();
    let mut parts = Vec::new();
    if !before.is_empty() {
        parts.push(llm.embed(&Tensor::new(before, &device)?.unsqueeze(0)?)?);
    }
    parts.push(audio.to_dtype(llm.dtype())?);
    if !after.is_empty() {
        parts.push(llm.embed(&Tensor::new(after, &device)?.unsqueeze(0)?)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Caption one encoded clip (1, 1500, d_enc); the raw text is cut at the first stop string.
#[allow(clippy::too_many_arguments)]
pub fn caption_clip(
    llm: &Llama,
    tokenizer: &ChatTokenizer,
    projector: &Projector,
    before: &[u32],
    after: &[u32],
    encoded: &Tensor,
    stop_strings: &[String],
    max_tokens: usize,
    sampler: &mut Sampler,
) -> Result<String> {
    let audio = projector.forward(encoded)?;
    let prompt = prompt_embeddings(llm, before, &audio, after)?;
    let ids = generate_from_embeds(
        llm,
        &prompt,
        max_tokens,
        tokenizer.special.eos,
        sampler,
        NonFiniteTrace::default(),
    )?;
    let mut text = tokenizer.decode(&ids)?;
    for s in stop_strings.iter().filter(|s| !s.is_empty()) {
        if let Some(i) = text.find(s.as_str()) {
            text.truncate(i);
        }
    }
    Ok(text)
}
