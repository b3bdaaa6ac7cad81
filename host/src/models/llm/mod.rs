//! The frozen LLM: a small trait (embed ids; forward from embeddings with a position offset
//! and a KV cache; logits at all positions or only the last) and one implementation for the
//! Llama family (Llama 2/3, Mistral, SmolLM2), loaded from Hugging Face folders or GGUF.

mod llama;
mod load;
mod tokenizer;

pub use llama::{KvCache, Llama, LlamaConfig, LogitsAt};
pub use load::{load_llm, read_gguf as read_gguf_for_inspect, LlmSource, LoadedLlm};
pub use tokenizer::{ChatTokenizer, SpecialTokens};

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
    fn hidden_size(&self) -> usize;
    fn vocab_size(&self) -> usize;
    fn new_cache(&self) -> KvCache;
    fn device(&self) -> &candle_core::Device;
}
