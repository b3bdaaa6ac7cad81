//! Captioning: `[prompt before audio][projected audio][prompt after audio]` into the frozen
//! LLM, then decoding with a KV cache until EOS, a stop string or the token limit.

use candle_core::Tensor;

use crate::models::llm::{
    generate_continuing, ChatTokenizer, KvCache, LanguageModel, Llama, LogitsAt,
};
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

/// The keys and values of the prompt text before the audio, computed once and reused for
/// every clip that shares it.
pub struct PromptPrefix {
    pub ids: Vec<u32>,
    cache: KvCache,
}

impl PromptPrefix {
    pub fn new(llm: &Llama, ids: &[u32]) -> Result<Self> {
        let mut cache = llm.new_cache();
        if !ids.is_empty() {
            let x = llm.embed(&Tensor::new(ids, llm.device())?.unsqueeze(0)?)?;
            llm.forward(
                &x,
                0,
                Some(&mut cache),
                LogitsAt::Last,
                NonFiniteTrace::default(),
            )?;
        }
        Ok(Self {
            ids: ids.to_vec(),
            cache,
        })
    }
}

/// Caption encoded audio after `prefix`: one or more windows (1, 1500, d_enc) whose projected
/// positions are concatenated; the raw text is cut at the first stop string.
#[allow(clippy::too_many_arguments)]
pub fn caption_clip(
    llm: &Llama,
    tokenizer: &ChatTokenizer,
    projector: &Projector,
    prefix: &PromptPrefix,
    after: &[u32],
    encoded: &[Tensor],
    stop_strings: &[String],
    max_tokens: usize,
    sampler: &mut Sampler,
) -> Result<String> {
    let windows = encoded
        .iter()
        .map(|e| projector.forward(e))
        .collect::<Result<Vec<_>>>()?;
    let audio = Tensor::cat(&windows, 1)?;
    let rest = prompt_embeddings(llm, &[], &audio, after)?;
    let ids = generate_continuing(
        llm,
        prefix.cache.clone(),
        &rest,
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
