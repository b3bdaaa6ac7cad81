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

/// Which of the encoder's hidden states feed the projector (`[encoder] layers`), numbered
/// as Hugging Face's `output_hidden_states`: 0 is the convolution stem plus positions, `i`
/// the output of block `i`, and `encoder_layers` (the last) the final block's output after
/// the final LayerNorm, the encoder's usual output. Several are mixed by the projector with
/// learned softmax weights (SUPERB's weighted layer sum).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum EncoderLayers {
    /// The encoder's output alone (the write-up's choice).
    #[default]
    Last,
    /// Every hidden state, 0..=encoder_layers.
    All,
    /// These hidden states (any order; kept sorted, each once).
    Indices(Vec<usize>),
}

/// More hidden states than this is a typo (Whisper large has 33).
pub const MAX_MIXED_LAYERS: usize = 256;

impl EncoderLayers {
    /// Checks what does not depend on the model: a non-empty list without repeats.
    pub fn check(&self) -> std::result::Result<(), String> {
        if let EncoderLayers::Indices(ix) = self {
            if ix.is_empty() {
                return Err(
                    "encoder.layers: an empty list (use \"last\" for the encoder's \
                            output)"
                        .into(),
                );
            }
            if ix.len() > MAX_MIXED_LAYERS {
                return Err(format!(
                    "encoder.layers: {} indices, at most {MAX_MIXED_LAYERS}",
                    ix.len()
                ));
            }
            let mut sorted = ix.clone();
            sorted.sort_unstable();
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return Err(format!("encoder.layers: {} is listed twice", w[0]));
            }
        }
        Ok(())
    }

    /// The hidden-state indices for an encoder of `encoder_layers` blocks, ascending.
    pub fn resolve(&self, encoder_layers: usize) -> std::result::Result<Vec<usize>, String> {
        self.check()?;
        Ok(match self {
            EncoderLayers::Last => vec![encoder_layers],
            EncoderLayers::All => (0..=encoder_layers).collect(),
            EncoderLayers::Indices(ix) => {
                if let Some(bad) = ix.iter().find(|&&i| i > encoder_layers) {
                    return Err(format!(
                        "encoder.layers: {bad} is not a hidden state of this encoder (it has \
                         {encoder_layers} blocks: 0 is the input to the first, \
                         {encoder_layers} the output)"
                    ));
                }
                let mut ix = ix.clone();
                ix.sort_unstable();
                ix
            }
        })
    }
}

impl serde::Serialize for EncoderLayers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            EncoderLayers::Last => s.serialize_str("last"),
            EncoderLayers::All => s.serialize_str("all"),
            EncoderLayers::Indices(ix) => ix.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for EncoderLayers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Indices(Vec<usize>),
        }
        let bad = || {
            serde::de::Error::custom(
                "encoder.layers must be \"last\", \"all\" or a list of hidden-state indices \
                 such as [2, 4]",
            )
        };
        match Raw::deserialize(d).map_err(|_| bad())? {
            Raw::Name(n) if n == "last" => Ok(EncoderLayers::Last),
            Raw::Name(n) if n == "all" => Ok(EncoderLayers::All),
            Raw::Name(_) => Err(bad()),
            Raw::Indices(ix) => Ok(EncoderLayers::Indices(ix)),
        }
    }
}

/// Bump when a change to this encoder's code changes its outputs (beyond run-to-run noise):
/// the encoder cache keys on it, so entries computed by older code are not reused.
/// 1: candle's composed ops; 2: the vectorised softmax and exact-GELU kernels; 3: attention
/// in blocks of query rows, the scale applied to the scores; 4: softmax and GELU with fused
/// multiply-adds in the vector builds; 5: the convolutions as one product each over im2col
/// rows, the softmax's normalisation applied to the attention's outputs; 6: GELU's erf as
/// a rational function; 7: the softmax's exponential ends in two multiply-adds; 8:
/// the residual connections added by the output products; 9: GELU's erf back to
/// Abramowitz & Stegun (the rational one tripled the error against a float64 encoder).
pub const OUTPUT_REVISION: u32 = 9;
const LN_EPS: f64 = 1e-5;
/// The stem's two convolutions: 3 taps, padding 1; conv2 halves the frames.
const CONV_TAPS: usize = 3;
const CONV_PADDING: usize = 1;
const CONV2_STRIDE: usize = 2;

/// The two convolutions before the blocks, with their GELUs.
enum Stem {
    /// On the CPU in f32: each convolution one matrix product over
    /// [`fused::im2col_channels_last`]'s rows, the weight laid out (C_out, taps * C_in) once
    /// at load. candle's conv1d took 11% of a window (its im2col and output transpose on one
    /// thread).
    Products {
        conv1: FrozenLinear,
        conv2: FrozenLinear,
    },
    /// Other devices and dtypes: candle's conv1d.
    Candle { conv1: Conv1d, conv2: Conv1d },
}

impl Stem {
    fn new(conv1: Conv1d, conv2: Conv1d, dtype: DType) -> Result<Self> {
        if !(conv1.weight().device().is_cpu() && dtype == DType::F32) {
            return Ok(Stem::Candle { conv1, conv2 });
        }
        let as_product = |conv: &Conv1d| -> Result<FrozenLinear> {
            let w = conv.weight();
            let (c_out, c_in, taps) = w.dims3()?;
            let w = w
                .permute((0, 2, 1))?
                .contiguous()?
                .reshape((c_out, taps * c_in))?;
            Ok(FrozenLinear::new(w, conv.bias().cloned()))
        };
        Ok(Stem::Products {
            conv1: as_product(&conv1)?,
            conv2: as_product(&conv2)?,
        })
    }

    /// mel (B, n_mels, frames) -> (B, frames / 2, d_model), positions in rows.
    fn forward(&self, mel: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Stem::Products { conv1, conv2 } => {
                let rows = |x: &Tensor, stride| {
                    fused::im2col_channels_last(x, CONV_TAPS, stride, CONV_PADDING)
                };
                let x = conv1.forward(&rows(&mel.transpose(1, 2)?, 1)?)?;
                let x = fused::gelu_erf_inference_owned(x)?;
                let x = conv2.forward(&rows(&x, CONV2_STRIDE)?)?;
                fused::gelu_erf_inference_owned(x)?
            }
            Stem::Candle { conv1, conv2 } => {
                let x = fused::gelu_erf_inference(&conv1.forward(mel)?)?;
                fused::gelu_erf_inference(&conv2.forward(&x)?)?.transpose(1, 2)?
            }
        })
    }
}

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
    stem: Stem,
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
            get("conv1.weight", &[d, cfg.num_mel_bins, CONV_TAPS])?,
            Some(get("conv1.bias", &[d])?),
            Conv1dConfig {
                padding: CONV_PADDING,
                ..Default::default()
            },
        );
        let conv2 = Conv1d::new(
            get("conv2.weight", &[d, d, CONV_TAPS])?,
            Some(get("conv2.bias", &[d])?),
            Conv1dConfig {
                padding: CONV_PADDING,
                stride: CONV2_STRIDE,
                ..Default::default()
            },
        );
        let stem = Stem::new(conv1, conv2, dtype)?;
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
            stem,
            positions,
            blocks,
            final_ln: ln("layer_norm")?,
            dtype,
        })
    }

    /// (B, n_mels, 3000) -> (B, 1500, d_model). Input of any float dtype.
    pub fn forward(&self, mel: &Tensor, trace: NonFiniteTrace) -> Result<Tensor> {
        self.forward_layers(mel, &[self.config.encoder_layers], trace)
    }

    /// The hidden states `layers` (ascending indices, see [`EncoderLayers`]) side by side:
    /// (B, frames, layers.len() * d_model), state `layers[j]` in columns j*d_model.. . With
    /// only the last layer this is [`WhisperEncoder::forward`].
    pub fn forward_layers(
        &self,
        mel: &Tensor,
        layers: &[usize],
        trace: NonFiniteTrace,
    ) -> Result<Tensor> {
        let n = self.config.encoder_layers;
        if layers.is_empty()
            || layers.windows(2).any(|w| w[0] >= w[1])
            || layers[layers.len() - 1] > n
        {
            return Err(ModelError::Input {
                what: "encoder layers".into(),
                reason: format!("{layers:?} are not ascending hidden-state indices in 0..={n}"),
            });
        }
        let mut kept = Vec::with_capacity(layers.len());
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
        let x = self.stem.forward(&mel)?;
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
        if layers[0] == 0 {
            kept.push(x.clone());
        }
        // Blocks past the deepest state asked for are not run.
        let deepest = layers[layers.len() - 1];
        for (i, block) in self.blocks.iter().enumerate().take(deepest) {
            // The residual connections are added by the output products themselves.
            x = block.attn.forward_plus(&block.attn_ln.forward(&x)?, &x)?;
            // fc1's output is this block's alone: GELU writes over it.
            let h =
                fused::gelu_erf_inference_owned(block.fc1.forward(&block.mlp_ln.forward(&x)?)?)?;
            x = block.fc2.forward_plus(&h, &x)?;
            trace.check(|| format!("whisper.encoder.layers.{i}"), &x)?;
            if i + 1 < n && layers.contains(&(i + 1)) {
                kept.push(x.clone());
            }
        }
        if deepest == n {
            let x = self.final_ln.forward(&x)?;
            trace.check(|| "whisper.encoder.layer_norm".into(), &x)?;
            kept.push(x);
        }
        Ok(if kept.len() == 1 {
            kept.pop().expect("one state")
        } else {
            Tensor::cat(&kept, 2)?
        })
    }
}

impl Attention {
    /// `residual` + attention(x).
    fn forward_plus(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let d = x.dim(2)?;
        let scale = (d as f64 / self.heads as f64).powf(-0.5);
        let q = self.q.forward(x)?;
        let k = self.k.forward(x)?;
        let v = self.v.forward(x)?;
        // The scale is applied to the scores (in the product), not to q first; the heads
        // are read in place from the projections' (B, T, d) outputs.
        let y = fused::attention_inference(&q, &k, &v, self.heads, scale)?;
        Ok(self.out.forward_plus(&y, residual)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_layers_parse_resolve_and_refuse() {
        #[derive(Deserialize)]
        struct T {
            layers: EncoderLayers,
        }
        let parse = |s: &str| toml::from_str::<T>(s).map(|t| t.layers);
        assert_eq!(parse("layers = \"last\"").unwrap(), EncoderLayers::Last);
        assert_eq!(parse("layers = \"all\"").unwrap(), EncoderLayers::All);
        assert_eq!(
            parse("layers = [4, 2]").unwrap(),
            EncoderLayers::Indices(vec![4, 2])
        );
        for bad in ["layers = \"first\"", "layers = 3", "layers = [-1]"] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains("\"last\", \"all\" or a list"), "{bad}: {e}");
        }
        assert_eq!(EncoderLayers::Last.resolve(4).unwrap(), vec![4]);
        assert_eq!(EncoderLayers::All.resolve(4).unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(
            EncoderLayers::Indices(vec![4, 2]).resolve(4).unwrap(),
            vec![2, 4]
        );
        let e = EncoderLayers::Indices(vec![5]).resolve(4).unwrap_err();
        assert!(
            e.contains("5 is not a hidden state") && e.contains("4 blocks"),
            "{e}"
        );
        let e = EncoderLayers::Indices(vec![1, 1]).check().unwrap_err();
        assert!(e.contains("1 is listed twice"), "{e}");
        assert!(EncoderLayers::Indices(vec![]).check().is_err());
        // Round trip through the config copy a run folder keeps.
        for l in [
            EncoderLayers::Last,
            EncoderLayers::All,
            EncoderLayers::Indices(vec![1, 3]),
        ] {
            let json = serde_json::to_string(&l).unwrap();
            assert_eq!(serde_json::from_str::<EncoderLayers>(&json).unwrap(), l);
        }
    }
}
