//! Whisper's audio encoder (frozen, encoder only), loaded from a Hugging Face layout folder:
//! `config.json` + `model.safetensors` (or shards). Decoder weights are not needed.
//!
//! mel (B, n_mels, 3000) -> conv1 + GELU -> conv2 (stride 2) + GELU -> + positions ->
//! pre-LN transformer blocks -> final LayerNorm -> (B, 1500, d_model).

use std::path::{Path, PathBuf};

use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv1d, Conv1dConfig, LayerNorm};
use serde::Deserialize;

use super::frozen::FrozenLinear;
use super::fused;
use super::nonfinite::NonFiniteTrace;
use super::weights::{read_json_config, ModelError, Result, WeightStore};
use super::Runtime;

/// The fields of a Hugging Face `WhisperConfig` that the encoder needs.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct WhisperConfig {
    pub num_mel_bins: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    #[serde(default = "default_source_positions")]
    pub max_source_positions: usize,
}

/// Encoder output frames per 30 s window (3000 mel frames, halved by the stride-2 conv).
pub const ENCODER_FRAMES: usize = crate::mel::N_FRAMES / 2;

fn default_source_positions() -> usize {
    ENCODER_FRAMES
}

const PREFIX: &str = "model.encoder";

/// Bump when a change to this encoder's code changes its outputs (beyond run-to-run noise):
/// the encoder cache keys on it, so entries computed by older code are not reused.
/// 1: candle's composed ops; 2: the vectorised softmax and exact-GELU kernels.
pub const OUTPUT_REVISION: u32 = 2;
const LN_EPS: f64 = 1e-5;

struct Attention {
    q: FrozenLinear,
    k: FrozenLinear,
    v: FrozenLinear,
    out: FrozenLinear,
    heads: usize,
}

struct Block {
    attn_ln: LayerNorm,
    attn: Attention,
    mlp_ln: LayerNorm,
    fc1: FrozenLinear,
    fc2: FrozenLinear,
}

pub struct WhisperEncoder {
    pub config: WhisperConfig,
    conv1: Conv1d,
    conv2: Conv1d,
    positions: Tensor,
    blocks: Vec<Block>,
    final_ln: LayerNorm,
    dtype: DType,
}

/// The weight files of a Hugging Face layout folder: `model.safetensors`, or the shards named
/// by `model.safetensors.index.json`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: std::collections::BTreeMap<String, String>,
        }
        let idx: Index = read_json_config(&index)?;
        let mut files: Vec<String> = idx.weight_map.into_values().collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    Err(ModelError::Io {
        path: dir.to_path_buf(),
        cause: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no model.safetensors or model.safetensors.index.json in this folder",
        ),
    })
}

impl WhisperEncoder {
    /// Loads `dir/config.json` and the safetensors weights, verifies every tensor is finite.
    pub fn load_dir(dir: &Path, rt: &Runtime) -> Result<Self> {
        let config: WhisperConfig = read_json_config(&dir.join("config.json"))?;
        let store = WeightStore::from_safetensors(&safetensors_files(dir)?, &rt.device)?;
        store.verify_finite()?;
        Self::load(&store, &config, rt.dtype)
    }

    pub fn load(store: &WeightStore, cfg: &WhisperConfig, dtype: DType) -> Result<Self> {
        let d = cfg.d_model;
        if cfg.encoder_attention_heads == 0 || !d.is_multiple_of(cfg.encoder_attention_heads) {
            return Err(ModelError::ConfigMismatch {
                source_desc: store.source_desc.clone(),
                reason: format!(
                    "d_model {d} is not divisible by encoder_attention_heads {}",
                    cfg.encoder_attention_heads
                ),
            });
        }
        // A config that disagrees with the weights is named as such, not as a shape error.
        if let Some(shape) = store.shape_of(&format!("{PREFIX}.conv1.weight")) {
            if shape.len() == 3 && (shape[0] != d || shape[1] != cfg.num_mel_bins) {
                return Err(ModelError::ConfigMismatch {
                    source_desc: store.source_desc.clone(),
                    reason: format!(
                        "config says d_model {d} and num_mel_bins {}, conv1.weight is {shape:?}",
                        cfg.num_mel_bins
                    ),
                });
            }
        }
        let layers_in_weights = (0..)
            .take_while(|i| store.contains(&format!("{PREFIX}.layers.{i}.fc1.weight")))
            .count();
        if layers_in_weights != cfg.encoder_layers {
            return Err(ModelError::ConfigMismatch {
                source_desc: store.source_desc.clone(),
                reason: format!(
                    "config says encoder_layers = {}, the weights have {layers_in_weights}",
                    cfg.encoder_layers
                ),
            });
        }
        let get =
            |name: &str, shape: &[usize]| store.get(&format!("{PREFIX}.{name}"), shape, dtype);
        let ln = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm::new(
                get(&format!("{name}.weight"), &[d])?,
                get(&format!("{name}.bias"), &[d])?,
                LN_EPS,
            ))
        };
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<FrozenLinear> {
            let w = get(&format!("{name}.weight"), &[out, inp])?;
            let b = if bias {
                Some(get(&format!("{name}.bias"), &[out])?)
            } else {
                None
            };
            Ok(FrozenLinear::new(w, b))
        };
        let conv1 = Conv1d::new(
            get("conv1.weight", &[d, cfg.num_mel_bins, 3])?,
            Some(get("conv1.bias", &[d])?),
            Conv1dConfig {
                padding: 1,
                ..Default::default()
            },
        );
        let conv2 = Conv1d::new(
            get("conv2.weight", &[d, d, 3])?,
            Some(get("conv2.bias", &[d])?),
            Conv1dConfig {
                padding: 1,
                stride: 2,
                ..Default::default()
            },
        );
        let positions = get("embed_positions.weight", &[cfg.max_source_positions, d])?;
        let mut blocks = Vec::with_capacity(cfg.encoder_layers);
        for i in 0..cfg.encoder_layers {
            let p = format!("layers.{i}");
            blocks.push(Block {
                attn_ln: ln(&format!("{p}.self_attn_layer_norm"))?,
                attn: Attention {
                    q: linear(&format!("{p}.self_attn.q_proj"), d, d, true)?,
                    k: linear(&format!("{p}.self_attn.k_proj"), d, d, false)?,
                    v: linear(&format!("{p}.self_attn.v_proj"), d, d, true)?,
                    out: linear(&format!("{p}.self_attn.out_proj"), d, d, true)?,
                    heads: cfg.encoder_attention_heads,
                },
                mlp_ln: ln(&format!("{p}.final_layer_norm"))?,
                fc1: linear(&format!("{p}.fc1"), cfg.encoder_ffn_dim, d, true)?,
                fc2: linear(&format!("{p}.fc2"), d, cfg.encoder_ffn_dim, true)?,
            });
        }
        Ok(Self {
            config: cfg.clone(),
            conv1,
            conv2,
            positions,
            blocks,
            final_ln: ln("layer_norm")?,
            dtype,
        })
    }

    /// (B, n_mels, 3000) -> (B, 1500, d_model). Input of any float dtype.
    pub fn forward(&self, mel: &Tensor, trace: NonFiniteTrace) -> Result<Tensor> {
        let (_, n_mels, frames) = mel.dims3()?;
        if n_mels != self.config.num_mel_bins {
            return Err(ModelError::Input {
                what: "encoder input".into(),
                reason: format!(
                    "the mel has {n_mels} bins, the encoder expects {}",
                    self.config.num_mel_bins
                ),
            });
        }
        let mel = mel.to_dtype(self.dtype)?;
        let x = fused::gelu_erf_inference(&self.conv1.forward(&mel)?)?;
        let x = fused::gelu_erf_inference(&self.conv2.forward(&x)?)?;
        let x = x.transpose(1, 2)?;
        let positions = x.dim(1)?;
        if positions > self.config.max_source_positions {
            return Err(ModelError::Input {
                what: "encoder input".into(),
                reason: format!(
                    "{frames} mel frames give {positions} positions, more than {}",
                    self.config.max_source_positions
                ),
            });
        }
        let mut x = x.broadcast_add(&self.positions.narrow(0, 0, positions)?)?;
        trace.check(|| "whisper.conv_stem".into(), &x)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let h = block.attn.forward(&block.attn_ln.forward(&x)?)?;
            x = (x + h)?;
            let h = block.fc2.forward(&fused::gelu_erf_inference(
                &block.fc1.forward(&block.mlp_ln.forward(&x)?)?,
            )?)?;
            x = (x + h)?;
            trace.check(|| format!("whisper.encoder.layers.{i}"), &x)?;
        }
        let x = self.final_ln.forward(&x)?;
        trace.check(|| "whisper.encoder.layer_norm".into(), &x)?;
        Ok(x)
    }
}

impl Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let split = |y: Tensor| -> candle_core::Result<Tensor> {
            y.reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = (hd as f64).powf(-0.5);
        let q = split((self.q.forward(x)? * scale)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?;
        let probs = fused::softmax_last_dim_inference(&scores)?;
        let y = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        Ok(self.out.forward(&y)?)
    }
}
