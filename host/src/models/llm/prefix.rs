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

#[derive(Default)]
pub struct PrefixCache {
    entries: Mutex<HashMap<Vec<u32>, Arc<KvCache>>>,
}

impl PrefixCache {
    /// The keys/values (batch 1) of `ids` at positions `0..ids.len()` (an empty cache for no
    /// ids).
    pub fn get_or_compute(&self, llm: &impl LanguageModel, ids: &[u32]) -> Result<Arc<KvCache>> {
        if let Some(hit) = self.lock().get(ids) {
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
        entries.insert(ids.to_vec(), cache.clone());
        Ok(cache)
    }

    /// Entries held now (at most [`MAX_CACHED_PREFIXES`]).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Vec<u32>, Arc<KvCache>>> {
        // A panic while holding the lock leaves a usable map (entries are inserted whole).
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}
