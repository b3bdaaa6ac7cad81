//! The trainable projector: Whisper encoder frames (B, 1500, d_enc) -> LLM input embeddings
//! (B, N, d_llm). The only parameters that train; kept in f32 Vars.
//!
//! Kinds: `pool-ln-linear` (the write-up's: adaptive average pooling to N positions,
//! LayerNorm(d_enc), Linear(d_enc -> d_llm, no bias)), `mlp` (pool, LayerNorm, Linear, GELU,
//! Linear), `stack` (concatenate k consecutive frames, LayerNorm, Linear).
//!
//! With several encoder hidden states (`[encoder] layers`), each frame's states arrive side
//! by side; each is layer-normalised (no gain or bias: the states' scales differ by orders of
//! magnitude) and they are summed with weights softmax(`layer_weights`), learned, starting
//! equal (SUPERB's weighted layer sum), before the kind's own layers.

use crate::models::whisper::ENCODER_FRAMES;
use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::weights::{ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ProjectorKind {
    #[default]
    PoolLnLinear,
    Mlp,
    Stack,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct ProjectorConfig {
    pub kind: ProjectorKind,
    /// Audio positions given to the LLM (pooling kinds).
    pub positions: usize,
    /// Frames concatenated per position (`stack`).
    pub stack: usize,
    /// Hidden width of the `mlp` kind (default: the LLM width).
    pub hidden: Option<usize>,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            kind: ProjectorKind::PoolLnLinear,
            positions: 250,
            stack: 4,
            hidden: None,
        }
    }
}

/// The widest hidden layer of the `mlp` kind (Mistral's width is 4096): past it a typo
/// would allocate gigabytes.
pub const MAX_HIDDEN: usize = 65536;

impl ProjectorConfig {
    /// Checks the settings that do not depend on the models, so that a run config can be
    /// refused before anything is loaded or encoded.
    pub fn check(&self) -> std::result::Result<(), String> {
        match self.kind {
            ProjectorKind::Stack => {
                if self.stack == 0 || !ENCODER_FRAMES.is_multiple_of(self.stack) {
                    return Err(format!(
                        "projector.stack = {} must divide {ENCODER_FRAMES} (the encoder's frames)",
                        self.stack
                    ));
                }
            }
            ProjectorKind::PoolLnLinear | ProjectorKind::Mlp => {
                if self.positions == 0 || self.positions > ENCODER_FRAMES {
                    return Err(format!(
                        "projector.positions = {} must be in 1..={ENCODER_FRAMES} (the encoder's \
                         frames)",
                        self.positions
                    ));
                }
            }
        }
        if let Some(hidden) = self.hidden {
            if hidden == 0 || hidden > MAX_HIDDEN {
                return Err(format!(
                    "projector.hidden = {hidden} must be in 1..={MAX_HIDDEN}"
                ));
            }
        }
        Ok(())
    }
}

const LN_EPS: f64 = 1e-5;

/// The projector's parameters, named as in its safetensors file.
pub struct Projector {
    pub config: ProjectorConfig,
    /// Encoder hidden states mixed per frame (1: the encoder's output, no mixing weights).
    pub layers: usize,
    /// The width of one encoder hidden state.
    pub d_in: usize,
    pub d_out: usize,
    params: Vec<(String, Var)>,
}

fn uniform(rng: &mut StdRng, shape: (usize, usize), bound: f32, device: &Device) -> Result<Var> {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(v, shape, device)?)?)
}

impl Projector {
    /// Fresh parameters, deterministic for a seed: LayerNorm gain 1 and bias 0, linear
    /// weights uniform in +-1/sqrt(fan_in) (PyTorch's default).
    pub fn new(
        config: &ProjectorConfig,
        d_in: usize,
        d_out: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        Self::new_mixed(config, 1, d_in, d_out, seed, device)
    }

    /// A projector over `layers` encoder hidden states of width `d_in` each; with more than
    /// one, it has mixing weights `layer_weights` (zeros: an equal mix).
    pub fn new_mixed(
        config: &ProjectorConfig,
        layers: usize,
        d_in: usize,
        d_out: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let bad = |reason: String| ModelError::ConfigMismatch {
            source_desc: "projector config".into(),
            reason,
        };
        config.check().map_err(bad)?;
        if layers == 0 {
            return Err(bad("no encoder hidden states to project".into()));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let ln_in = match config.kind {
            ProjectorKind::Stack => d_in * config.stack,
            ProjectorKind::PoolLnLinear | ProjectorKind::Mlp => d_in,
        };
        let mut params = vec![
            (
                "ln.weight".to_string(),
                Var::from_tensor(&Tensor::ones(ln_in, DType::F32, device)?)?,
            ),
            (
                "ln.bias".to_string(),
                Var::from_tensor(&Tensor::zeros(ln_in, DType::F32, device)?)?,
            ),
        ];
        match config.kind {
            ProjectorKind::PoolLnLinear | ProjectorKind::Stack => {
                let b = 1.0 / (ln_in as f32).sqrt();
                params.push((
                    "proj.weight".into(),
                    uniform(&mut rng, (d_out, ln_in), b, device)?,
                ));
            }
            ProjectorKind::Mlp => {
                let hidden = config.hidden.unwrap_or(d_out);
                let b1 = 1.0 / (ln_in as f32).sqrt();
                let b2 = 1.0 / (hidden as f32).sqrt();
                params.push((
                    "fc1.weight".into(),
                    uniform(&mut rng, (hidden, ln_in), b1, device)?,
                ));
                params.push((
                    "fc1.bias".into(),
                    Var::from_tensor(&Tensor::zeros(hidden, DType::F32, device)?)?,
                ));
                params.push((
                    "fc2.weight".into(),
                    uniform(&mut rng, (d_out, hidden), b2, device)?,
                ));
            }
        }
        if layers > 1 {
            // Last in the list: the kind's parameters keep their places and their draws.
            params.push((
                "layer_weights".into(),
                Var::from_tensor(&Tensor::zeros(layers, DType::F32, device)?)?,
            ));
        }
        Ok(Self {
            config: config.clone(),
            layers,
            d_in,
            d_out,
            params,
        })
    }

    /// The same parameters in another dtype (f64 for finite-difference checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let params = self
            .params
            .iter()
            .map(|(n, v)| {
                Ok((
                    n.clone(),
                    Var::from_tensor(&v.as_tensor().to_dtype(dtype)?)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: self.config.clone(),
            layers: self.layers,
            d_in: self.d_in,
            d_out: self.d_out,
            params,
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    fn p(&self, name: &str) -> &Tensor {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_tensor())
            .expect("parameter exists for this kind")
    }

    /// Number of audio positions produced from `frames` encoder frames.
    pub fn positions(&self, frames: usize) -> usize {
        match self.config.kind {
            ProjectorKind::Stack => frames / self.config.stack,
            ProjectorKind::PoolLnLinear | ProjectorKind::Mlp => self.config.positions.min(frames),
        }
    }

    /// The learned mix of encoder hidden states (softmax of `layer_weights`), if any.
    pub fn layer_mix(&self) -> Result<Option<Vec<f32>>> {
        if self.layers == 1 {
            return Ok(None);
        }
        let w = self.p("layer_weights").to_dtype(DType::F32)?;
        Ok(Some(candle_nn::ops::softmax(&w, 0)?.to_vec1()?))
    }

    /// (B, frames, layers * d_in) -> (B, positions, d_out), f32.
    pub fn forward(&self, enc: &Tensor) -> Result<Tensor> {
        let (b, frames, width) = enc.dims3()?;
        if width != self.d_in * self.layers {
            let built = if self.layers == 1 {
                format!("{}", self.d_in)
            } else {
                format!(
                    "{} ({} hidden states of {})",
                    self.d_in * self.layers,
                    self.layers,
                    self.d_in
                )
            };
            return Err(ModelError::Input {
                what: "projector input".into(),
                reason: format!("encoder width {width}, the projector was built for {built}"),
            });
        }
        let d = self.d_in;
        let x = enc.to_dtype(self.params[0].1.dtype())?;
        let x = if self.layers > 1 {
            // (B, frames, L, d): each state normalised, then the softmax-weighted sum over L.
            let x = layer_norm_plain(&x.reshape((b, frames, self.layers, d))?)?;
            let w = self.p("layer_weights");
            let w = w.broadcast_sub(&w.max_keepdim(0)?)?.exp()?;
            let w = w.broadcast_div(&w.sum_keepdim(0)?)?;
            x.broadcast_mul(&w.reshape((1, 1, self.layers, 1))?)?
                .sum(2)?
        } else {
            x
        };
        let x = match self.config.kind {
            ProjectorKind::Stack => {
                let k = self.config.stack;
                x.narrow(1, 0, frames / k * k)?
                    .reshape((b, frames / k, d * k))?
            }
            ProjectorKind::PoolLnLinear | ProjectorKind::Mlp => {
                adaptive_avg_pool(&x, self.config.positions.min(frames))?
            }
        };
        let x = layer_norm_plain(&x)?
            .broadcast_mul(self.p("ln.weight"))?
            .broadcast_add(self.p("ln.bias"))?;
        let linear = |x: &Tensor, w: &Tensor| x.broadcast_matmul(&w.t()?);
        Ok(match self.config.kind {
            ProjectorKind::PoolLnLinear | ProjectorKind::Stack => {
                linear(&x, self.p("proj.weight"))?
            }
            ProjectorKind::Mlp => {
                let h = linear(&x, self.p("fc1.weight"))?
                    .broadcast_add(self.p("fc1.bias"))?
                    .gelu_erf()?;
                linear(&h, self.p("fc2.weight"))?
            }
        })
    }

    /// Writes the parameters as safetensors (atomically: temp file, then rename).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let map: std::collections::HashMap<String, Tensor> = self
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        let tmp = path.with_extension("safetensors.tmp");
        candle_core::safetensors::save(&map, &tmp)?;
        std::fs::rename(&tmp, path).map_err(|cause| ModelError::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        Ok(())
    }

    /// Loads parameters saved by [`Projector::save`] into this projector (same config).
    pub fn load_into(&mut self, path: &std::path::Path) -> Result<()> {
        let store = super::WeightStore::from_safetensors(
            &[path.to_path_buf()],
            &self.params[0].1.device().clone(),
        )?;
        store.verify_finite()?;
        self.load_store(&store, |_| true)
    }

    /// Loads this projector's tensors from `store`, where `mine` says which of its names are
    /// the projector's (a trained-weights file also holds LoRA tensors).
    pub fn load_store(
        &mut self,
        store: &super::WeightStore,
        mine: impl Fn(&str) -> bool,
    ) -> Result<()> {
        // A file of another projector (another kind, or mixing other encoder hidden states)
        // is refused here, not loaded in part.
        let mismatch = |reason: String| ModelError::Input {
            what: "not this config's projector".into(),
            reason,
        };
        let mut extra: Vec<&str> = store
            .names()
            .filter(|n| mine(n) && !self.params.iter().any(|(p, _)| p == n))
            .collect();
        extra.sort_unstable();
        if !extra.is_empty() {
            let kind = serde_json::to_string(&self.config.kind).unwrap_or_default();
            let hint = if extra.contains(&"layer_weights") {
                "; its run mixed several encoder hidden states: set [encoder] layers as that \
                 run did"
            } else {
                ""
            };
            return Err(mismatch(format!(
                "it holds {}, which a {} projector over {} encoder hidden state(s) does not \
                 have{hint}",
                extra.join(", "),
                kind.trim_matches('"'),
                self.layers,
            )));
        }
        if self.layers > 1 && !store.contains("layer_weights") {
            return Err(mismatch(format!(
                "it has no layer_weights: its run read the encoder's output alone, this \
                 config mixes {} hidden states ([encoder] layers)",
                self.layers
            )));
        }
        for (name, var) in &self.params {
            let t = store.get(name, var.dims(), DType::F32)?;
            var.set(&t)?;
        }
        Ok(())
    }
}

/// LayerNorm over the last axis without gain or bias, from primitive ops (candle's fused
/// layer_norm has no backward).
fn layer_norm_plain(x: &Tensor) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(centred.broadcast_div(&(var + LN_EPS)?.sqrt()?)?)
}

/// PyTorch's adaptive_avg_pool1d over the sequence axis: (B, L, d) -> (B, n, d), output i
/// averaging frames floor(i L / n) .. ceil((i + 1) L / n).
pub fn adaptive_avg_pool(x: &Tensor, n: usize) -> Result<Tensor> {
    let (_, l, _) = x.dims3()?;
    if n == l {
        return Ok(x.clone());
    }
    let mut m = vec![0f32; n * l];
    for i in 0..n {
        let start = i * l / n;
        let end = ((i + 1) * l).div_ceil(n);
        let w = 1.0 / (end - start) as f32;
        for j in start..end {
            m[i * l + j] = w;
        }
    }
    let pool = Tensor::from_vec(m, (n, l), x.device())?.to_dtype(x.dtype())?;
    Ok(pool.broadcast_matmul(x)?)
}
