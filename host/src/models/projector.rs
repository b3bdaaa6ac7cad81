//! The trainable projector: Whisper encoder frames (B, 1500, d_enc) -> LLM input embeddings
//! (B, N, d_llm). The only parameters that train; kept in f32 Vars.
//!
//! Kinds: `pool-ln-linear` (the write-up's: adaptive average pooling to N positions,
//! LayerNorm(d_enc), Linear(d_enc -> d_llm, no bias)), `mlp` (pool, LayerNorm, Linear, GELU,
//! Linear), `stack` (concatenate k consecutive frames, LayerNorm, Linear).

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
        let bad = |reason: String| ModelError::ConfigMismatch {
            source_desc: "projector config".into(),
            reason,
        };
        config.check().map_err(bad)?;
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
        Ok(Self {
            config: config.clone(),
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
            _ => self.config.positions.min(frames),
        }
    }

    /// (B, frames, d_in) -> (B, positions, d_out), f32.
    pub fn forward(&self, enc: &Tensor) -> Result<Tensor> {
        let (b, frames, d) = enc.dims3()?;
        if d != self.d_in {
            return Err(ModelError::Input {
                what: "projector input".into(),
                reason: format!(
                    "encoder width {d}, the projector was built for {}",
                    self.d_in
                ),
            });
        }
        let x = enc.to_dtype(self.params[0].1.dtype())?;
        let x = match self.config.kind {
            ProjectorKind::Stack => {
                let k = self.config.stack;
                x.narrow(1, 0, frames / k * k)?
                    .reshape((b, frames / k, d * k))?
            }
            _ => adaptive_avg_pool(&x, self.config.positions.min(frames))?,
        };
        // LayerNorm from primitive ops (candle's fused layer_norm has no backward).
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let x = centred
            .broadcast_div(&(var + LN_EPS)?.sqrt()?)?
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
        for (name, var) in &self.params {
            let t = store.get(name, var.dims(), DType::F32)?;
            var.set(&t)?;
        }
        Ok(())
    }
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
