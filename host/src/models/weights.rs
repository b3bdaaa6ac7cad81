//! Named tensors loaded from safetensors (single or sharded) or GGUF, with the checks every
//! load makes: every tensor finite, expected names present, shapes as the config says.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::packed::PackedMatrix;

/// A tensor that holds NaN or infinite values, with counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonFiniteTensor {
    pub name: String,
    pub nan: usize,
    pub pos_inf: usize,
    pub neg_inf: usize,
}

impl fmt::Display for NonFiniteTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (NaN: {}, +Inf: {}, -Inf: {})",
            self.name, self.nan, self.pos_inf, self.neg_inf
        )
    }
}

fn list(items: &[NonFiniteTensor]) -> String {
    items
        .iter()
        .map(|t| format!("\n  {t}"))
        .collect::<Vec<_>>()
        .join("")
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: cannot read: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: invalid or truncated {format} file: {reason}")]
    Format {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("{path}: bad config: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("{source_desc}: tensor `{name}` is missing")]
    MissingTensor { source_desc: String, name: String },
    #[error("{source_desc}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    Shape {
        source_desc: String,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{source_desc}: the config contradicts the weights: {reason}")]
    ConfigMismatch { source_desc: String, reason: String },
    /// What a caller passed does not fit the model (too many positions, an id outside the
    /// vocabulary, a tensor of the wrong width): not a fault of the weights or config.
    #[error("{what}: {reason}")]
    Input { what: String, reason: String },
    #[error("{source_desc}: {} tensor(s) hold non-finite values (bad download or bad RAM?):{}", .tensors.len(), list(.tensors))]
    NonFinite {
        source_desc: String,
        tensors: Vec<NonFiniteTensor>,
    },
    #[error("non-finite values first appear in the output of {layer}: {detail}")]
    NonFiniteActivation { layer: String, detail: String },
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// Named tensors and a description of where they came from (for error messages).
pub struct WeightStore {
    pub source_desc: String,
    tensors: HashMap<String, Tensor>,
    /// The same weights in the GGUF blocks they were read from (CPU f32 loads of Q4_0,
    /// Q4_1 and Q8_0 matrices), for decoding (see `packed`). Checked through `tensors`,
    /// which were dequantized from these bytes.
    packed: HashMap<String, Arc<PackedMatrix>>,
}

impl WeightStore {
    pub fn new(source_desc: impl Into<String>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            source_desc: source_desc.into(),
            tensors,
            packed: HashMap::new(),
        }
    }

    /// The same tensors on `device` (the block forms stay behind: they are CPU-only).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let tensors = self
            .tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_device(device)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Self::new(self.source_desc.clone(), tensors))
    }

    /// Keeps `packed`, the block form of tensor `name` (same shape).
    pub fn insert_packed(&mut self, name: impl Into<String>, packed: PackedMatrix) {
        self.packed.insert(name.into(), Arc::new(packed));
    }

    /// The block form of tensor `name`, if it was read from one and has `shape`.
    pub fn packed(&self, name: &str, shape: &[usize]) -> Option<Arc<PackedMatrix>> {
        self.packed
            .get(name)
            .filter(|p| {
                let (r, c) = p.dims();
                shape == [r, c]
            })
            .cloned()
    }

    /// Loads one or more safetensors files (the shards of one model) onto `device`.
    pub fn from_safetensors(paths: &[PathBuf], device: &Device) -> Result<Self> {
        let mut tensors = HashMap::new();
        for path in paths {
            let bytes = crate::files::read(path).map_err(|cause| ModelError::Io {
                path: path.clone(),
                cause,
            })?;
            let loaded = candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| {
                ModelError::Format {
                    path: path.clone(),
                    format: "safetensors",
                    reason: e.to_string(),
                }
            })?;
            tensors.extend(loaded);
        }
        let desc = match paths {
            [one] => one.display().to_string(),
            _ => format!(
                "{} ({} shards)",
                paths
                    .first()
                    .and_then(|p| p.parent())
                    .unwrap_or(Path::new("."))
                    .display(),
                paths.len()
            ),
        };
        Ok(Self::new(desc, tensors))
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A copy of the name -> tensor map (tests build variants of a store from it).
    #[cfg(test)]
    pub fn tensors_for_test(&self) -> HashMap<String, Tensor> {
        self.tensors.clone()
    }

    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.dims().to_vec())
    }

    /// Replaces the 2-D tensors `parts` (present, same width) by one tensor `into` with their
    /// rows in order. The parts are dropped as they are joined, so a large model is not held
    /// twice while its projections are stacked.
    pub fn stack_rows(&mut self, parts: &[String], into: &str) -> Result<()> {
        let mut taken = Vec::with_capacity(parts.len());
        for name in parts {
            match self.tensors.remove(name) {
                Some(t) => taken.push(t),
                None => {
                    return Err(ModelError::MissingTensor {
                        source_desc: self.source_desc.clone(),
                        name: name.clone(),
                    })
                }
            }
        }
        let stacked = Tensor::cat(&taken, 0)?;
        drop(taken);
        self.tensors.insert(into.to_string(), stacked);
        let packed: Vec<Arc<PackedMatrix>> =
            parts.iter().filter_map(|n| self.packed.remove(n)).collect();
        if packed.len() == parts.len() {
            if let Some(p) = PackedMatrix::stack(&packed.iter().map(|p| &**p).collect::<Vec<_>>()) {
                self.packed.insert(into.to_string(), Arc::new(p));
            }
        }
        Ok(())
    }

    /// The tensor `name` with exactly `shape`, converted to `dtype`.
    pub fn get(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                source_desc: self.source_desc.clone(),
                name: name.to_string(),
            })?;
        if t.dims() != shape {
            return Err(ModelError::Shape {
                source_desc: self.source_desc.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(dtype)?)
    }

    /// Fails with *every* tensor that holds NaN or ±Inf, with counts.
    pub fn verify_finite(&self) -> Result<()> {
        let mut bad = Vec::new();
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for name in names {
            let t = &self.tensors[name];
            if !t.dtype().is_float() {
                continue;
            }
            if let Some(report) = count_non_finite(name, t)? {
                bad.push(report);
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(ModelError::NonFinite {
                source_desc: self.source_desc.clone(),
                tensors: bad,
            })
        }
    }
}

/// Counts NaN / +Inf / -Inf in a float tensor; `None` when all are finite.
pub fn count_non_finite(name: &str, t: &Tensor) -> Result<Option<NonFiniteTensor>> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (mut nan, mut pos_inf, mut neg_inf) = (0, 0, 0);
    for v in values {
        if v.is_nan() {
            nan += 1;
        } else if v == f32::INFINITY {
            pos_inf += 1;
        } else if v == f32::NEG_INFINITY {
            neg_inf += 1;
        }
    }
    Ok((nan + pos_inf + neg_inf > 0).then(|| NonFiniteTensor {
        name: name.to_string(),
        nan,
        pos_inf,
        neg_inf,
    }))
}

/// Reads and parses a JSON config file.
pub fn read_json_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = crate::files::read_to_string(path).map_err(|cause| ModelError::Io {
        path: path.to_path_buf(),
        cause,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Writes `tensors` as one safetensors file with the metadata `{"format": "pt"}` that
/// Hugging Face's files carry: transformers refuses a model file without it (candle's own
/// save writes none).
pub fn save_safetensors_pt(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::tensor::serialize_to_file(tensors.iter(), metadata, path).map_err(|e| {
        ModelError::Format {
            path: path.to_path_buf(),
            format: "safetensors",
            reason: e.to_string(),
        }
    })
}
