//! What a run trains, as one set of named f32 tensors: the projector (with its encoder
//! hidden-state mix) and, with `[lora]`, the LLM's LoRA adapters. The optimizer, the
//! gradient norm, checkpoints and the trained-weights file all go through this set, so a new
//! kind of trainable module joins them in one place.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Tensor, Var};

use super::lora::{LoraAdapter, PEFT_PREFIX};
use super::projector::Projector;
use super::weights::{ModelError, Result, WeightStore};

pub struct Trainable {
    pub projector: Projector,
    /// The adapters the LLM was given (the same Vars: updating them here changes the LLM).
    pub lora: Option<Arc<LoraAdapter>>,
}

/// Whether a trained tensor belongs to the LoRA adapters (PEFT names) or the projector.
pub fn is_lora_tensor(name: &str) -> bool {
    name.starts_with(PEFT_PREFIX)
}

impl Trainable {
    /// Every trained tensor by name: the projector's, then the adapters' (PEFT names).
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut all = self.projector.params().to_vec();
        if let Some(lora) = &self.lora {
            all.extend(lora.params());
        }
        all
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.params()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }

    /// Writes every trained tensor as one safetensors file (temp file, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("safetensors.tmp");
        candle_core::safetensors::save(&self.tensors(), &tmp)?;
        std::fs::rename(&tmp, path).map_err(|cause| ModelError::Io {
            path: path.to_path_buf(),
            cause,
        })
    }

    /// Loads a file written by [`Trainable::save`] (or a projector-only file from before
    /// LoRA): the projector's tensors, and the adapters' when this set has adapters. A file
    /// with adapters for a config without `[lora]`, or the reverse, is refused by name.
    pub fn load_into(&mut self, path: &Path) -> Result<()> {
        let device = self.projector.params()[0].1.device().clone();
        let store = WeightStore::from_safetensors(&[path.to_path_buf()], &device)?;
        store.verify_finite()?;
        self.load_store(&store, path)
    }

    /// As [`Trainable::load_into`], from tensors already read.
    pub fn load_store(&mut self, store: &WeightStore, path: &Path) -> Result<()> {
        let lora_names: Vec<&str> = store.names().filter(|n| is_lora_tensor(n)).collect();
        match (&self.lora, lora_names.is_empty()) {
            (None, false) => {
                return Err(ModelError::Input {
                    what: "not this config's trained weights".into(),
                    reason: format!(
                        "{} holds {} LoRA tensor(s) (its run had [lora]); this config has no \
                         [lora] section: add the one its run used",
                        path.display(),
                        lora_names.len()
                    ),
                })
            }
            (Some(_), true) => {
                return Err(ModelError::Input {
                    what: "not this config's trained weights".into(),
                    reason: format!(
                        "{} holds no LoRA tensors (its run trained the projector alone); this \
                         config has a [lora] section: remove it to use these weights",
                        path.display()
                    ),
                })
            }
            _ => {}
        }
        self.projector.load_store(store, |n| !is_lora_tensor(n))?;
        if let Some(lora) = &self.lora {
            let mut map = HashMap::new();
            for name in lora_names {
                let shape = store.shape_of(name).unwrap_or_default();
                map.insert(
                    name.to_string(),
                    store.get(name, &shape, candle_core::DType::F32)?,
                );
            }
            lora.load_map(&map, path)?;
        }
        Ok(())
    }
}
