//! The prompt-prefix cache: keys and values of the prompt text before the audio, computed
//! once per distinct text and shared. The frozen LLM gives the same values every time, and
//! when every example of a template starts with the same text this is ~20% of the positions
//! of a training step and most of a short caption's prompt. Used by training (as constants
//! the batch attends to) and by the decode loop (copied into each batch's cache).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::Tensor;

use super::{KvCache, LanguageModel};
use crate::models::weights::Result;

/// Templates whose text before the audio varies per example would otherwise grow the cache
/// without bound (each entry is layers x prefix length x key/value width).
pub const MAX_CACHED_PREFIXES: usize = 16;

/// (adapter generation, token ids) -> keys and values.
type Entries = HashMap<(u64, Vec<u32>), Arc<KvCache>>;

#[derive(Default)]
pub struct PrefixCache {
    /// Keyed by the model's adapter generation and the ids: the same text through other
    /// LoRA values has other keys and values.
    entries: Mutex<Entries>,
}

impl PrefixCache {
    /// The keys/values (batch 1) of `ids` at positions `0..ids.len()` (an empty cache for no
    /// ids).
    pub fn get_or_compute(&self, llm: &impl LanguageModel, ids: &[u32]) -> Result<Arc<KvCache>> {
        let key = (llm.adapter_generation(), ids.to_vec());
        if let Some(hit) = self.lock().get(&key) {
            return Ok(hit.clone());
        }
        let _span = tracing::debug_span!("prefill prefix", tokens = ids.len()).entered();
        let mut cache = llm.new_cache();
        if !ids.is_empty() {
            let embeds = llm.embed(&Tensor::new(ids, llm.device())?.unsqueeze(0)?)?;
            llm.prefill(&embeds, &mut cache)?;
        }
        let cache = Arc::new(cache);
        let mut entries = self.lock();
        if entries.len() >= MAX_CACHED_PREFIXES {
            entries.clear();
        }
        entries.insert(key, cache.clone());
        Ok(cache)
    }

    /// Entries held now (at most [`MAX_CACHED_PREFIXES`]).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // A panic while holding the lock leaves a usable map (entries are inserted whole).
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}
