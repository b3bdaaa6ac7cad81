//! The frozen LLM: a small trait (embed ids; forward from embeddings with a position offset
//! and a KV cache; logits at all positions or only the last) and one implementation for the
//! Llama family (Llama 2/3, Mistral, SmolLM2), loaded from Hugging Face folders or GGUF.

mod decode;
mod llama;
mod load;
mod prefix;
mod tokenizer;

pub use decode::{decode_batch, DecodeLoop, DecodeOptions, DecodeRequest, Decoded, Finish, Left};
pub use prefix::{PrefixCache, MAX_CACHED_PREFIXES};

pub use llama::{
    stack_projections, KvCache, Llama, LlamaConfig, LogitsAt, Placement, PREFILL_CHUNK,
};
pub use load::{
    export_gguf_to_hf, load_llm, load_llm_with, read_gguf, unpermute_qk, GgufBlocks, LlmSource,
    LoadedLlm,
};
pub use tokenizer::{ChatTokenizer, SpecialTokens, DATA_CLOSE, DATA_OPEN};

use candle_core::Tensor;

use super::nonfinite::NonFiniteTrace;
use super::weights::Result;

/// What captioning and training need from a language model.
pub trait LanguageModel {
    /// Token ids (B, T) u32 -> embeddings (B, T, hidden).
    fn embed(&self, ids: &Tensor) -> Result<Tensor>;
    /// Embeddings (B, T, hidden) at absolute positions `offset..offset + T` -> logits
    /// (B, T, vocab) or (B, 1, vocab). With a cache, keys/values are appended to it and
    /// `offset` must equal the cache length.
    fn forward(
        &self,
        embeds: &Tensor,
        offset: usize,
        cache: Option<&mut KvCache>,
        at: LogitsAt,
        trace: NonFiniteTrace,
    ) -> Result<Tensor>;
    /// A left-padded batch (see [`Placement::Padded`]) after the slots already in `cache`:
    /// logits (B, 1, vocab) at the last slot, which must be a real position in every row.
    fn forward_padded(
        &self,
        embeds: &Tensor,
        slots: &[Vec<Option<usize>>],
        cache: &mut KvCache,
        trace: NonFiniteTrace,
    ) -> Result<Tensor>;
    /// Appends the keys and values of `embeds` (1, T, hidden) to `cache`, at the positions
    /// after it, computing no logits (a prompt prefix shared by many rows).
    fn prefill(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<()>;
    fn hidden_size(&self) -> usize;
    /// The dtype of embeddings and activations.
    fn dtype(&self) -> candle_core::DType;
    fn vocab_size(&self) -> usize;
    fn new_cache(&self) -> KvCache;
    /// Positions the model can attend over (its context length).
    fn max_positions(&self) -> usize;
    fn device(&self) -> &candle_core::Device;
    /// Changes whenever outputs may change while the frozen weights do not (LoRA adapters
    /// trained or loaded); 0 without adapters.
    fn adapter_generation(&self) -> u64 {
        0
    }
}

/// Continuation of `prompt` (token ids) with a KV cache, one token per step, until `eos`
/// (not included) or `max_tokens`. Fails, naming the step, if the logits are not finite.
pub fn generate_ids(
    model: &impl LanguageModel,
    prompt: &[u32],
    max_tokens: usize,
    eos: Option<u32>,
    sampler: &mut crate::sampler::Sampler,
    trace: NonFiniteTrace,
) -> Result<Vec<u32>> {
    let ids = Tensor::new(prompt, model.device())?.unsqueeze(0)?;
    generate_from_embeds(model, &model.embed(&ids)?, max_tokens, eos, sampler, trace)
}

/// As [`generate_ids`], from prompt embeddings (1, T, hidden): e.g. text with audio inside.
pub fn generate_from_embeds(
    model: &impl LanguageModel,
    prompt: &Tensor,
    max_tokens: usize,
    eos: Option<u32>,
    sampler: &mut crate::sampler::Sampler,
    trace: NonFiniteTrace,
) -> Result<Vec<u32>> {
    generate_continuing(
        model,
        model.new_cache(),
        prompt,
        max_tokens,
        eos,
        sampler,
        trace,
    )
}

/// As [`generate_from_embeds`], continuing after the positions already in `cache` (e.g. a
/// prompt prefix computed once and shared by many clips): one row of [`decode_batch`].
pub fn generate_continuing(
    model: &impl LanguageModel,
    cache: KvCache,
    prompt: &Tensor,
    max_tokens: usize,
    eos: Option<u32>,
    sampler: &mut crate::sampler::Sampler,
    trace: NonFiniteTrace,
) -> Result<Vec<u32>> {
    let mut requests = [DecodeRequest {
        rest: prompt.clone(),
        sampler: sampler.clone(),
        max_tokens,
        stop_strings: Vec::new(),
    }];
    let options = DecodeOptions {
        tokenizer: None,
        eos,
        trace,
        cancelled: None,
    };
    let mut decoded = decode_batch(model, &cache, &mut requests, &options, |_, _| {})?;
    let [request] = requests;
    *sampler = request.sampler;
    Ok(decoded.remove(0).ids)
}
