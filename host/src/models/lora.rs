//! LoRA adapters on the frozen LLM's linear layers, as PEFT defines them: a projection
//! `y = x W^T` becomes `y = x W^T + s * dropout(x) A^T B^T` with A (r, in) and B (out, r)
//! trained and W untouched, s = alpha / r (or alpha / sqrt(r) with rsLoRA). A starts as
//! PEFT's Kaiming-uniform draw, B at zero, so a fresh adapter changes nothing.
//!
//! The base weights stay frozen (and packed, for GGUF models): the low-rank branch is f32
//! Vars beside them, added to the frozen product's output. Tensor names are PEFT's
//! (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`), so the trained
//! tensors, checkpoints and an `adapter_model.safetensors` all use one naming.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::weights::{ModelError, Result};

/// The prefix of every LoRA tensor name (PEFT's wrapping of a causal LM).
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Ranks past this are a typo (PEFT's own examples stop at 256).
pub const MAX_RANK: usize = 1024;

/// The sizes of a Llama-family decoder that the adapters' shapes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    /// The base keeps llama.cpp's row order of q/k projections (GGUF: rotary on adjacent
    /// pairs) rather than Hugging Face's (rotary on halves).
    pub rope_interleaved: bool,
}

/// A linear layer of a Llama-family decoder layer that may carry an adapter, by PEFT's
/// module name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    QProj,
    KProj,
    VProj,
    OProj,
    GateProj,
    UpProj,
    DownProj,
}

/// The projections the model computes as one product (q/k/v and gate/up are stacked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Product {
    Qkv,
    O,
    GateUp,
    Down,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::QProj,
        LoraTarget::KProj,
        LoraTarget::VProj,
        LoraTarget::OProj,
        LoraTarget::GateProj,
        LoraTarget::UpProj,
        LoraTarget::DownProj,
    ];

    /// PEFT's module name (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        match self {
            LoraTarget::QProj => "q_proj",
            LoraTarget::KProj => "k_proj",
            LoraTarget::VProj => "v_proj",
            LoraTarget::OProj => "o_proj",
            LoraTarget::GateProj => "gate_proj",
            LoraTarget::UpProj => "up_proj",
            LoraTarget::DownProj => "down_proj",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The module holding it (`self_attn` or `mlp`).
    fn module(self) -> &'static str {
        match self {
            LoraTarget::QProj | LoraTarget::KProj | LoraTarget::VProj | LoraTarget::OProj => {
                "self_attn"
            }
            LoraTarget::GateProj | LoraTarget::UpProj | LoraTarget::DownProj => "mlp",
        }
    }

    /// The product it is part of, and its columns there: (product, first column, width).
    fn place(self, cfg: &DecoderShape) -> (Product, usize, usize) {
        let (nh, nkv, hd) = (cfg.heads, cfg.kv_heads, cfg.head_dim);
        let i = cfg.intermediate;
        match self {
            LoraTarget::QProj => (Product::Qkv, 0, nh * hd),
            LoraTarget::KProj => (Product::Qkv, nh * hd, nkv * hd),
            LoraTarget::VProj => (Product::Qkv, (nh + nkv) * hd, nkv * hd),
            LoraTarget::OProj => (Product::O, 0, cfg.hidden),
            LoraTarget::GateProj => (Product::GateUp, 0, i),
            LoraTarget::UpProj => (Product::GateUp, i, i),
            LoraTarget::DownProj => (Product::Down, 0, cfg.hidden),
        }
    }

    /// (in, out) features of the projection.
    fn features(self, cfg: &DecoderShape) -> (usize, usize) {
        let (_, _, out) = self.place(cfg);
        let input = match self {
            LoraTarget::OProj => cfg.heads * cfg.head_dim,
            LoraTarget::DownProj => cfg.intermediate,
            _ => cfg.hidden,
        };
        (input, out)
    }
}

fn default_rank() -> usize {
    8
}
fn default_alpha() -> f64 {
    32.0
}
fn default_dropout() -> f64 {
    0.05
}
fn default_targets() -> Vec<LoraTarget> {
    vec![LoraTarget::QProj, LoraTarget::VProj]
}

/// `[lora]` of a run config: present means the LLM gets adapters, trained with the projector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LoraConfig {
    /// r: the adapters' rank.
    #[serde(default = "default_rank")]
    pub rank: usize,
    /// The branch is scaled by alpha / r (alpha / sqrt(r) with `use-rslora`).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the branch's input while training (PEFT's lora_dropout).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
    /// PEFT module names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    #[serde(default = "default_targets")]
    pub targets: Vec<LoraTarget>,
    /// Decoder layers that get adapters (0-based); all when absent.
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    /// rsLoRA's scale, alpha / sqrt(r).
    #[serde(default)]
    pub use_rslora: bool,
    /// The adapters' learning rate (default: train.lr); it follows train's schedule.
    #[serde(default)]
    pub lr: Option<f64>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: default_rank(),
            alpha: default_alpha(),
            dropout: default_dropout(),
            targets: default_targets(),
            layers: None,
            use_rslora: false,
            lr: None,
        }
    }
}

impl LoraConfig {
    /// Checks what does not depend on the model (so a config is refused before loading).
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.rank == 0 || self.rank > MAX_RANK {
            return Err(format!(
                "lora.rank = {} must be in 1..={MAX_RANK}",
                self.rank
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(format!("lora.alpha = {} must be positive", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("lora.dropout = {} must be in [0, 1)", self.dropout));
        }
        if self.targets.is_empty() {
            return Err(
                "lora.targets is empty: name at least one of q_proj, k_proj, v_proj, \
                        o_proj, gate_proj, up_proj, down_proj"
                    .into(),
            );
        }
        let mut seen = self.targets.clone();
        seen.sort();
        seen.dedup();
        if seen.len() != self.targets.len() {
            return Err("lora.targets names a module twice".into());
        }
        if let Some(layers) = &self.layers {
            if layers.is_empty() {
                return Err("lora.layers is empty (leave it out for every layer)".into());
            }
        }
        if let Some(lr) = self.lr {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(format!("lora.lr = {lr} must be positive"));
            }
        }
        Ok(())
    }

    /// The branch's scale.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// The decoder layers with adapters, checked against a model of `n_layers`.
    pub fn layer_indices(&self, n_layers: usize) -> std::result::Result<Vec<usize>, String> {
        match &self.layers {
            None => Ok((0..n_layers).collect()),
            Some(layers) => {
                let mut l = layers.clone();
                l.sort_unstable();
                l.dedup();
                if l.len() != layers.len() {
                    return Err("lora.layers names a layer twice".into());
                }
                if let Some(bad) = l.iter().find(|&&i| i >= n_layers) {
                    return Err(format!(
                        "lora.layers names layer {bad}; the LLM has layers 0..{}",
                        n_layers.saturating_sub(1)
                    ));
                }
                Ok(l)
            }
        }
    }
}

/// One projection's adapter.
struct Pair {
    target: LoraTarget,
    /// (r, in)
    a: Var,
    /// (out, r)
    b: Var,
}

/// Adapters for some linear layers of every (chosen) decoder layer.
pub struct LoraAdapter {
    pub config: LoraConfig,
    scale: f64,
    /// Per decoder layer (all of the model's, empty where none): its adapters.
    layers: Vec<Vec<Pair>>,
    /// Column places of each target in its product, and each product's width.
    places: HashMap<LoraTarget, (Product, usize, usize)>,
    widths: HashMap<Product, usize>,
    /// While training: the seed of each example's dropout masks, in batch order.
    dropout_seed: Mutex<Option<Vec<u64>>>,
    /// Changes whenever the values may have changed (keys the prompt-prefix cache).
    generation: AtomicU64,
    /// Query and key/value heads when the base's q/k rows are in llama.cpp's order (see
    /// [`DecoderShape::rope_interleaved`]): PEFT's files hold B's rows in Hugging Face's.
    interleaved_heads: Option<(usize, usize)>,
}

static GENERATIONS: AtomicU64 = AtomicU64::new(1);

fn bad(reason: String) -> ModelError {
    ModelError::Input {
        what: "LoRA adapter".into(),
        reason,
    }
}

impl LoraAdapter {
    /// Fresh adapters for a model of `cfg`: A drawn as PEFT draws it (Kaiming-uniform with
    /// a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), B zero.
    pub fn new(
        config: &LoraConfig,
        cfg: &DecoderShape,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        config.check().map_err(bad)?;
        let chosen = config.layer_indices(cfg.layers).map_err(bad)?;
        let mut rng = StdRng::seed_from_u64(seed ^ 0x10_7A_AD_A9_7E);
        let r = config.rank;
        let mut targets = config.targets.clone();
        targets.sort();
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let mut pairs = Vec::new();
            if chosen.contains(&i) {
                for &target in &targets {
                    let (input, out) = target.features(cfg);
                    if r > input.min(out) {
                        return Err(bad(format!(
                            "lora.rank = {r} exceeds {}'s smaller side ({input} in, {out} out)",
                            target.name()
                        )));
                    }
                    let bound = 1.0 / (input as f64).sqrt();
                    let a: Vec<f32> = (0..r * input)
                        .map(|_| rng.random_range(-bound..bound) as f32)
                        .collect();
                    pairs.push(Pair {
                        target,
                        a: Var::from_tensor(&Tensor::from_vec(a, (r, input), device)?)?,
                        b: Var::zeros((out, r), DType::F32, device)?,
                    });
                }
            }
            layers.push(pairs);
        }
        let places = LoraTarget::ALL
            .into_iter()
            .map(|t| (t, t.place(cfg)))
            .collect();
        let widths = HashMap::from([
            (Product::Qkv, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim),
            (Product::O, cfg.hidden),
            (Product::GateUp, 2 * cfg.intermediate),
            (Product::Down, cfg.hidden),
        ]);
        Ok(Self {
            scale: config.scale(),
            config: config.clone(),
            layers,
            places,
            widths,
            dropout_seed: Mutex::new(None),
            generation: AtomicU64::new(GENERATIONS.fetch_add(1, Ordering::Relaxed)),
            interleaved_heads: cfg.rope_interleaved.then_some((cfg.heads, cfg.kv_heads)),
        })
    }

    /// The same adapters (values copied) in another dtype: f64 for finite-difference checks.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let convert =
            |v: &Var| -> Result<Var> { Ok(Var::from_tensor(&v.as_tensor().to_dtype(dtype)?)?) };
        let layers = self
            .layers
            .iter()
            .map(|pairs| {
                pairs
                    .iter()
                    .map(|p| {
                        Ok(Pair {
                            target: p.target,
                            a: convert(&p.a)?,
                            b: convert(&p.b)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: self.config.clone(),
            scale: self.scale,
            layers,
            places: self.places.clone(),
            widths: self.widths.clone(),
            dropout_seed: Mutex::new(None),
            generation: AtomicU64::new(GENERATIONS.fetch_add(1, Ordering::Relaxed)),
            interleaved_heads: self.interleaved_heads,
        })
    }

    /// PEFT's name of a tensor: `base_model.model.model.layers.{i}.{module}.{target}.lora_{A|B}.weight`.
    pub fn tensor_name(layer: usize, target: LoraTarget, which: char) -> String {
        format!(
            "{PEFT_PREFIX}model.layers.{layer}.{}.{}.lora_{which}.weight",
            target.module(),
            target.name()
        )
    }

    /// Every trainable tensor, by PEFT name, in a fixed order (layer, target, A then B).
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (i, pairs) in self.layers.iter().enumerate() {
            for p in pairs {
                out.push((Self::tensor_name(i, p.target, 'A'), p.a.clone()));
                out.push((Self::tensor_name(i, p.target, 'B'), p.b.clone()));
            }
        }
        out
    }

    /// Loads tensors by PEFT name (all of them must be there, with this adapter's shapes;
    /// names it does not have are refused).
    pub fn load_map(&self, tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        let params = self.params();
        let mut extra: Vec<&String> = tensors
            .keys()
            .filter(|n| !params.iter().any(|(p, _)| p == *n))
            .collect();
        extra.sort();
        if let Some(first) = extra.first() {
            return Err(bad(format!(
                "{} holds {} LoRA tensor(s) this config's [lora] does not make (first: \
                 {first}): set [lora] targets/layers/rank as its run did",
                source.display(),
                extra.len()
            )));
        }
        for (name, var) in &params {
            let t = tensors.get(name).ok_or_else(|| {
                bad(format!(
                    "{} has no {name}: its run had no such adapter (check [lora] targets \
                     and layers)",
                    source.display()
                ))
            })?;
            if t.dims() != var.dims() {
                return Err(ModelError::Shape {
                    source_desc: source.display().to_string(),
                    name: name.clone(),
                    expected: var.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        self.touch();
        Ok(())
    }

    /// Marks the values as changed (after an optimizer step or a load).
    pub fn touch(&self) {
        self.generation.store(
            GENERATIONS.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }

    /// A number that differs whenever the values may differ.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Sets (training) or clears (eval, inference) the seeds of the dropout masks: one per
    /// example of the batch, in batch order. Each example's rows draw their masks from its
    /// own seed, so an example gets the same masks whatever batch it is in and however long
    /// the batch is padded (after the example's positions): the same on any number of
    /// data-parallel ranks.
    pub fn set_dropout_seed(&self, seeds: Option<Vec<u64>>) {
        *self.dropout_seed.lock().unwrap_or_else(|e| e.into_inner()) = seeds;
    }

    /// The adapters on `product` of decoder layer `layer` (none past the model's layers).
    fn pairs_on(&self, layer: usize, product: Product) -> Vec<&Pair> {
        self.layers.get(layer).map_or_else(Vec::new, |pairs| {
            pairs
                .iter()
                .filter(|p| self.places[&p.target].0 == product)
                .collect()
        })
    }

    /// This forward's dropout mask (rows, in) for one adapter's input, in `dtype`: `None`
    /// outside training (no seed) or without dropout.
    fn mask(
        &self,
        layer: usize,
        target: LoraTarget,
        rows: usize,
        input: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let seeds = self.dropout_seed.lock().unwrap_or_else(|e| e.into_inner());
        match (seeds.as_deref(), self.config.dropout) {
            (Some(seeds), p) if p > 0.0 => {
                // Rows are example-major: each example's `per` rows from its own seed.
                if seeds.is_empty() || !rows.is_multiple_of(seeds.len()) {
                    return Err(bad(format!(
                        "LoRA dropout: {} example seed(s) for a forward of {rows} rows",
                        seeds.len()
                    )));
                }
                let per = rows / seeds.len();
                let mut mask = Vec::with_capacity(rows * input);
                for &seed in seeds {
                    mask.extend(dropout_mask(seed, layer, target, per * input, p));
                }
                Ok(Some(
                    Tensor::from_vec(mask, (rows, input), device)?.to_dtype(dtype)?,
                ))
            }
            _ => Ok(None),
        }
    }

    /// The branch's output for `product` of decoder layer `layer` at input `x` (.., in): a
    /// tensor as wide as the product (zeros in the columns of untargeted projections), in
    /// `x`'s dtype; `None` where the product has no adapter.
    pub fn delta(&self, layer: usize, product: Product, x: &Tensor) -> Result<Option<Tensor>> {
        let here = self.pairs_on(layer, product);
        if here.is_empty() {
            return Ok(None);
        }
        let dims = x.dims().to_vec();
        let (&input, lead) = dims.split_last().expect("a product input has dims");
        // The branch runs in the adapters' dtype (f32; f64 in gradient checks).
        let wide = here[0].a.dtype();
        let x32 = x.to_dtype(wide)?.reshape(((), input))?;
        let rows = x32.dim(0)?;
        let width = self.widths[&product];
        let mut parts: Vec<Tensor> = Vec::new();
        let mut col = 0;
        for p in here {
            let (_, start, w) = self.places[&p.target];
            if start > col {
                parts.push(Tensor::zeros((rows, start - col), wide, x.device())?);
            }
            let xin = match self.mask(layer, p.target, rows, input, wide, x.device())? {
                Some(mask) => (&x32 * mask)?,
                None => x32.clone(),
            };
            // Without a gradient wanted (captioning), the branch stays off the graph, so the
            // frozen products after it keep their inference kernels.
            let (a, b) = if x.track_op() {
                (p.a.as_tensor().clone(), p.b.as_tensor().clone())
            } else {
                (p.a.as_tensor().detach(), p.b.as_tensor().detach())
            };
            let h = xin.matmul(&a.t()?)?;
            let y = (h.matmul(&b.t()?)? * self.scale)?;
            parts.push(y);
            col = start + w;
        }
        if col < width {
            parts.push(Tensor::zeros((rows, width - col), wide, x.device())?);
        }
        let joined = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Tensor::cat(&parts, 1)?
        };
        let mut shape = lead.to_vec();
        shape.push(width);
        Ok(Some(joined.reshape(shape)?.to_dtype(x.dtype())?))
    }

    /// The adapters' dtype (f32; f64 in gradient checks).
    pub fn dtype(&self) -> DType {
        self.layers
            .iter()
            .flatten()
            .next()
            .map_or(DType::F32, |p| p.a.dtype())
    }

    /// As [`LoraAdapter::delta`] for a forward off candle's graph (a taped layer): the
    /// branch from the adapters' current values, and what its hand-written backward needs.
    /// `x` must be in the adapters' dtype.
    pub fn delta_taped(
        &self,
        layer: usize,
        product: Product,
        x: &Tensor,
    ) -> Result<Option<(Tensor, Vec<BranchTape>)>> {
        let here = self.pairs_on(layer, product);
        if here.is_empty() {
            return Ok(None);
        }
        let dims = x.dims().to_vec();
        let (&input, lead) = dims.split_last().expect("a product input has dims");
        let x2 = x.reshape(((), input))?;
        let rows = x2.dim(0)?;
        let width = self.widths[&product];
        let mut joined = Tensor::zeros((rows, width), x.dtype(), x.device())?;
        let mut tapes = Vec::with_capacity(here.len());
        for p in here {
            let (_, start, w) = self.places[&p.target];
            let mask = self.mask(layer, p.target, rows, input, x.dtype(), x.device())?;
            let xin = match &mask {
                Some(m) => (&x2 * m)?,
                None => x2.clone(),
            };
            let a = p.a.as_tensor().detach();
            let b = p.b.as_tensor().detach();
            let low = xin.matmul(&a.t()?)?;
            let y = (low.matmul(&b.t()?)? * self.scale)?;
            joined = joined.slice_assign(&[0..rows, start..start + w], &y)?;
            tapes.push(BranchTape {
                start,
                width: w,
                input: xin,
                mask,
                low,
                a,
                b,
                scale: self.scale,
                a_var: p.a.as_tensor().clone(),
                b_var: p.b.as_tensor().clone(),
                grads: Default::default(),
            });
        }
        let mut shape = lead.to_vec();
        shape.push(width);
        Ok(Some((joined.reshape(shape)?, tapes)))
    }

    /// The weight change the adapters on `product` of decoder layer `layer` amount to,
    /// s B A placed in their rows of the product's (out, in) weight; `None` without any.
    pub fn weight_delta(&self, layer: usize, product: Product) -> Result<Option<Tensor>> {
        let mut delta: Option<Tensor> = None;
        for p in self.pairs_on(layer, product) {
            let (_, start, w) = self.places[&p.target];
            let a = p.a.as_tensor().to_dtype(DType::F32)?;
            let b = p.b.as_tensor().to_dtype(DType::F32)?;
            let rows = (b.matmul(&a)? * self.scale)?;
            let width = self.widths[&product];
            let d = match delta {
                Some(d) => d,
                None => Tensor::zeros((width, a.dim(1)?), DType::F32, a.device())?,
            };
            delta = Some(d.slice_assign(&[start..start + w, 0..a.dim(1)?], &rows)?);
        }
        Ok(delta)
    }

    /// The adapters' tensors as PEFT holds them for the Hugging Face model: B's rows of
    /// q_proj and k_proj put back in Hugging Face's order when the base keeps llama.cpp's.
    pub fn peft_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, pairs) in self.layers.iter().enumerate() {
            for p in pairs {
                out.insert(Self::tensor_name(i, p.target, 'A'), p.a.as_tensor().clone());
                let b = self.reorder_rows(p.target, p.b.as_tensor(), true)?;
                out.insert(Self::tensor_name(i, p.target, 'B'), b);
            }
        }
        Ok(out)
    }

    /// Loads PEFT's tensors (Hugging Face's row order; see [`Self::peft_tensors`]).
    pub fn load_peft(&self, tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        let mut ours = HashMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            let target = LoraTarget::ALL
                .into_iter()
                .find(|tg| name.ends_with(&format!(".{}.lora_B.weight", tg.name())));
            let t = match target {
                Some(tg) => self.reorder_rows(tg, t, false)?,
                None => t.clone(),
            };
            ours.insert(name.clone(), t);
        }
        self.load_map(&ours, source)
    }

    /// B's rows of q_proj/k_proj between llama.cpp's per-head order (head, i, half) and
    /// Hugging Face's (head, half, i): `to_hf` one way, else the other; other targets, a
    /// base in Hugging Face's order, and tensors of another shape, unchanged.
    fn reorder_rows(&self, target: LoraTarget, b: &Tensor, to_hf: bool) -> Result<Tensor> {
        let heads = match (self.interleaved_heads, target) {
            (Some((nh, _)), LoraTarget::QProj) => nh,
            (Some((_, nkv)), LoraTarget::KProj) => nkv,
            _ => return Ok(b.clone()),
        };
        let Ok((out, r)) = b.dims2() else {
            return Ok(b.clone());
        };
        if heads == 0 || out % (2 * heads) != 0 {
            return Ok(b.clone());
        }
        let half = out / heads / 2;
        let shape = if to_hf {
            (heads, half, 2, r)
        } else {
            (heads, 2, half, r)
        };
        Ok(b.reshape(shape)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((out, r))?)
    }

    /// PEFT's `adapter_config.json` for this adapter.
    pub fn peft_config(&self, base_model: &str) -> serde_json::Value {
        let c = &self.config;
        let mut targets: Vec<&str> = c.targets.iter().map(|t| t.name()).collect();
        targets.sort_unstable();
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": c.rank,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "target_modules": targets,
            "layers_to_transform": c.layers,
            "use_rslora": c.use_rslora,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": false,
        })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (PEFT's layout) into
    /// `dir`, each atomically.
    pub fn save_peft(&self, dir: &Path, base_model: &str) -> Result<()> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |cause| ModelError::Io { path, cause }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let tensors = self.peft_tensors()?;
        let weights = dir.join("adapter_model.safetensors");
        let tmp = dir.join(".adapter_model.safetensors.tmp");
        super::weights::save_safetensors_pt(&tensors, &tmp)?;
        std::fs::rename(&tmp, &weights).map_err(io(&weights))?;
        let config = dir.join("adapter_config.json");
        let tmp = dir.join(".adapter_config.json.tmp");
        let text = serde_json::to_string_pretty(&self.peft_config(base_model))
            .expect("a JSON value serialises");
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &config).map_err(io(&config))?;
        Ok(())
    }
}

/// What the hand-written backward of one adapter in a taped layer needs, and where it
/// leaves d(loss)/dA and d(loss)/dB for the graph nodes ([`crate::models::fused::grad_port`])
/// that hand them to candle.
pub struct BranchTape {
    /// Its columns in the product's output.
    start: usize,
    width: usize,
    /// The branch's input after dropout (rows, in).
    input: Tensor,
    mask: Option<Tensor>,
    /// input A^T (rows, r).
    low: Tensor,
    a: Tensor,
    b: Tensor,
    scale: f64,
    /// The Vars' tensors: the ids their gradients are stored under.
    pub a_var: Tensor,
    pub b_var: Tensor,
    pub grads: BranchGrads,
}

/// d(loss)/dA and d(loss)/dB of one adapter, filled by [`BranchTape::backward`].
#[derive(Default, Clone)]
pub struct BranchGrads {
    pub a: crate::models::fused::GradSlot,
    pub b: crate::models::fused::GradSlot,
}

impl BranchTape {
    /// From d(loss)/d(product output) (rows, product width): stores dA and dB and returns the
    /// branch's share of d(loss)/d(product input) (rows, in).
    pub fn backward(&self, d_out: &Tensor) -> candle_core::Result<Tensor> {
        let g = d_out.narrow(1, self.start, self.width)?.contiguous()?;
        let db = (g.t()?.matmul(&self.low)? * self.scale)?;
        let dh = (g.matmul(&self.b)? * self.scale)?;
        let da = dh.t()?.matmul(&self.input)?;
        let du = dh.matmul(&self.a)?;
        let du = match &self.mask {
            Some(m) => (du * m)?,
            None => du,
        };
        *self.grads.a.lock().unwrap_or_else(|e| e.into_inner()) = Some(da);
        *self.grads.b.lock().unwrap_or_else(|e| e.into_inner()) = Some(db);
        Ok(du)
    }
}

/// Inverted-dropout mask (0 or 1 / (1 - p)) for one projection's input in one forward:
/// drawn from (seed, layer, target), so a resumed run draws the same masks.
fn dropout_mask(seed: u64, layer: usize, target: LoraTarget, n: usize, p: f64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((layer as u64) << 8) ^ target as u64,
    );
    let keep = (1.0 / (1.0 - p)) as f32;
    (0..n)
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect()
}

/// A PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`), as Python's
/// `peft` writes it: its settings as a [`LoraConfig`] and its tensors.
pub struct PeftAdapter {
    pub config: LoraConfig,
    pub tensors: HashMap<String, Tensor>,
    pub weights: PathBuf,
}

/// The largest adapter_model.safetensors read (it is read whole into memory).
const MAX_PEFT_WEIGHTS_BYTES: u64 = 4 << 30;

/// The most an adapter_config.json may hold (a real one is ~1 KB).
const MAX_PEFT_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a PEFT LoRA adapter folder, refusing settings earshot does not implement (DoRA,
/// per-module rank or alpha patterns, bias training, modules_to_save, fan_in_fan_out) by
/// name rather than computing something else.
pub fn read_peft(dir: &Path, device: &Device) -> Result<PeftAdapter> {
    let weights = dir.join("adapter_model.safetensors");
    Ok(PeftAdapter {
        config: read_peft_config(&dir.join("adapter_config.json"))?,
        tensors: read_peft_weights(&weights, device)?,
        weights,
    })
}

fn file_len(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)
        .map_err(|cause| ModelError::Io {
            path: path.to_path_buf(),
            cause,
        })?
        .len())
}

/// PEFT's adapter_config.json as a [`LoraConfig`], refusing what earshot does not implement.
fn read_peft_config(config_path: &Path) -> Result<LoraConfig> {
    let reason = |r: String| bad(format!("{}: {r}", config_path.display()));
    let len = file_len(config_path)?;
    if len > MAX_PEFT_CONFIG_BYTES {
        return Err(reason(format!(
            "{len} bytes; an adapter config is a few KB"
        )));
    }
    let text = crate::files::read_to_string(config_path).map_err(|cause| ModelError::Io {
        path: config_path.to_path_buf(),
        cause,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| reason(format!("not JSON: {e}")))?;
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    let peft_type = get("peft_type").and_then(|x| x.as_str()).unwrap_or("");
    if peft_type != "LORA" {
        return Err(reason(format!(
            "peft_type is {peft_type:?}; only LORA adapters are supported"
        )));
    }
    for (k, fine) in [
        ("use_dora", serde_json::json!(false)),
        ("fan_in_fan_out", serde_json::json!(false)),
        ("bias", serde_json::json!("none")),
    ] {
        if let Some(x) = get(k) {
            if *x != fine {
                return Err(reason(format!("{k} = {x} is not supported (only {fine})")));
            }
        }
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if get(k)
            .and_then(|x| x.as_object())
            .is_some_and(|m| !m.is_empty())
        {
            return Err(reason(format!(
                "{k} (per-module ranks or alphas) is not supported"
            )));
        }
    }
    if get("modules_to_save").is_some_and(|x| x.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(reason(
            "modules_to_save (fully trained modules) is not supported".into(),
        ));
    }
    if get("layer_replication").is_some() {
        return Err(reason("layer_replication is not supported".into()));
    }
    if get("layers_pattern").is_some_and(|x| x.as_str() != Some("layers")) {
        return Err(reason(
            "layers_pattern other than \"layers\" is not supported".into(),
        ));
    }
    let rank = get("r")
        .and_then(|x| x.as_u64())
        .ok_or_else(|| reason("no integer r".into()))? as usize;
    let alpha = get("lora_alpha")
        .and_then(|x| x.as_f64())
        .ok_or_else(|| reason("no number lora_alpha".into()))?;
    let dropout = get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0);
    let use_rslora = get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false);
    let names: Vec<String> = match get("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| reason("target_modules holds a non-string".into()))?,
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        _ => return Err(reason("no target_modules".into())),
    };
    let mut targets = Vec::new();
    for n in &names {
        let t = LoraTarget::from_name(n).ok_or_else(|| {
            reason(format!(
                "target module {:?} is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, \
                 up_proj, down_proj (regular expressions are not supported)",
                crate::text::display_text(n, 64)
            ))
        })?;
        if !targets.contains(&t) {
            targets.push(t);
        }
    }
    let layers = match get("layers_to_transform") {
        None => None,
        Some(serde_json::Value::Array(a)) => Some(
            a.iter()
                .map(|x| x.as_u64().map(|i| i as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| reason("layers_to_transform holds a non-integer".into()))?,
        ),
        Some(x) => Some(vec![x
            .as_u64()
            .ok_or_else(|| reason("layers_to_transform is not an integer or a list".into()))?
            as usize]),
    };
    let config = LoraConfig {
        rank,
        alpha,
        dropout: dropout.clamp(0.0, 0.99),
        targets,
        layers,
        use_rslora,
        lr: None,
    };
    config.check().map_err(reason)?;
    Ok(config)
}

/// The tensors of adapter_model.safetensors (bounded in size, finite), by PEFT name without
/// the adapter name some tools keep.
fn read_peft_weights(weights: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let size = file_len(weights)?;
    if size > MAX_PEFT_WEIGHTS_BYTES {
        return Err(bad(format!(
            "{}: {size} bytes, more than the {} GiB a LoRA adapter may have here (rank 64 on \
             every projection of a 70B Llama is 3.3 GB in f32)",
            weights.display(),
            MAX_PEFT_WEIGHTS_BYTES >> 30
        )));
    }
    let bytes = crate::files::read(weights).map_err(|cause| ModelError::Io {
        path: weights.to_path_buf(),
        cause,
    })?;
    let raw = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| bad(format!("{}: invalid safetensors: {e}", weights.display())))?;
    // PEFT writes tensors without the adapter's name ("default"); some tools keep it.
    let mut tensors = HashMap::new();
    for (name, t) in raw {
        let name = name
            .replace(".lora_A.default.weight", ".lora_A.weight")
            .replace(".lora_B.default.weight", ".lora_B.weight");
        if let Some(bad_name) = super::weights::count_non_finite(&name, &t)? {
            return Err(bad(format!(
                "{}: non-finite values in {bad_name}",
                weights.display()
            )));
        }
        tensors.insert(name, t);
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::fused::tests::seeded_randn;

    fn tiny() -> DecoderShape {
        DecoderShape {
            hidden: 16,
            intermediate: 24,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
            layers: 3,
            rope_interleaved: false,
        }
    }

    #[test]
    fn a_fresh_adapter_adds_zero_and_names_tensors_as_peft() {
        let cfg = tiny();
        let lora = LoraAdapter::new(&LoraConfig::default(), &cfg, 1, &Device::Cpu).unwrap();
        let names: Vec<String> = lora.params().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 3 * 2 * 2);
        assert_eq!(
            names[0],
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        let x = seeded_randn(3001, 1.0, (2, 5, 16), DType::F32);
        let d = lora.delta(1, Product::Qkv, &x).unwrap().unwrap();
        assert_eq!(d.dims(), &[2, 5, 16 + 2 * 8]);
        assert_eq!(
            d.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        assert!(lora.delta(1, Product::Down, &x).unwrap().is_none());
    }

    #[test]
    fn the_branch_lands_in_its_projection_columns() {
        let cfg = tiny();
        let c = LoraConfig {
            targets: vec![LoraTarget::VProj, LoraTarget::QProj],
            dropout: 0.0,
            ..LoraConfig::default()
        };
        let lora = LoraAdapter::new(&c, &cfg, 1, &Device::Cpu).unwrap();
        for (_, v) in lora.params() {
            v.set(&Tensor::ones(v.dims(), DType::F32, &Device::Cpu).unwrap())
                .unwrap();
        }
        let x = Tensor::ones((1, 1, 16), DType::F32, &Device::Cpu).unwrap();
        let d: Vec<f32> = lora
            .delta(0, Product::Qkv, &x)
            .unwrap()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // x A^T = 16 per rank row; B sums 8 of them; scale 32 / 8.
        let v = 16.0 * 8.0 * 4.0;
        assert!(d[..16].iter().all(|&y| y == v), "q: {d:?}");
        assert!(d[16..24].iter().all(|&y| y == 0.0), "k: {d:?}");
        assert!(d[24..].iter().all(|&y| y == v), "v: {d:?}");
    }

    #[test]
    fn config_checks_name_the_setting() {
        let cfg = tiny();
        let over = LoraConfig {
            layers: Some(vec![3]),
            ..LoraConfig::default()
        };
        let e = LoraAdapter::new(&over, &cfg, 0, &Device::Cpu)
            .err()
            .unwrap();
        assert!(e.to_string().contains("lora.layers names layer 3"), "{e}");
        let rank = LoraConfig {
            rank: 17,
            ..LoraConfig::default()
        };
        let e = LoraAdapter::new(&rank, &cfg, 0, &Device::Cpu)
            .err()
            .unwrap();
        assert!(e.to_string().contains("exceeds q_proj"), "{e}");
        for (c, want) in [
            (
                LoraConfig {
                    rank: 0,
                    ..LoraConfig::default()
                },
                "lora.rank",
            ),
            (
                LoraConfig {
                    dropout: 1.0,
                    ..LoraConfig::default()
                },
                "lora.dropout",
            ),
            (
                LoraConfig {
                    alpha: f64::NAN,
                    ..LoraConfig::default()
                },
                "lora.alpha",
            ),
            (
                LoraConfig {
                    targets: vec![],
                    ..LoraConfig::default()
                },
                "lora.targets",
            ),
        ] {
            assert!(c.check().unwrap_err().contains(want), "{want}");
        }
    }

    #[test]
    fn dropout_masks_repeat_for_a_seed_and_keep_the_mean() {
        let a = dropout_mask(7, 2, LoraTarget::QProj, 10_000, 0.25);
        assert_eq!(a, dropout_mask(7, 2, LoraTarget::QProj, 10_000, 0.25));
        assert_ne!(a, dropout_mask(8, 2, LoraTarget::QProj, 10_000, 0.25));
        assert_ne!(a, dropout_mask(7, 2, LoraTarget::VProj, 10_000, 0.25));
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        assert!((mean - 1.0).abs() < 0.03, "{mean}");
    }

    /// An example's dropout masks come from its own seed: the same rows alone (3 positions)
    /// as second in a batch of two padded to 5 positions, so a batch split over ranks
    /// draws what it draws whole.
    #[test]
    fn an_example_draws_its_masks_whatever_its_batch() {
        let c = LoraConfig {
            dropout: 0.3,
            ..LoraConfig::default()
        };
        let lora = LoraAdapter::new(&c, &tiny(), 4, &Device::Cpu).unwrap();
        let input = 8;
        let mask = |seeds: Vec<u64>, rows: usize| -> Vec<Vec<f32>> {
            lora.set_dropout_seed(Some(seeds));
            let m = lora
                .mask(0, LoraTarget::QProj, rows, input, DType::F32, &Device::Cpu)
                .unwrap()
                .unwrap();
            m.to_vec2().unwrap()
        };
        let alone = mask(vec![42], 3);
        let batched = mask(vec![41, 42], 10);
        assert_eq!(alone[..], batched[5..8]);
        assert_ne!(batched[0..3], batched[5..8]);
        lora.set_dropout_seed(Some(vec![1, 2, 3]));
        assert!(lora
            .mask(0, LoraTarget::QProj, 10, input, DType::F32, &Device::Cpu)
            .is_err());
    }

    /// A folder written by `save_peft` reads back to the same settings and tensors; what
    /// earshot does not implement is refused by name, and a damaged file is an error.
    #[test]
    fn peft_folders_round_trip_and_unsupported_settings_are_refused() {
        let cfg = tiny();
        let c = LoraConfig {
            rank: 2,
            alpha: 8.0,
            targets: vec![LoraTarget::VProj, LoraTarget::DownProj],
            layers: Some(vec![1]),
            use_rslora: true,
            ..LoraConfig::default()
        };
        let lora = LoraAdapter::new(&c, &cfg, 4, &Device::Cpu).unwrap();
        for (_, v) in lora.params() {
            v.set(&seeded_randn(3002, 1.0, v.dims(), DType::F32))
                .unwrap();
        }
        let d = tempfile::tempdir().unwrap();
        lora.save_peft(d.path(), "base").unwrap();
        let peft = read_peft(d.path(), &Device::Cpu).unwrap();
        assert_eq!(
            peft.config,
            LoraConfig {
                targets: vec![LoraTarget::DownProj, LoraTarget::VProj],
                ..c.clone()
            }
        );
        let back = LoraAdapter::new(&peft.config, &cfg, 99, &Device::Cpu).unwrap();
        back.load_peft(&peft.tensors, &peft.weights).unwrap();
        let x = seeded_randn(3003, 1.0, (3, 16), DType::F32);
        let (a, b) = (
            lora.delta(1, Product::Qkv, &x).unwrap().unwrap(),
            back.delta(1, Product::Qkv, &x).unwrap().unwrap(),
        );
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
        // Another rank or target set than the tensors: refused by name.
        let other = LoraAdapter::new(
            &LoraConfig {
                rank: 1,
                ..c.clone()
            },
            &cfg,
            0,
            &Device::Cpu,
        )
        .unwrap();
        let e = other.load_map(&peft.tensors, &peft.weights).unwrap_err();
        assert!(e.to_string().contains("expected [1, 16]"), "{e}");

        let config_path = d.path().join("adapter_config.json");
        let good = std::fs::read_to_string(&config_path).unwrap();
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
            f(&mut v);
            std::fs::write(&config_path, v.to_string()).unwrap();
            read_peft(d.path(), &Device::Cpu)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        for (f, want) in [
            (
                &(|v: &mut serde_json::Value| v["use_dora"] = true.into())
                    as &dyn Fn(&mut serde_json::Value),
                "use_dora",
            ),
            (&|v| v["peft_type"] = "IA3".into(), "only LORA"),
            (
                &|v| v["target_modules"] = ".*proj".into(),
                "regular expressions",
            ),
            (
                &|v| v["rank_pattern"] = serde_json::json!({"q_proj": 4}),
                "rank_pattern",
            ),
            (&|v| v["r"] = 0.into(), "lora.rank"),
            (
                &|v| v["modules_to_save"] = serde_json::json!(["lm_head"]),
                "modules_to_save",
            ),
        ] {
            let e = edit(f);
            assert!(e.contains(want), "{want}: {e}");
        }
        std::fs::write(&config_path, &good).unwrap();
        let weights = d.path().join("adapter_model.safetensors");
        let bytes = std::fs::read(&weights).unwrap();
        std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
        let e = read_peft(d.path(), &Device::Cpu).err().unwrap().to_string();
        assert!(e.contains("invalid safetensors"), "{e}");
    }

    /// On a base in llama.cpp's q/k row order, PEFT's files hold q_proj/k_proj B in Hugging
    /// Face's order: the rows a head's rotary pairs (i, i + half) read there are rows (2i,
    /// 2i + 1) of ours; the round trip restores them, and v_proj is untouched.
    #[test]
    fn peft_files_hold_q_and_k_rows_in_hugging_face_order() {
        let cfg = DecoderShape {
            rope_interleaved: true,
            ..tiny()
        };
        let c = LoraConfig {
            rank: 1,
            targets: vec![LoraTarget::QProj, LoraTarget::VProj],
            ..LoraConfig::default()
        };
        let lora = LoraAdapter::new(&c, &cfg, 0, &Device::Cpu).unwrap();
        // q: 4 heads of head dim 4 = 16 rows; row k holds k.
        let rows: Vec<f32> = (0..16).map(|k| k as f32).collect();
        let q_b = LoraAdapter::tensor_name(0, LoraTarget::QProj, 'B');
        let v_b = LoraAdapter::tensor_name(0, LoraTarget::VProj, 'B');
        for (name, var) in lora.params() {
            if name == q_b || name == v_b {
                let n = var.dims()[0];
                var.set(
                    &Tensor::new(&rows[..n], &Device::Cpu)
                        .unwrap()
                        .reshape((n, 1))
                        .unwrap(),
                )
                .unwrap();
            }
        }
        let peft = lora.peft_tensors().unwrap();
        let col = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // Head 0 of ours: rows 0..4 = (i0 half0, i0 half1, i1 half0, i1 half1); HF: halves
        // first: (i0 h0, i1 h0, i0 h1, i1 h1) = ours (0, 2, 1, 3).
        assert_eq!(&col(&peft[&q_b])[..4], &[0.0, 2.0, 1.0, 3.0]);
        assert_eq!(col(&peft[&v_b]), rows[..8].to_vec());
        let back = LoraAdapter::new(&c, &cfg, 5, &Device::Cpu).unwrap();
        back.load_peft(&peft, Path::new("x")).unwrap();
        let params: HashMap<String, Var> = back.params().into_iter().collect();
        assert_eq!(col(params[&q_b].as_tensor()), rows);
    }
}
