//! Llama-family decoder over input embeddings. Every op on the path from embeddings to logits
//! has a working backward in candle 0.11 (see shared notes): softmax via `ops::softmax`,
//! RMSNorm from primitive ops, rotary via `rope_slow`/`rope_i_slow`; projections are
//! [`FrozenLinear`], which passes gradients to its input but never computes weight gradients.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};

use super::LanguageModel;
use crate::models::frozen::FrozenLinear;
use crate::models::fused;
use crate::models::lora::{BranchTape, DecoderShape, LoraAdapter, Product};
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::packed::PackedMatrix;
use crate::models::weights::{ModelError, Result, WeightStore};

/// Hugging Face `LlamaConfig` / `MistralConfig` fields (unknown fields ignored).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Mistral: each position attends to at most this many previous positions.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Rotate adjacent pairs (x[2i], x[2i+1]) instead of halves: the Q/K rows of llama.cpp's
    /// GGUF files are stored permuted for that convention. Set by the GGUF loader.
    #[serde(default)]
    pub rope_interleaved: bool,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

impl LlamaConfig {
    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    /// The sizes LoRA adapters for this model follow.
    pub fn decoder_shape(&self) -> DecoderShape {
        DecoderShape {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            kv_heads: self.n_kv_heads(),
            head_dim: self.head_dim(),
            layers: self.num_hidden_layers,
            rope_interleaved: self.rope_interleaved,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

/// Where logits are wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsAt {
    All,
    Last,
}

/// Per-layer keys and values, appended to by each forward. Each layer holds buffers
/// (B, n_kv_heads, capacity, head_dim) whose first `len` positions are valid: new positions
/// are written in place, so decoding does not copy (and the allocator does not re-fault) the
/// whole cache for every token. Buffers grow with headroom when full.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

/// Appends `new` (B, heads, T, hd) at position `len` of a layer's buffer, growing it when
/// full; returns the valid part (B, heads, len + T, hd) as a view.
fn append_kv(buf: &mut Option<Tensor>, len: usize, new: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = new.dims4()?;
    let need = len + t;
    let capacity = buf.as_ref().map_or(Ok(0), |x| x.dim(2))?;
    if capacity < need {
        // Headroom for the tokens that usually follow a prompt.
        let grown = (need + (need / 2).max(64)).next_multiple_of(64);
        let fresh = Tensor::zeros((b, h, grown, hd), new.dtype(), new.device())?;
        if let Some(old) = buf.as_ref().filter(|_| len > 0) {
            fresh.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
        }
        *buf = Some(fresh);
    }
    let buf = buf.as_ref().expect("allocated above");
    buf.slice_set(&new.contiguous()?, 2, len)?;
    Ok(buf.narrow(2, 0, need)?)
}

/// The keys and values (B, n_kv_heads, T, head_dim) of the new positions behind a layer's
/// earlier ones: appended to its KV cache in place (the cache's view is returned), or joined
/// to a frozen prefix's with `cat` (differentiable), or alone.
fn with_past(past: LayerPast<'_>, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
    Ok(match past {
        LayerPast::Cache(slot, len) => {
            let (mut kb, mut vb) = match slot.take() {
                Some((kb, vb)) => (Some(kb), Some(vb)),
                None => (None, None),
            };
            let k = append_kv(&mut kb, len, &k)?;
            let v = append_kv(&mut vb, len, &v)?;
            *slot = kb.zip(vb);
            (k, v)
        }
        LayerPast::Frozen(Some((pk, pv)), len) if len > 0 => {
            let (b, nkv, _, hd) = k.dims4()?;
            let join = |old: &Tensor, new: &Tensor| -> Result<Tensor> {
                let old = old.narrow(2, 0, len)?.broadcast_as((b, nkv, len, hd))?;
                Ok(Tensor::cat(&[&old.contiguous()?, new], 2)?)
            };
            (join(pk, &k)?, join(pv, &v)?)
        }
        LayerPast::Frozen(..) | LayerPast::None => (k, v),
    })
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
        }
    }
    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A deep copy (not `Clone`: the buffers are written in place, so copies must not share
    /// them, and copying can fail for lack of memory).
    pub fn try_clone(&self) -> Result<Self> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for slot in &self.layers {
            layers.push(match slot {
                Some((k, v)) => Some((k.copy()?, v.copy()?)),
                None => None,
            });
        }
        Ok(Self {
            layers,
            len: self.len,
        })
    }

    /// The cache with its batch rows replaced by `rows` of this one (repeats allowed): a
    /// batch-1 prompt prefix becomes a batch, and finished rows drop out of a batch.
    pub fn select_rows(&self, rows: &[usize]) -> Result<Self> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for slot in &self.layers {
            layers.push(match slot {
                Some((k, v)) => {
                    let idx = Tensor::from_iter(rows.iter().map(|&r| r as u32), k.device())?;
                    Some((k.index_select(&idx, 0)?, v.index_select(&idx, 0)?))
                }
                None => None,
            });
        }
        Ok(Self {
            layers,
            len: self.len,
        })
    }

    /// The batch rows of every part, in order, as one cache of `len` slots: each part's
    /// slots are preceded by `len - part.len()` zero slots (which its rows must mark as
    /// padding). Requests joining a running decode batch are merged in this way.
    pub fn concat_rows(parts: &[&KvCache], len: usize) -> Result<Self> {
        let n_layers = parts.first().map_or(0, |p| p.layers.len());
        if parts
            .iter()
            .any(|p| p.layers.len() != n_layers || p.len > len)
        {
            return Err(ModelError::Input {
                what: "KV cache".into(),
                reason: "caches of different models or longer than the merged length".into(),
            });
        }
        let mut layers = Vec::with_capacity(n_layers);
        for layer in 0..n_layers {
            // Any part's buffer gives heads, head size, dtype and device for padding.
            let Some((like, _)) = parts.iter().find_map(|p| p.layers[layer].as_ref()) else {
                layers.push(None);
                continue;
            };
            let (_, heads, _, hd) = like.dims4()?;
            let mut ks = Vec::with_capacity(parts.len());
            let mut vs = Vec::with_capacity(parts.len());
            for part in parts {
                let pad = len - part.len;
                let padded = |x: &Tensor| -> Result<Tensor> {
                    let x = x.narrow(2, 0, part.len)?;
                    if pad == 0 {
                        return Ok(x);
                    }
                    let b = x.dim(0)?;
                    let zeros = Tensor::zeros((b, heads, pad, hd), x.dtype(), x.device())?;
                    Ok(Tensor::cat(&[&zeros, &x], 2)?)
                };
                match &part.layers[layer] {
                    Some((k, v)) => {
                        ks.push(padded(k)?);
                        vs.push(padded(v)?);
                    }
                    None => {
                        return Err(ModelError::Input {
                            what: "KV cache".into(),
                            reason: format!("layer {layer} is empty in one part only"),
                        })
                    }
                }
            }
            layers.push(Some((
                Tensor::cat(&ks, 0)?.contiguous()?,
                Tensor::cat(&vs, 0)?.contiguous()?,
            )));
        }
        Ok(Self { layers, len })
    }

    /// The cache without its first `n` slots (padding no row needs any more).
    pub fn drop_front(&self, n: usize) -> Result<Self> {
        let n = n.min(self.len);
        let len = self.len - n;
        let mut layers = Vec::with_capacity(self.layers.len());
        for slot in &self.layers {
            layers.push(match slot {
                Some((k, v)) => Some((
                    k.narrow(2, n, len)?.contiguous()?,
                    v.narrow(2, n, len)?.contiguous()?,
                )),
                None => None,
            });
        }
        Ok(Self { layers, len })
    }
}

/// Store names of the stacked projections (not Hugging Face names: made by
/// [`stack_projections`]).
const QKV: &str = "qkv_proj";
const GATE_UP: &str = "gate_up_proj";

/// Stacks each layer's q/k/v and gate/up projection weights in the store, as the model
/// uses them, freeing the separate ones as it goes: `Llama::load` would otherwise hold both
/// while it stacks (1.7x the model on the device; a 7B model in bf16 would not fit a 24 GB
/// card). Layers whose tensors are missing or have other shapes than `cfg` says are left
/// alone, so that `Llama::load` reports them by name. Run after the weights are verified.
pub fn stack_projections(store: &mut WeightStore, cfg: &LlamaConfig) -> Result<()> {
    for i in 0..cfg.num_hidden_layers {
        for group in stacked_groups(cfg, i) {
            let fits = group.parts.iter().all(|(name, out)| {
                store.shape_of(name).as_deref() == Some(&[*out, cfg.hidden_size][..])
            });
            if fits {
                let names: Vec<String> = group.parts.into_iter().map(|(name, _)| name).collect();
                store.stack_rows(&names, &group.into)?;
            }
        }
    }
    Ok(())
}

/// A stacked weight and the weights (name, rows) it is made of, in row order; each reads
/// the hidden state.
struct StackedGroup {
    into: String,
    parts: Vec<(String, usize)>,
}

/// Layer `i`'s stacked weights: [q | k | v] and [gate | up].
fn stacked_groups(cfg: &LlamaConfig, i: usize) -> [StackedGroup; 2] {
    let (hd, nh, nkv) = (cfg.head_dim(), cfg.num_attention_heads, cfg.n_kv_heads());
    let p = format!("model.layers.{i}");
    [
        StackedGroup {
            into: format!("{p}.self_attn.{QKV}.weight"),
            parts: vec![
                (format!("{p}.self_attn.q_proj.weight"), nh * hd),
                (format!("{p}.self_attn.k_proj.weight"), nkv * hd),
                (format!("{p}.self_attn.v_proj.weight"), nkv * hd),
            ],
        },
        StackedGroup {
            into: format!("{p}.mlp.{GATE_UP}.weight"),
            parts: vec![
                (format!("{p}.mlp.gate_proj.weight"), cfg.intermediate_size),
                (format!("{p}.mlp.up_proj.weight"), cfg.intermediate_size),
            ],
        },
    ]
}

/// Keys and values of earlier positions, as one layer's attention sees them.
enum LayerPast<'a> {
    None,
    /// A KV cache written in place (inference: the new keys/values are appended).
    Cache(&'a mut Option<(Tensor, Tensor)>, usize),
    /// Constant keys/values (batch 1 or B) of a prefix computed once, joined to the new ones
    /// with `cat`, so the forward stays differentiable (training).
    Frozen(Option<&'a (Tensor, Tensor)>, usize),
}

/// The earlier positions of a forward, for every layer.
enum Past<'a> {
    None,
    Cache(&'a mut KvCache),
    Frozen(&'a KvCache),
}

impl Past<'_> {
    fn len(&self) -> usize {
        match self {
            Past::None => 0,
            Past::Cache(c) => c.len,
            Past::Frozen(c) => c.len,
        }
    }
    fn layer(&mut self, i: usize) -> LayerPast<'_> {
        match self {
            Past::None => LayerPast::None,
            Past::Cache(c) => {
                let len = c.len;
                LayerPast::Cache(&mut c.layers[i], len)
            }
            Past::Frozen(c) => LayerPast::Frozen(c.layers[i].as_ref(), c.len),
        }
    }
}

/// Attention output (after the output projection) and what its backward needs.
struct Attended {
    out: Tensor,
    /// Rotated queries (B, n_kv_heads, group * T, head_dim).
    q: Tensor,
    /// Keys (rotated) and values of every attended position (B, n_kv_heads, S, head_dim).
    k: Tensor,
    v: Tensor,
    /// Attention probabilities (B, n_kv_heads, group * T, S); `None` from a decode step
    /// over a KV cache, which keeps no tape.
    probs: Option<Tensor>,
}

/// What the hand-written backward of one decoder layer needs: its input, the residual stream
/// after attention, the attention's queries/keys/values/probabilities and the packed gate/up
/// activations (weights are shared, not copied). Going through the layer as one graph node
/// instead of ~25 saves candle's per-node zeroed gradient buffer and add, and the copies its
/// reshapes/transposes/narrows make in the backward: the gradient is only matmuls with the
/// frozen weights and the fused kernels' one-pass gradients. The frozen weights get no
/// gradient by construction.
struct LayerTape {
    x: Tensor,
    x1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    probs: Tensor,
    gate_up: Tensor,
    qkv_w: Tensor,
    o_w: Tensor,
    gate_up_w: Tensor,
    down_w: Tensor,
    attn_gain: fused::Gain,
    mlp_gain: fused::Gain,
    eps: f64,
    rope: fused::RopeTables,
    /// (query heads, key/value heads, head dim)
    heads: (usize, usize, usize),
    /// The LoRA adapters this layer used, by the product they add to.
    lora: Vec<(Product, BranchTape)>,
}

impl LayerTape {
    /// d(loss)/d(layer input) from d(loss)/d(layer output), both (B, T, hidden).
    fn backward(&self, grad: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = grad.dims3()?;
        let (nh, nkv, hd) = self.heads;
        let (n, group) = (b * t, nh / nkv);
        let rope = &self.rope;
        // MLP: x2 = x1 + down(swiglu(gate_up(norm(x1)))).
        let g2 = grad.reshape((n, h))?;
        let d_act = self.with_branches(Product::Down, &g2, g2.matmul(&self.down_w)?)?;
        let d_gate_up = fused::swiglu_grad(&self.gate_up.reshape((n, ()))?, &d_act)?;
        let d_norm2 = self.with_branches(
            Product::GateUp,
            &d_gate_up,
            d_gate_up.matmul(&self.gate_up_w)?,
        )?;
        let x1 = self.x1.reshape((n, h))?;
        let g1 = (&g2 + fused::rms_norm_grad(&x1, &d_norm2, &self.mlp_gain, self.eps)?)?;
        // Attention: x1 = x + o(softmax(q k^T scale + mask) v), query heads of a K/V head
        // folded into the rows (as in the forward).
        let dy = self
            .with_branches(Product::O, &g1, g1.matmul(&self.o_w)?)?
            .reshape((b, t, nh, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, nkv, group * t, hd))?;
        let d_probs = fused::batched_matmul(&dy, false, &self.v, true)?;
        let dv = fused::batched_matmul(&self.probs, true, &dy, false)?;
        let d_scores = fused::masked_softmax_grad(&self.probs, &d_probs, scale(hd))?;
        let dq = fused::batched_matmul(&d_scores, false, &self.k, false)?;
        let dk = fused::batched_matmul(&d_scores, true, &self.q, false)?;
        // Keys/values of a frozen prefix come first; only this forward's positions matter.
        let s = self.k.dim(2)?;
        let dq = rope.apply_inverse(&dq.reshape((b, nh, t, hd))?)?;
        let dk = rope.apply_inverse(&dk.narrow(2, s - t, t)?)?;
        let dv = dv.narrow(2, s - t, t)?;
        let rows = |g: Tensor, heads: usize| g.transpose(1, 2)?.reshape((n, heads * hd));
        let d_qkv = Tensor::cat(&[rows(dq, nh)?, rows(dk, nkv)?, rows(dv, nkv)?], 1)?;
        let d_norm1 = self.with_branches(Product::Qkv, &d_qkv, d_qkv.matmul(&self.qkv_w)?)?;
        let x = self.x.reshape((n, h))?;
        let dx = (g1 + fused::rms_norm_grad(&x, &d_norm1, &self.attn_gain, self.eps)?)?;
        dx.reshape((b, t, h))
    }
}

impl LayerTape {
    /// `d_input` (the frozen product's input gradient) plus that of each adapter on
    /// `product`, whose backward also stores its A/B gradients; `d_out` is the product's
    /// output gradient (rows, width).
    fn with_branches(
        &self,
        product: Product,
        d_out: &Tensor,
        d_input: Tensor,
    ) -> candle_core::Result<Tensor> {
        let mut d = d_input;
        for (_, branch) in self.lora.iter().filter(|(p, _)| *p == product) {
            d = (d + branch.backward(d_out)?)?;
        }
        Ok(d)
    }
}

/// Attention's score scale for a head dim.
fn scale(head_dim: usize) -> f64 {
    1.0 / (head_dim as f64).sqrt()
}

/// What every layer of one forward needs about positions: rotary tables (B or 1, 1, T,
/// head_dim / 2) and the additive mask (B or 1, 1, 1, T, S), plus their fused-op forms.
struct Positional {
    rope: (Tensor, Tensor),
    rope_fused: Option<fused::RopeTables>,
    mask: Option<Tensor>,
    mask_fused: Option<fused::SoftmaxMask>,
    /// The layers run off the graph (taped): products may use kernels without a backward.
    off_graph: bool,
    /// Per row, the padding slots in front of its real ones, when some row has them and no
    /// row has padding elsewhere (a continuous batch): the probabilities times values are
    /// then taken per row over its real slots only. A dot product over a longer, zero-led
    /// sequence is blocked differently by the matmul and rounds differently; this way a row's
    /// arithmetic is exactly what it is alone.
    front_padding: Option<Vec<usize>>,
}

/// See [`Positional::front_padding`].
fn front_padding(placement: Placement, t: usize) -> Option<Vec<usize>> {
    let Placement::Padded(slots) = placement else {
        return None;
    };
    let pads: Vec<usize> = slots
        .iter()
        .map(|row| row.iter().take_while(|s| s.is_none()).count())
        .collect();
    let front_only = slots
        .iter()
        .zip(&pads)
        .all(|(row, &pad)| row.len() >= pad + t && row[pad..].iter().all(Option::is_some));
    (front_only && pads.iter().any(|&p| p > 0)).then_some(pads)
}

/// Where the new inputs of a forward sit.
#[derive(Debug, Clone, Copy)]
pub enum Placement<'a> {
    /// Every row at positions `offset..offset + T`, after `offset` cached slots.
    Offset(usize),
    /// A left-padded batch: `slots[b][j]` is the position of row b's j-th slot, the cached
    /// slots first and then the T new ones; `None` marks padding, which no real query
    /// attends to (a padding query attends only to itself, so its values stay finite).
    Padded(&'a [Vec<Option<usize>>]),
}

struct Block {
    attn_norm: Tensor,
    attn_gain: fused::Gain,
    mlp_gain: fused::Gain,
    /// q, k and v projections as one matmul (rows: nh * hd, then nkv * hd twice): one
    /// larger product is faster than three, and its backward is one matmul, not three + sums.
    qkv: FrozenLinear,
    o: FrozenLinear,
    mlp_norm: Tensor,
    /// gate and up projections as one matmul: [gate | up], 2 * intermediate outputs.
    gate_up: FrozenLinear,
    down: FrozenLinear,
}

pub struct Llama {
    pub config: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    norm_gain: fused::Gain,
    lm_head: FrozenLinear,
    cos: Tensor,
    sin: Tensor,
    dtype: DType,
    device: Device,
    /// Fused CPU ops (RMSNorm, rotary, masked softmax, SwiGLU) instead of candle's
    /// composed ones; off only for the benchmark's stock baseline.
    fused: bool,
    /// LoRA adapters added to the frozen projections (`[lora]`), trained or loaded.
    adapter: Option<Arc<LoraAdapter>>,
    /// Inference inputs longer than this go through in chunks of it (see
    /// [`PREFILL_CHUNK`]).
    prefill_chunk: usize,
}

/// Positions per forward when a long input is prefilled into a KV cache: each chunk attends
/// to the cache and itself, so its score matrix and mask are chunk x context, not context x
/// context (an 8,000-token prompt allocated 2.3 GB of scores and 0.8 GB of mask per layer
/// in one piece).
pub const PREFILL_CHUNK: usize = 512;

/// What a config must agree on with the weights before anything is built: head counts that
/// group, an even head dim (rotary pairs), the embedding's shape and the layer count.
fn check_config_against_weights(store: &WeightStore, cfg: &LlamaConfig) -> Result<()> {
    let (h, hd) = (cfg.hidden_size, cfg.head_dim());
    let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
    let mismatch = |reason: String| ModelError::ConfigMismatch {
        source_desc: store.source_desc.clone(),
        reason,
    };
    if nh == 0 || nkv == 0 || nh % nkv != 0 {
        return Err(mismatch(format!(
            "num_attention_heads {nh} must be a positive multiple of num_key_value_heads {nkv}"
        )));
    }
    if hd % 2 != 0 {
        return Err(mismatch(format!(
            "head dim {hd} must be even for rotary embeddings"
        )));
    }
    if let Some(shape) = store.shape_of("model.embed_tokens.weight") {
        if shape != [cfg.vocab_size, h] {
            return Err(mismatch(format!(
                    "config says vocab_size {} and hidden_size {h}, model.embed_tokens.weight is {shape:?}",
                    cfg.vocab_size
                )));
        }
    }
    let layers_in_weights = (0..)
        .take_while(|i| {
            let p = format!("model.layers.{i}.self_attn");
            store.contains(&format!("{p}.q_proj.weight"))
                || store.contains(&format!("{p}.{QKV}.weight"))
        })
        .count();
    if layers_in_weights != cfg.num_hidden_layers {
        return Err(mismatch(format!(
            "config says num_hidden_layers = {}, the weights have {layers_in_weights}",
            cfg.num_hidden_layers
        )));
    }
    Ok(())
}

/// Rotary tables (max_pos, head_dim / 2), computed in f32 and stored in `dtype`.
fn rotary_tables(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / hd as f64) as f32)
        .collect();
    let n = cfg.max_position_embeddings;
    let inv_freq = Tensor::from_vec(inv_freq, (1, hd / 2), device)?;
    let t = Tensor::arange(0u32, n as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((n, 1))?;
    let freqs = t.broadcast_mul(&inv_freq)?;
    Ok((freqs.cos()?.to_dtype(dtype)?, freqs.sin()?.to_dtype(dtype)?))
}

impl Llama {
    /// Builds the model from tensors named as in Hugging Face's Llama layout.
    pub fn load(
        store: &WeightStore,
        cfg: &LlamaConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let nh = cfg.num_attention_heads;
        check_config_against_weights(store, cfg)?;
        let get = |name: &str, shape: &[usize]| store.get(name, shape, dtype);
        // The GGUF blocks of a weight, for decoding (kept only for CPU f32 models).
        let packed = |name: &str, shape: &[usize]| store.packed(name, shape);
        let lin = |name: &str, out: usize, inp: usize| -> Result<FrozenLinear> {
            let name = format!("{name}.weight");
            Ok(FrozenLinear::new(get(&name, &[out, inp])?, None)
                .with_packed(packed(&name, &[out, inp])))
        };
        // Projections that read the same input, stacked into one weight (already in the
        // store after `stack_projections`, else stacked here).
        let stacked = |group: &StackedGroup| -> Result<FrozenLinear> {
            let total = group.parts.iter().map(|(_, out)| out).sum::<usize>();
            let (weight, blocks) = if store.contains(&group.into) {
                (
                    get(&group.into, &[total, h])?,
                    packed(&group.into, &[total, h]),
                )
            } else {
                let parts = group
                    .parts
                    .iter()
                    .map(|(name, out)| get(name, &[*out, h]))
                    .collect::<Result<Vec<_>>>()?;
                let blocks = group
                    .parts
                    .iter()
                    .map(|(name, out)| store.packed(name, &[*out, h]))
                    .collect::<Option<Vec<_>>>()
                    .and_then(|parts| {
                        PackedMatrix::stack(&parts.iter().map(|p| &**p).collect::<Vec<_>>())
                    })
                    .map(Arc::new);
                (Tensor::cat(&parts, 0)?, blocks)
            };
            Ok(FrozenLinear::new(weight, None).with_packed(blocks))
        };
        let embed = get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn_norm = get(&format!("{p}.input_layernorm.weight"), &[h])?;
            let mlp_norm = get(&format!("{p}.post_attention_layernorm.weight"), &[h])?;
            let [qkv, gate_up] = stacked_groups(cfg, i);
            blocks.push(Block {
                attn_gain: fused::Gain::new(&attn_norm)?,
                mlp_gain: fused::Gain::new(&mlp_norm)?,
                attn_norm,
                mlp_norm,
                qkv: stacked(&qkv)?,
                o: lin(&format!("{p}.self_attn.o_proj"), h, nh * hd)?,
                gate_up: stacked(&gate_up)?,
                down: lin(&format!("{p}.mlp.down_proj"), h, cfg.intermediate_size)?,
            });
        }
        let lm_head = if store.contains("lm_head.weight") && !cfg.tie_word_embeddings {
            lin("lm_head", cfg.vocab_size, h)?
        } else {
            FrozenLinear::new(embed.clone(), None)
                .with_packed(packed("model.embed_tokens.weight", &[cfg.vocab_size, h]))
        };
        let (cos, sin) = rotary_tables(cfg, dtype, device)?;
        let norm = get("model.norm.weight", &[h])?;
        Ok(Self {
            config: cfg.clone(),
            embed,
            blocks,
            norm_gain: fused::Gain::new(&norm)?,
            norm,
            lm_head,
            cos,
            sin,
            dtype,
            device: device.clone(),
            fused: true,
            adapter: None,
            prefill_chunk: PREFILL_CHUNK,
        })
    }

    /// Sets the positions per prefill chunk (tests use small ones).
    pub fn set_prefill_chunk(&mut self, positions: usize) {
        self.prefill_chunk = positions.max(1);
    }

    /// Inputs appended to `cache` in chunks of `prefill_chunk` positions (see
    /// [`PREFILL_CHUNK`]): the hidden states of the last chunk. `slots` as in
    /// [`Placement::Padded`] for all of `embeds`; without them, at the cache's end.
    fn forward_chunked(
        &self,
        embeds: &Tensor,
        slots: Option<&[Vec<Option<usize>>]>,
        cache: &mut KvCache,
        trace: NonFiniteTrace,
    ) -> Result<Tensor> {
        let t = embeds.dim(1)?;
        let cached = cache.len();
        if t <= self.prefill_chunk {
            let placement = match slots {
                Some(slots) => Placement::Padded(slots),
                None => Placement::Offset(cached),
            };
            return self.forward_placed(embeds, placement, Some(cache), trace);
        }
        let mut start = 0;
        let mut hidden = None;
        while start < t {
            let n = self.prefill_chunk.min(t - start);
            let chunk = embeds.narrow(1, start, n)?;
            hidden = Some(match slots {
                None => {
                    let offset = cache.len();
                    self.forward_placed(&chunk, Placement::Offset(offset), Some(cache), trace)?
                }
                Some(slots) => {
                    // A chunk sees the slots up to its own last one.
                    let upto: Vec<Vec<Option<usize>>> = slots
                        .iter()
                        .map(|row| row[..(cached + start + n).min(row.len())].to_vec())
                        .collect();
                    self.forward_placed(&chunk, Placement::Padded(&upto), Some(cache), trace)?
                }
            });
            start += n;
        }
        Ok(hidden.expect("t > prefill_chunk > 0"))
    }

    /// Puts LoRA adapters on (or, with `None`, takes them off) the frozen projections.
    pub fn set_adapter(&mut self, adapter: Option<Arc<LoraAdapter>>) {
        self.adapter = adapter;
    }

    /// Folds the adapters into the frozen weights (W + s B A for each adapted projection)
    /// and takes them off: the same outputs to rounding, without the branch's cost. Packed
    /// GGUF blocks of the changed projections are dropped (they hold the old weights), so
    /// their few-row products use the f32 matrices. Returns how many products changed.
    pub fn merge_adapter(&mut self) -> Result<usize> {
        let Some(adapter) = self.adapter.take() else {
            return Ok(0);
        };
        let mut changed = 0;
        for (i, block) in self.blocks.iter_mut().enumerate() {
            for (product, lin) in [
                (Product::Qkv, &mut block.qkv),
                (Product::O, &mut block.o),
                (Product::GateUp, &mut block.gate_up),
                (Product::Down, &mut block.down),
            ] {
                if let Some(delta) = adapter.weight_delta(i, product)? {
                    let w = lin.weight();
                    let merged = (w.to_dtype(DType::F32)? + delta.to_device(w.device())?)?
                        .to_dtype(w.dtype())?;
                    *lin = FrozenLinear::new(merged, None);
                    changed += 1;
                }
            }
        }
        Ok(changed)
    }

    pub fn adapter(&self) -> Option<&Arc<LoraAdapter>> {
        self.adapter.as_ref()
    }

    /// `lin(x)`, plus the adapter's branch where layer `layer`'s `product` has one. Off the
    /// graph (a taped layer), the branch's tape joins `branches`.
    fn project(
        &self,
        layer: usize,
        product: Product,
        lin: &FrozenLinear,
        x: &Tensor,
        branches: Option<&mut Vec<(Product, BranchTape)>>,
    ) -> Result<Tensor> {
        let y = lin.forward(x)?;
        let Some(adapter) = &self.adapter else {
            return Ok(y);
        };
        let delta = match branches {
            Some(branches) => adapter.delta_taped(layer, product, x)?.map(|(d, tapes)| {
                branches.extend(tapes.into_iter().map(|t| (product, t)));
                d
            }),
            None => adapter.delta(layer, product, x)?,
        };
        Ok(match delta {
            Some(d) => (y + d)?,
            None => y,
        })
    }

    /// Replaces every projection with candle's stock matmul (weight gradients computed and
    /// stored): only for measuring what [`FrozenLinear`] saves.
    pub fn use_stock_backward(&mut self) {
        self.fused = false;
        for b in &mut self.blocks {
            for l in [&mut b.qkv, &mut b.o, &mut b.gate_up, &mut b.down] {
                *l = l.clone().with_stock_backward();
            }
        }
        self.lm_head = self.lm_head.clone().with_stock_backward();
    }

    /// Decodes with the dequantized f32 matrices even where packed GGUF blocks were kept,
    /// and frees the blocks (the benchmark's A/B).
    pub fn use_dequantized_products(&mut self) {
        for b in &mut self.blocks {
            for l in [&mut b.qkv, &mut b.o, &mut b.gate_up, &mut b.down] {
                *l = l.clone().with_packed(None);
            }
        }
        self.lm_head = self.lm_head.clone().with_packed(None);
    }

    /// How many of the model's projections (LM head included) decode from packed blocks.
    pub fn packed_projections(&self) -> usize {
        self.blocks
            .iter()
            .flat_map(|b| [&b.qkv, &b.o, &b.gate_up, &b.down])
            .chain([&self.lm_head])
            .filter(|l| l.is_packed())
            .count()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every frozen tensor as the graph sees it, including the matmul operands (for tests
    /// that check no gradient reaches them).
    pub fn frozen_tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![
            &self.embed,
            &self.norm,
            self.lm_head.weight(),
            self.lm_head.matmul_operand(),
        ];
        for b in &self.blocks {
            v.extend([&b.attn_norm, &b.mlp_norm]);
            for l in [&b.qkv, &b.o, &b.gate_up, &b.down] {
                v.extend([l.weight(), l.matmul_operand()]);
            }
        }
        v
    }

    /// Precision for norms, softmax and logits: at least f32 (half types are widened),
    /// f64 stays f64.
    fn wide(&self) -> DType {
        if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// Whether this forward uses the fused CPU ops (decided by the model's device and
    /// dtype, so once per model, not per tensor).
    pub fn use_fused(&self) -> bool {
        self.fused && self.device.is_cpu() && matches!(self.dtype, DType::F32 | DType::F64)
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor, gain: &fused::Gain) -> Result<Tensor> {
        if self.use_fused() {
            return Ok(fused::rms_norm(x, gain, self.config.rms_norm_eps)?);
        }
        let x32 = x.to_dtype(self.wide())?;
        let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_div(&(ms + self.config.rms_norm_eps)?.sqrt()?)?;
        Ok(normed.to_dtype(self.dtype)?.broadcast_mul(weight)?)
    }

    /// silu(gate) * up from the packed [gate | up].
    fn swiglu(&self, packed: &Tensor) -> Result<Tensor> {
        if self.use_fused() {
            return Ok(fused::swiglu(packed)?);
        }
        let i = self.config.intermediate_size;
        let gate = packed.narrow(D::Minus1, 0, i)?;
        let up = packed.narrow(D::Minus1, i, i)?;
        Ok((gate.silu()? * up)?)
    }

    /// Rotary tables for the new inputs: cos and sin, each (B or 1, 1, T, head_dim / 2).
    fn rope_tables(&self, t: usize, placement: Placement) -> Result<(Tensor, Tensor)> {
        let half = self.config.head_dim() / 2;
        match placement {
            Placement::Offset(offset) => Ok((
                self.cos.narrow(0, offset, t)?.reshape((1, 1, t, half))?,
                self.sin.narrow(0, offset, t)?.reshape((1, 1, t, half))?,
            )),
            Placement::Padded(slots) => {
                // Padding gets position 0: its output is never used.
                let ids: Vec<u32> = slots
                    .iter()
                    .flat_map(|row| row[row.len() - t..].iter().map(|p| p.unwrap_or(0) as u32))
                    .collect();
                let ids = Tensor::from_vec(ids, slots.len() * t, &self.device)?;
                let shape = (slots.len(), 1, t, half);
                Ok((
                    self.cos.index_select(&ids, 0)?.reshape(shape)?,
                    self.sin.index_select(&ids, 0)?.reshape(shape)?,
                ))
            }
        }
    }

    /// Rotary embedding of x (B, heads, T, head_dim) with tables from [`Self::rope_tables`];
    /// the same arithmetic as candle's `rope_slow` / `rope_i_slow`, with per-row tables.
    fn rope(&self, x: &Tensor, tables: &Positional) -> Result<Tensor> {
        if let Some(t) = &tables.rope_fused {
            return Ok(t.apply(x)?);
        }
        let (cos, sin) = &tables.rope;
        let x = x.contiguous()?;
        let (b, h, t, d) = x.dims4()?;
        Ok(if self.config.rope_interleaved {
            let cos = cos.unsqueeze(D::Minus1)?;
            let sin = sin.unsqueeze(D::Minus1)?;
            let x = x.reshape((b, h, t, d / 2, 2))?;
            let x0 = x.narrow(D::Minus1, 0, 1)?;
            let x1 = x.narrow(D::Minus1, 1, 1)?;
            let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
            let y1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
            Tensor::cat(&[y0, y1], D::Minus1)?.flatten_from(D::Minus2)?
        } else {
            let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
            let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
            let x1 = x.narrow(D::Minus1, 0, d / 2)?;
            let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
            let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
            (x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?
        })
    }

    /// Additive attention mask (B or 1, 1, 1, T, S) for T new queries over S keys: causal,
    /// limited to the sliding window when the model has one, and blind to padding.
    fn mask(&self, t: usize, s: usize, placement: Placement) -> Result<Option<Tensor>> {
        let window = self.config.sliding_window;
        let allowed = |q: usize, k: usize| k <= q && window.is_none_or(|w| q < k + w);
        let (rows, m) = match placement {
            Placement::Offset(offset) => {
                let needs = t > 1 || window.is_some_and(|w| s > w);
                if !needs {
                    return Ok(None);
                }
                let mut m = vec![0f32; t * s];
                for i in 0..t {
                    for j in 0..s {
                        if !allowed(offset + i, j) {
                            m[i * s + j] = f32::NEG_INFINITY;
                        }
                    }
                }
                (1, m)
            }
            Placement::Padded(slots) => {
                let mut m = vec![0f32; slots.len() * t * s];
                for (b, row) in slots.iter().enumerate() {
                    for i in 0..t {
                        let q = s - t + i;
                        for j in 0..s {
                            let ok = match (row[q], row[j]) {
                                (Some(qp), Some(kp)) => allowed(qp, kp),
                                (None, _) => j == q,
                                (Some(_), None) => false,
                            };
                            if !ok {
                                m[(b * t + i) * s + j] = f32::NEG_INFINITY;
                            }
                        }
                    }
                }
                (slots.len(), m)
            }
        };
        Ok(Some(
            Tensor::from_vec(m, (rows, 1, 1, t, s), &self.device)?.to_dtype(self.dtype)?,
        ))
    }

    fn attention(
        &self,
        layer: usize,
        block: &Block,
        x: &Tensor,
        pos: &Positional,
        past: LayerPast<'_>,
        mut branches: Option<&mut Vec<(Product, BranchTape)>>,
    ) -> Result<Attended> {
        let (b, t, _) = x.dims3()?;
        let cfg = &self.config;
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.n_kv_heads(), cfg.head_dim());
        let qkv = self.project(layer, Product::Qkv, &block.qkv, x, branches.as_deref_mut())?;
        let heads = |start: usize, n: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(D::Minus1, start * hd, n * hd)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?)
        };
        let q = heads(0, nh)?;
        let k = heads(nh, nkv)?;
        let v = heads(nh + nkv, nkv)?;
        let q = self.rope(&q, pos)?;
        let k = self.rope(&k, pos)?;
        let v = v.contiguous()?;
        // One new position over a KV cache (a decode step, inference only): attention reads
        // the cache in place (`fused::decode_attention`). Only at t = 1, so a prompt's
        // positions go through the same products alone as in a padded batch.
        let decode_step = t == 1
            && matches!(past, LayerPast::Cache(..))
            && self.use_fused()
            && self.dtype == DType::F32;
        let (k, v) = with_past(past, k, v)?;
        let s = k.dim(2)?;
        // Grouped-query attention without materialising repeated K/V: fold the query heads
        // that share a K/V head into the sequence axis.
        let rep = nh / nkv;
        let q = q.reshape((b, nkv, rep * t, hd))?;
        let scale = scale(hd);
        if decode_step {
            let y = fused::decode_attention(
                &q,
                &k,
                &v,
                pos.mask_fused.as_ref(),
                pos.front_padding.as_deref(),
                scale,
            )?;
            return Ok(Attended {
                out: self.project(layer, Product::O, &block.o, &y, branches)?,
                q,
                k,
                v,
                probs: None,
            });
        }
        let raw = if pos.off_graph {
            fused::batched_matmul(&q, false, &k, true)?
        } else {
            q.matmul(&k.t()?)?
        };
        let probs = if self.use_fused() {
            fused::masked_softmax(&raw, scale, pos.mask_fused.as_ref(), t)?
        } else {
            let scores = (raw * scale)?;
            let scores = match &pos.mask {
                Some(mask) => scores
                    .reshape((b, nkv, rep, t, s))?
                    .broadcast_add(mask)?
                    .reshape((b, nkv, rep * t, s))?,
                None => scores,
            };
            candle_nn::ops::softmax(&scores.to_dtype(self.wide())?, D::Minus1)?
                .to_dtype(self.dtype)?
        };
        let y = match &pos.front_padding {
            _ if pos.off_graph => fused::batched_matmul(&probs, false, &v, false)?,
            Some(pads) => {
                let mut rows = Vec::with_capacity(b);
                for (row, &pad) in pads.iter().enumerate() {
                    let real = s - pad;
                    let p = probs
                        .narrow(0, row, 1)?
                        .narrow(3, pad, real)?
                        .contiguous()?;
                    rows.push(p.matmul(&v.narrow(0, row, 1)?.narrow(2, pad, real)?)?);
                }
                Tensor::cat(&rows, 0)?
            }
            None => probs.matmul(&v)?,
        }; // (b, nkv, rep*t, hd)
        let y = y
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        Ok(Attended {
            out: self.project(layer, Product::O, &block.o, &y, branches)?,
            q,
            k,
            v,
            probs: Some(probs),
        })
    }

    /// One decoder layer: x + attention(norm(x)), then + mlp(norm(.)). When the forward
    /// runs off the graph (`pos.off_graph`), also the tape of its hand-written backward.
    fn layer(
        &self,
        index: usize,
        block: &Block,
        x: &Tensor,
        pos: &Positional,
        past: LayerPast<'_>,
    ) -> Result<(Tensor, Option<LayerTape>)> {
        let mut branches = Vec::new();
        let mut taping = pos.off_graph.then_some(&mut branches);
        let n = self.rms_norm(x, &block.attn_norm, &block.attn_gain)?;
        let attended = self.attention(index, block, &n, pos, past, taping.as_deref_mut())?;
        let x1 = (x + &attended.out)?;
        let n = self.rms_norm(&x1, &block.mlp_norm, &block.mlp_gain)?;
        let gate_up = self.project(
            index,
            Product::GateUp,
            &block.gate_up,
            &n,
            taping.as_deref_mut(),
        )?;
        let act = self.swiglu(&gate_up)?;
        let x2 = (&x1 + self.project(index, Product::Down, &block.down, &act, taping)?)?;
        let cfg = &self.config;
        let rope = match (&pos.rope_fused, pos.off_graph) {
            (Some(rope), true) => rope.clone(),
            _ => return Ok((x2, None)),
        };
        let tape = LayerTape {
            x: x.clone(),
            x1,
            q: attended.q,
            k: attended.k,
            v: attended.v,
            probs: attended.probs.ok_or_else(|| {
                candle_core::Error::Msg("a taped layer ran a decode step (no tape)".into())
            })?,
            gate_up,
            qkv_w: block.qkv.weight().clone(),
            o_w: block.o.weight().clone(),
            gate_up_w: block.gate_up.weight().clone(),
            down_w: block.down.weight().clone(),
            attn_gain: block.attn_gain.clone(),
            mlp_gain: block.mlp_gain.clone(),
            eps: cfg.rms_norm_eps,
            rope,
            heads: (cfg.num_attention_heads, cfg.n_kv_heads(), cfg.head_dim()),
            lora: branches,
        };
        Ok((x2, Some(tape)))
    }

    /// Hidden states after the final norm: (B, T, hidden).
    pub fn forward_hidden(
        &self,
        embeds: &Tensor,
        offset: usize,
        cache: Option<&mut KvCache>,
        trace: NonFiniteTrace,
    ) -> Result<Tensor> {
        self.forward_placed(embeds, Placement::Offset(offset), cache, trace)
    }

    /// As [`Self::forward_hidden`], with the inputs placed as `placement` says.
    pub fn forward_placed(
        &self,
        embeds: &Tensor,
        placement: Placement,
        cache: Option<&mut KvCache>,
        trace: NonFiniteTrace,
    ) -> Result<Tensor> {
        let past = match cache {
            Some(c) => Past::Cache(c),
            None => Past::None,
        };
        self.forward_core(embeds, placement, past, trace)
    }

    /// Hidden states (B, T, hidden) of inputs that follow `prefix` (positions
    /// `prefix.len()..`), whose keys and values are constants (batch 1, shared by every row,
    /// or B): the prefix is not recomputed and gets no gradient, but the path from `embeds`
    /// to the output is differentiable, so training can compute a prompt prefix that every
    /// example shares once.
    pub fn forward_after_prefix(
        &self,
        embeds: &Tensor,
        prefix: &KvCache,
        trace: NonFiniteTrace,
    ) -> Result<Tensor> {
        let b = embeds.dim(0)?;
        if let Some((k, _)) = prefix.layers.iter().flatten().next() {
            let rows = k.dim(0)?;
            if rows != 1 && rows != b {
                return Err(ModelError::Input {
                    what: "LLM prefix".into(),
                    reason: format!("a prefix of {rows} rows cannot serve a batch of {b}"),
                });
            }
        }
        self.forward_core(
            embeds,
            Placement::Offset(prefix.len),
            Past::Frozen(prefix),
            trace,
        )
    }

    fn forward_core(
        &self,
        embeds: &Tensor,
        placement: Placement,
        mut past: Past<'_>,
        trace: NonFiniteTrace,
    ) -> Result<Tensor> {
        let (b, t, h) = embeds.dims3()?;
        if h != self.config.hidden_size {
            return Err(ModelError::Input {
                what: "LLM input".into(),
                reason: format!(
                    "embeddings have width {h}, the model's hidden size is {}",
                    self.config.hidden_size
                ),
            });
        }
        let cached = past.len();
        let bad_cache = |reason: String| ModelError::Input {
            what: "LLM KV cache".into(),
            reason,
        };
        let end = match placement {
            Placement::Offset(offset) => {
                if !matches!(past, Past::None) && cached != offset {
                    return Err(bad_cache(format!(
                        "offset {offset} but the cache holds {cached} positions"
                    )));
                }
                offset + t
            }
            Placement::Padded(slots) => {
                if slots.len() != b || slots.iter().any(|r| r.len() != cached + t) {
                    return Err(bad_cache(format!(
                        "a padded batch of {b} rows needs {} slot positions per row",
                        cached + t
                    )));
                }
                slots.iter().flatten().flatten().max().map_or(0, |p| p + 1)
            }
        };
        if end > self.config.max_position_embeddings {
            return Err(ModelError::Input {
                what: "LLM input".into(),
                reason: format!(
                    "{end} positions exceed the model's context of {}",
                    self.config.max_position_embeddings
                ),
            });
        }
        // Rotary tables and the mask, made once for every layer of this forward.
        let rope = self.rope_tables(t, placement)?;
        let mask = self.mask(t, cached + t, placement)?;
        let fused_ops = self.use_fused();
        // Training on the CPU: each layer runs off the graph and joins it as one node with a
        // hand-written backward (see `LayerTape`). Inference with a cache keeps no tape.
        // LoRA adapters join the tape in the model's dtype (their gradients go back through
        // `grad_port` nodes); in another dtype the layers stay on candle's graph.
        let taped = fused_ops
            && self
                .adapter
                .as_ref()
                .is_none_or(|a| a.dtype() == self.dtype)
            && matches!(placement, Placement::Offset(_))
            && !matches!(past, Past::Cache(_));
        let pos = Positional {
            rope_fused: fused_ops
                .then(|| fused::RopeTables::new(&rope.0, &rope.1, self.config.rope_interleaved))
                .transpose()?,
            mask_fused: match (&mask, fused_ops) {
                (Some(m), true) => Some(fused::SoftmaxMask::new(m)?),
                _ => None,
            },
            rope,
            mask,
            off_graph: taped,
            front_padding: front_padding(placement, t),
        };
        let mut x = embeds.to_dtype(self.dtype)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let input = if taped { x.detach() } else { x.clone() };
            let (out, tape) = self.layer(i, block, &input, &pos, past.layer(i))?;
            x = match tape {
                Some(tape) => {
                    // The adapters' gradients enter the graph below the layer (see
                    // `fused::grad_port`).
                    let mut input = x.clone();
                    for (_, branch) in &tape.lora {
                        input = fused::grad_port(&input, &branch.a_var, branch.grads.a.clone())?;
                        input = fused::grad_port(&input, &branch.b_var, branch.grads.b.clone())?;
                    }
                    fused::attach(&input, &out, move |grad| {
                        let dx = tape.backward(grad)?;
                        // The backward runs from the last layer down: the first failure names
                        // the layer nearest the loss whose input gradient is not finite.
                        trace
                            .check(|| format!("llm.layers.{i} (gradient of its input)"), &dx)
                            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                        Ok(dx)
                    })?
                }
                None => out,
            };
            trace.check(|| format!("llm.layers.{i}"), &x)?;
        }
        if let Past::Cache(c) = past {
            c.len += t;
        }
        let x = self.rms_norm(&x, &self.norm, &self.norm_gain)?;
        trace.check(|| "llm.norm".into(), &x)?;
        Ok(x)
    }

    /// Runs an inference forward on the CPU's compute pool (see
    /// [`crate::models::device::on_compute_pool`]); elsewhere in place.
    fn on_pool<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        if self.device.is_cpu() {
            crate::models::device::on_compute_pool(f)
        } else {
            f()
        }
    }

    /// Logits (.., vocab) from hidden states (.., hidden): f32 (f64 for an f64 model).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(self.wide())?)
    }
}

impl LanguageModel for Llama {
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        let max = flat.max(0)?.to_scalar::<u32>()? as usize;
        if max >= self.config.vocab_size {
            return Err(ModelError::Input {
                what: "token ids".into(),
                reason: format!(
                    "id {max} is outside the vocabulary of {}",
                    self.config.vocab_size
                ),
            });
        }
        Ok(self
            .embed
            .index_select(&flat, 0)?
            .reshape((b, t, self.config.hidden_size))?)
    }

    fn forward(
        &self,
        embeds: &Tensor,
        offset: usize,
        cache: Option<&mut KvCache>,
        at: LogitsAt,
        trace: NonFiniteTrace,
    ) -> Result<Tensor> {
        self.on_pool(|| {
            let hidden = match (cache, at) {
                // Only the last position is wanted: a long input goes through in chunks.
                (Some(cache), LogitsAt::Last) if cache.len() == offset => {
                    self.forward_chunked(embeds, None, cache, trace)?
                }
                (cache, _) => self.forward_hidden(embeds, offset, cache, trace)?,
            };
            let hidden = match at {
                LogitsAt::All => hidden,
                LogitsAt::Last => {
                    let t = hidden.dim(1)?;
                    hidden.narrow(1, t - 1, 1)?
                }
            };
            let logits = self.logits(&hidden)?;
            trace.check(|| "llm.lm_head".into(), &logits)?;
            Ok(logits)
        })
    }

    fn prefill(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<()> {
        self.on_pool(|| {
            self.forward_chunked(embeds, None, cache, NonFiniteTrace::default())
                .map(|_| ())
        })
    }

    fn forward_padded(
        &self,
        embeds: &Tensor,
        slots: &[Vec<Option<usize>>],
        cache: &mut KvCache,
        trace: NonFiniteTrace,
    ) -> Result<Tensor> {
        self.on_pool(|| {
            let hidden = self.forward_chunked(embeds, Some(slots), cache, trace)?;
            let t = hidden.dim(1)?;
            let logits = self.logits(&hidden.narrow(1, t - 1, 1)?)?;
            trace.check(|| "llm.lm_head".into(), &logits)?;
            Ok(logits)
        })
    }

    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_hidden_layers)
    }

    fn max_positions(&self) -> usize {
        self.config.max_position_embeddings
    }

    fn adapter_generation(&self) -> u64 {
        self.adapter.as_ref().map_or(0, |a| a.generation())
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::fused::tests::seeded_randn;
    use candle_core::Var;
    use std::collections::HashMap;

    /// A random 1-layer model: with one layer, position t sees exactly its attention span.
    fn tiny(sliding_window: Option<usize>) -> Llama {
        let (store, cfg) = tiny_weights(1, sliding_window);
        Llama::load(&store, &cfg, DType::F32, &Device::Cpu).unwrap()
    }

    /// Random (seeded) weights and config of a small model with `layers` layers.
    fn tiny_weights(layers: usize, sliding_window: Option<usize>) -> (WeightStore, LlamaConfig) {
        let cfg = LlamaConfig {
            vocab_size: 11,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: layers,
            num_attention_heads: 2,
            num_key_value_heads: Some(1),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 32,
            sliding_window,
            tie_word_embeddings: true,
            rope_interleaved: false,
        };
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        let mut seed = 0u64;
        let mut put = |name: &str, shape: &[usize]| {
            seed += 1;
            let w = seeded_randn(seed, 0.5, shape, DType::F32);
            t.insert(name.to_string(), w.to_device(&dev).unwrap());
        };
        put("model.embed_tokens.weight", &[11, 8]);
        put("model.norm.weight", &[8]);
        for i in 0..layers {
            let p = format!("model.layers.{i}");
            put(&format!("{p}.input_layernorm.weight"), &[8]);
            put(&format!("{p}.post_attention_layernorm.weight"), &[8]);
            put(&format!("{p}.self_attn.q_proj.weight"), &[8, 8]);
            put(&format!("{p}.self_attn.k_proj.weight"), &[4, 8]);
            put(&format!("{p}.self_attn.v_proj.weight"), &[4, 8]);
            put(&format!("{p}.self_attn.o_proj.weight"), &[8, 8]);
            put(&format!("{p}.mlp.gate_proj.weight"), &[12, 8]);
            put(&format!("{p}.mlp.up_proj.weight"), &[12, 8]);
            put(&format!("{p}.mlp.down_proj.weight"), &[8, 12]);
        }
        (WeightStore::new("tiny", t), cfg)
    }

    /// Generation that reaches the context ends there with the tokens it has (it used to
    /// fail on the next forward, losing them): after a 30-position prompt a 32-position
    /// model reads two generated tokens, so it samples three (the last one from the logits
    /// at position 31), whatever the token limit.
    #[test]
    fn generation_stops_at_the_context_with_its_tokens() {
        use crate::models::llm::{decode_batch, DecodeOptions, DecodeRequest, Finish};
        use crate::sampler::{Sampler, SamplingParams};
        let m = tiny(None);
        let request = |prompt: usize| DecodeRequest {
            rest: seeded_randn(4001, 1.0, (1, prompt, 8), DType::F32),
            sampler: Sampler::new(SamplingParams::default()).unwrap(),
            max_tokens: 1000,
            stop_strings: Vec::new(),
        };
        let options = DecodeOptions {
            tokenizer: None,
            eos: None,
            trace: NonFiniteTrace::default(),
            cancelled: None,
        };
        let mut requests = [request(30), request(20)];
        let out = decode_batch(&m, &m.new_cache(), &mut requests, &options, |_, _| {}).unwrap();
        assert_eq!((out[0].ids.len(), out[0].finish), (3, Finish::Context));
        assert_eq!((out[1].ids.len(), out[1].finish), (13, Finish::Context));
    }

    /// A long input prefilled in chunks leaves the cache and gives the logits of one
    /// forward over all of it, at the cache's end and in a left-padded batch.
    #[test]
    fn chunked_prefill_equals_one_forward() {
        let (store, cfg) = tiny_weights(2, None);
        let whole = Llama::load(&store, &cfg, DType::F32, &Device::Cpu).unwrap();
        let mut chunked = Llama::load(&store, &cfg, DType::F32, &Device::Cpu).unwrap();
        chunked.set_prefill_chunk(4);
        let x = seeded_randn(4002, 1.0, (1, 11, 8), DType::F32);
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            let d = d.to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "chunked differs by {d}");
        };
        let mut c1 = whole.new_cache();
        let mut c2 = chunked.new_cache();
        let trace = NonFiniteTrace::default();
        let a = whole
            .forward(&x, 0, Some(&mut c1), LogitsAt::Last, trace)
            .unwrap();
        let b = chunked
            .forward(&x, 0, Some(&mut c2), LogitsAt::Last, trace)
            .unwrap();
        close(&a, &b);
        assert_eq!(c2.len(), 11);
        let next = seeded_randn(4003, 1.0, (1, 1, 8), DType::F32);
        let a = whole
            .forward(&next, 11, Some(&mut c1), LogitsAt::Last, trace)
            .unwrap();
        let b = chunked
            .forward(&next, 11, Some(&mut c2), LogitsAt::Last, trace)
            .unwrap();
        close(&a, &b);
        // Two rows after a 3-position prefix, one left-padded by 4.
        let mut p1 = whole.new_cache();
        let mut p2 = chunked.new_cache();
        let prefix = x.narrow(1, 0, 3).unwrap();
        whole.prefill(&prefix, &mut p1).unwrap();
        chunked.prefill(&prefix, &mut p2).unwrap();
        let rows = seeded_randn(4004, 1.0, (2, 9, 8), DType::F32);
        let mut slots: Vec<Vec<Option<usize>>> = vec![(0..12).map(Some).collect()];
        let mut padded: Vec<Option<usize>> = (0..3).map(Some).collect();
        padded.extend([None; 4]);
        padded.extend((3..8).map(Some));
        slots.push(padded);
        let mut b1 = p1.select_rows(&[0, 0]).unwrap();
        let mut b2 = p2.select_rows(&[0, 0]).unwrap();
        let a = whole.forward_padded(&rows, &slots, &mut b1, trace).unwrap();
        let b = chunked
            .forward_padded(&rows, &slots, &mut b2, trace)
            .unwrap();
        close(&a, &b);
    }

    /// Continuous batching: requests that join a running decode loop (shorter and longer
    /// than its rows, so that either side is padded in front) and rows that leave it get the
    /// tokens each gets alone.
    #[test]
    fn requests_joining_a_running_loop_get_their_own_tokens() {
        use crate::models::llm::{DecodeLoop, DecodeOptions, DecodeRequest};
        use crate::sampler::{Sampler, SamplingParams};
        let (store, cfg) = tiny_weights(2, None);
        let m = Llama::load(&store, &cfg, DType::F32, &Device::Cpu).unwrap();
        let request = |len: usize, max_tokens: usize| DecodeRequest {
            rest: seeded_randn(4005, 1.0, (1, len, 8), DType::F32),
            sampler: Sampler::new(SamplingParams::default()).unwrap(),
            max_tokens,
            stop_strings: Vec::new(),
        };
        let options = DecodeOptions {
            tokenizer: None,
            eos: None,
            trace: NonFiniteTrace::default(),
            cancelled: None,
        };
        let mut prefix = m.new_cache();
        let p = seeded_randn(4006, 1.0, (1, 2, 8), DType::F32);
        m.prefill(&p, &mut prefix).unwrap();
        let requests = [request(6, 8), request(3, 4), request(12, 6), request(2, 3)];
        let alone: Vec<Vec<u32>> = requests
            .iter()
            .map(|r| {
                let mut one = [r.clone()];
                crate::models::llm::decode_batch(&m, &prefix, &mut one, &options, |_, _| {})
                    .unwrap()
                    .remove(0)
                    .ids
            })
            .collect();
        let mut batch = DecodeLoop::new();
        let join_one = |batch: &mut DecodeLoop, k: usize| {
            batch
                .join(
                    &m,
                    &prefix,
                    vec![(k, requests[k].clone())],
                    &options,
                    |_, _| {},
                )
                .unwrap()
        };
        let mut got: Vec<Option<Vec<u32>>> = vec![None; requests.len()];
        let mut take = |left: Vec<crate::models::llm::Left>| {
            for l in left {
                got[l.request] = Some(l.decoded.ids);
            }
        };
        take(join_one(&mut batch, 0));
        take(batch.step(&m, &options, |_, _| {}).unwrap());
        // Shorter than the running row (8 slots + 1 step): padded in front.
        take(join_one(&mut batch, 1));
        take(batch.step(&m, &options, |_, _| {}).unwrap());
        // Longer: the running rows are padded in front.
        take(join_one(&mut batch, 2));
        assert_eq!(batch.len(), 3);
        let mut steps = 0;
        while !batch.is_empty() {
            take(batch.step(&m, &options, |_, _| {}).unwrap());
            steps += 1;
            if steps == 3 {
                take(join_one(&mut batch, 3));
            }
            // Padding no row needs is dropped as rows leave.
            assert!(batch.slots() <= 2 + 12 + 6, "{} slots", batch.slots());
        }
        for (k, want) in alone.iter().enumerate() {
            assert_eq!(got[k].as_ref(), Some(want), "request {k}");
        }
    }

    /// Projections stacked in the store give the model of the separate ones, with the
    /// separate tensors gone; a layer with a wrong shape is left for `load` to name.
    #[test]
    fn stacked_store_loads_the_same_model() {
        let (store, cfg) = tiny_weights(2, None);
        let separate = Llama::load(&store, &cfg, DType::F32, &Device::Cpu).unwrap();
        let mut stacked_store = WeightStore::new("tiny", store.tensors_for_test());
        stack_projections(&mut stacked_store, &cfg).unwrap();
        assert!(!stacked_store.contains("model.layers.1.self_attn.k_proj.weight"));
        assert!(stacked_store.contains("model.layers.1.mlp.gate_up_proj.weight"));
        let stacked = Llama::load(&stacked_store, &cfg, DType::F32, &Device::Cpu).unwrap();
        let x = seeded_randn(4007, 1.0, (1, 5, 8), DType::F32);
        assert_eq!(logits(&separate, &x), logits(&stacked, &x));

        let mut tensors = store.tensors_for_test();
        let bad = "model.layers.1.self_attn.k_proj.weight";
        tensors.insert(
            bad.into(),
            Tensor::zeros((5, 8), DType::F32, &Device::Cpu).unwrap(),
        );
        let mut bad_store = WeightStore::new("tiny", tensors);
        stack_projections(&mut bad_store, &cfg).unwrap();
        let err = Llama::load(&bad_store, &cfg, DType::F32, &Device::Cpu)
            .err()
            .expect("a shape mismatch")
            .to_string();
        assert!(err.contains(bad), "{err}");
    }

    /// With tracing on, a backward that produces a non-finite gradient stops at the layer
    /// nearest the loss where it appears, naming it.
    #[test]
    fn trace_names_the_layer_of_a_non_finite_gradient() {
        let (store, cfg) = tiny_weights(2, None);
        let m = Llama::load(&store, &cfg, DType::F32, &Device::Cpu).unwrap();
        let x = Var::from_tensor(&seeded_randn(4008, 1.0, (1, 4, 8), DType::F32)).unwrap();
        let run = |trace: NonFiniteTrace| {
            let hidden = m.forward_hidden(&x, 0, None, trace).unwrap();
            // A finite forward (sqrt of zeros) whose gradient is +Inf from the start
            // (d sqrt(u)/du at u = 0), so the last layer is the first to see it whatever the
            // random weights. (Scaling the loss by 3e38 overflowed in layer 1 or only in
            // layer 0, depending on them.)
            let zeros = (&hidden - hidden.detach()).unwrap();
            zeros.sqrt().unwrap().sum_all().unwrap().backward()
        };
        assert!(run(NonFiniteTrace::default()).is_ok());
        let err = run(NonFiniteTrace::on()).unwrap_err().to_string();
        assert!(
            err.contains("llm.layers.1 (gradient of its input)"),
            "{err}"
        );
    }

    /// The CPU training path (each layer one graph node with a hand-written backward) gives
    /// the input gradient candle's autograd computes through the composed ops: without and
    /// with a frozen prefix, with and without a sliding window, with GQA, in f64.
    #[test]
    fn layer_tape_backward_equals_autograd() {
        let dev = Device::Cpu;
        for window in [None, Some(3)] {
            let (store, cfg) = tiny_weights(2, window);
            let taped = Llama::load(&store, &cfg, DType::F64, &dev).unwrap();
            let mut autograd = Llama::load(&store, &cfg, DType::F64, &dev).unwrap();
            autograd.use_stock_backward();
            let x = Var::from_tensor(&seeded_randn(4009, 1.0, (2, 5, 8), DType::F64)).unwrap();
            let probe = seeded_randn(4010, 1.0, (2, 5, 8), DType::F64);
            let prefix_embeds = seeded_randn(4011, 1.0, (1, 3, 8), DType::F64);
            let mut prefix = taped.new_cache();
            taped
                .forward_hidden(
                    &prefix_embeds,
                    0,
                    Some(&mut prefix),
                    NonFiniteTrace::default(),
                )
                .unwrap();
            for with_prefix in [false, true] {
                let grad = |m: &Llama| -> (Vec<f64>, Vec<f64>) {
                    let hidden = if with_prefix {
                        m.forward_after_prefix(&x, &prefix, NonFiniteTrace::default())
                    } else {
                        m.forward_hidden(&x, 0, None, NonFiniteTrace::default())
                    }
                    .unwrap();
                    let loss = (&hidden * &probe).unwrap().sum_all().unwrap();
                    let g = loss.backward().unwrap();
                    let g = g.get(x.as_tensor()).expect("an input gradient");
                    (
                        hidden.flatten_all().unwrap().to_vec1().unwrap(),
                        g.flatten_all().unwrap().to_vec1().unwrap(),
                    )
                };
                let (ha, ga) = grad(&taped);
                let (hb, gb) = grad(&autograd);
                let max_diff = |a: &[f64], b: &[f64]| {
                    a.iter()
                        .zip(b)
                        .map(|(p, q)| (p - q).abs())
                        .fold(0.0, f64::max)
                };
                let what = format!("window {window:?}, prefix {with_prefix}");
                assert!(max_diff(&ha, &hb) < 1e-10, "{what}: values differ");
                assert!(ga.iter().any(|v| v.abs() > 1e-3), "{what}: no gradient");
                assert!(max_diff(&ga, &gb) < 1e-10, "{what}: gradients differ");
            }
        }
    }

    /// LoRA adapters on every kind of projection, with dropout: the taped layers (adapter
    /// gradients through `grad_port`) give the values and the input and A/B gradients of
    /// candle's autograd.
    #[test]
    fn lora_tape_backward_equals_autograd() {
        use crate::models::lora::{LoraConfig, LoraTarget};
        let dev = Device::Cpu;
        let (store, cfg) = tiny_weights(2, None);
        let config = LoraConfig {
            rank: 2,
            dropout: 0.2,
            targets: LoraTarget::ALL.to_vec(),
            ..LoraConfig::default()
        };
        let adapter = LoraAdapter::new(&config, &cfg.decoder_shape(), 3, &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        for (seed, (_, v)) in (100..).zip(adapter.params()) {
            v.set(&seeded_randn(seed, 0.3, v.dims(), DType::F64))
                .unwrap();
        }
        adapter.set_dropout_seed(Some(vec![9, 10]));
        let adapter = Arc::new(adapter);
        let mut taped = Llama::load(&store, &cfg, DType::F64, &dev).unwrap();
        taped.set_adapter(Some(adapter.clone()));
        let mut autograd = Llama::load(&store, &cfg, DType::F64, &dev).unwrap();
        autograd.use_stock_backward();
        autograd.set_adapter(Some(adapter.clone()));
        let x = Var::from_tensor(&seeded_randn(201, 1.0, (2, 5, 8), DType::F64)).unwrap();
        let probe = seeded_randn(202, 1.0, (2, 5, 8), DType::F64);
        let run = |m: &Llama| -> Vec<Vec<f64>> {
            let hidden = m
                .forward_hidden(&x, 0, None, NonFiniteTrace::default())
                .unwrap();
            let loss = (&hidden * &probe).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let mut out = vec![hidden.flatten_all().unwrap().to_vec1().unwrap()];
            let mut tensors = vec![x.as_tensor().clone()];
            tensors.extend(adapter.params().iter().map(|(_, v)| v.as_tensor().clone()));
            for t in tensors {
                let g = g
                    .get(&t)
                    .expect("a gradient for the input and every adapter");
                out.push(g.flatten_all().unwrap().to_vec1().unwrap());
            }
            out
        };
        let (a, b) = (run(&taped), run(&autograd));
        let names: Vec<String> = ["values".to_string(), "input".to_string()]
            .into_iter()
            .chain(adapter.params().into_iter().map(|(n, _)| n))
            .collect();
        assert_eq!(a.len(), names.len());
        for ((x, y), name) in a.iter().zip(&b).zip(&names) {
            let diff = x
                .iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f64::max);
            assert!(x.iter().any(|v| v.abs() > 1e-6), "{name}: all zero");
            // Two summation orders in f64 differ by rounding, which cancellation in the sums
            // can make large beside the result: over 400 unseeded draws the worst difference
            // was 1.9e-12 of the gradient's largest element (bounds of 1e-10 absolute and
            // 1e-13 relative each failed once in CI). A wrong term in the backward pass moves
            // the gradient by 1e-4 of its size or more, so 1e-10 of it still catches one; the
            // draws are seeded, so the comparison is the same on every run.
            let scale = x.iter().fold(1f64, |m, v| m.max(v.abs()));
            assert!(
                diff < 1e-10 * scale,
                "{name}: taped and autograd differ by {diff} (largest element {scale})"
            );
        }
    }

    /// Merged adapters give the logits of the adapters beside the frozen weights.
    #[test]
    fn merged_adapters_give_the_same_logits() {
        use crate::models::lora::{LoraConfig, LoraTarget};
        let dev = Device::Cpu;
        let (store, cfg) = tiny_weights(2, None);
        let config = LoraConfig {
            rank: 2,
            targets: LoraTarget::ALL.to_vec(),
            layers: Some(vec![1]),
            ..LoraConfig::default()
        };
        let adapter = LoraAdapter::new(&config, &cfg.decoder_shape(), 3, &dev).unwrap();
        for (_, v) in adapter.params() {
            v.set(&seeded_randn(4012, 0.3, v.dims(), DType::F32))
                .unwrap();
        }
        let mut m = Llama::load(&store, &cfg, DType::F32, &dev).unwrap();
        let x = seeded_randn(4013, 1.0, (1, 5, 8), DType::F32);
        let plain = logits(&m, &x);
        m.set_adapter(Some(Arc::new(adapter)));
        let with = logits(&m, &x);
        assert_eq!(m.merge_adapter().unwrap(), 4);
        assert!(m.adapter().is_none());
        let merged = logits(&m, &x);
        let max_diff = |a: &[Vec<f32>], b: &[Vec<f32>]| {
            a.iter()
                .flatten()
                .zip(b.iter().flatten())
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max)
        };
        assert!(
            max_diff(&with, &plain) > 1e-3,
            "the adapters change the logits"
        );
        assert!(
            max_diff(&with, &merged) < 1e-4,
            "{}",
            max_diff(&with, &merged)
        );
    }

    fn logits(m: &Llama, x: &Tensor) -> Vec<Vec<f32>> {
        m.forward(x, 0, None, LogitsAt::All, NonFiniteTrace::default())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    }

    fn differs(a: &[f32], b: &[f32]) -> bool {
        a.iter().zip(b).any(|(x, y)| (x - y).abs() > 1e-6)
    }

    #[test]
    fn causal_and_sliding_window_spans() {
        let x = seeded_randn(4014, 1.0, (1, 6, 8), DType::F32);
        // Change only position 0.
        let bump = Tensor::cat(
            &[
                (x.narrow(1, 0, 1).unwrap() + 1.0).unwrap(),
                x.narrow(1, 1, 5).unwrap(),
            ],
            1,
        )
        .unwrap();
        let full = tiny(None);
        let (a, b) = (logits(&full, &x), logits(&full, &bump));
        assert!(
            differs(&a[5], &b[5]),
            "without a window, position 5 sees position 0"
        );
        let windowed = Llama {
            config: LlamaConfig {
                sliding_window: Some(2),
                ..full.config.clone()
            },
            ..full
        };
        let (a, b) = (logits(&windowed, &x), logits(&windowed, &bump));
        assert!(
            differs(&a[1], &b[1]),
            "position 1 sees position 0 (window 2)"
        );
        for t in 2..6 {
            assert!(
                !differs(&a[t], &b[t]),
                "position {t} must not see position 0"
            );
        }
        // Causality: changing the last position changes nothing before it.
        let last = Tensor::cat(
            &[
                x.narrow(1, 0, 5).unwrap(),
                (x.narrow(1, 5, 1).unwrap() * 3.0).unwrap(),
            ],
            1,
        )
        .unwrap();
        let c = logits(&windowed, &last);
        for t in 0..5 {
            assert!(!differs(&a[t], &c[t]), "position {t} sees the future");
        }
    }

    #[test]
    fn cache_with_window_equals_full_forward() {
        let m = tiny(Some(3));
        let x = seeded_randn(4015, 1.0, (2, 7, 8), DType::F32);
        let full = m
            .forward(&x, 0, None, LogitsAt::All, NonFiniteTrace::default())
            .unwrap();
        let mut cache = m.new_cache();
        let mut parts = Vec::new();
        let mut offset = 0;
        for len in [3, 1, 1, 2] {
            let chunk = x.narrow(1, offset, len).unwrap();
            parts.push(
                m.forward(
                    &chunk,
                    offset,
                    Some(&mut cache),
                    LogitsAt::All,
                    NonFiniteTrace::default(),
                )
                .unwrap(),
            );
            offset += len;
        }
        let cached = Tensor::cat(&parts, 1).unwrap();
        let d = (full - cached)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
        // A wrong offset is refused.
        assert!(m
            .forward(
                &x.narrow(1, 0, 1).unwrap(),
                0,
                Some(&mut cache),
                LogitsAt::Last,
                NonFiniteTrace::default()
            )
            .is_err());
    }
}
