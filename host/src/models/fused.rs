//! Fused CPU ops for the LLM forward that training differentiates through: RMSNorm,
//! rotary embedding, scaled + masked softmax and SwiGLU, each one graph node with an
//! analytic backward.
//!
//! Composed from candle primitives, each of these keeps 3-6 full-size intermediate tensors
//! alive until the backward pass (and computes gradients for constant operands such as norm
//! gains, rotary tables and masks); fused, only the op's inputs and output are kept. Their
//! constants (gains, tables, masks) live inside the op, so no gradient can reach them.
//! f32 and f64 on CPU; the LLM uses the composed ops elsewhere (`Llama::use_fused`).

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// f32 / f64 arithmetic the kernels are written in.
trait Float: Copy + Default + Send + Sync + 'static {
    fn f(v: f64) -> Self;
    fn d(self) -> f64;
    fn exp(self) -> Self;
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
}

macro_rules! float {
    ($t:ty) => {
        impl Float for $t {
            fn f(v: f64) -> Self {
                v as $t
            }
            fn d(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn add(self, o: Self) -> Self {
                self + o
            }
            fn mul(self, o: Self) -> Self {
                self * o
            }
            fn sub(self, o: Self) -> Self {
                self - o
            }
            fn div(self, o: Self) -> Self {
                self / o
            }
        }
    };
}
float!(f32);
float!(f64);

/// Elements below which splitting work across threads costs more than it saves (decoding
/// one token works on a few thousand).
const PAR_MIN: usize = 1 << 15;

fn rows_per_task(row_len: usize) -> usize {
    (PAR_MIN / row_len.max(1)).max(1)
}

/// Rows of `out_w` computed in parallel from the matching rows of `x` (width `x_w`):
/// `f(row index, input row, output row)`. Every fused kernel is one of these.
fn map_rows<T: Copy + Default + Send + Sync>(
    x: &[T],
    x_w: usize,
    out_w: usize,
    f: impl Fn(usize, &[T], &mut [T]) + Sync,
) -> Vec<T> {
    if x_w == 0 || out_w == 0 {
        return Vec::new();
    }
    let mut out = vec![T::default(); x.len() / x_w * out_w];
    out.par_chunks_exact_mut(out_w)
        .zip(x.par_chunks_exact(x_w))
        .enumerate()
        .with_min_len(rows_per_task(x_w.max(out_w)))
        .for_each(|(r, (dst, row))| f(r, row, dst));
    out
}

/// As [`map_rows`], with a second input whose rows (width `y_w`) match `x`'s.
fn map_rows2<T: Copy + Default + Send + Sync>(
    x: &[T],
    x_w: usize,
    y: &[T],
    y_w: usize,
    out_w: usize,
    f: impl Fn(usize, &[T], &[T], &mut [T]) + Sync,
) -> Vec<T> {
    if y_w == 0 {
        return Vec::new();
    }
    map_rows(x, x_w, out_w, |r, row, dst| {
        f(r, row, &y[r * y_w..(r + 1) * y_w], dst)
    })
}

/// The f32 data of a contiguous CPU storage (inference-only ops that take f32 alone).
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => contiguous(v, l, op),
        _ => candle_core::bail!("{op}: f32 only"),
    }
}

fn contiguous<'a, T>(data: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

/// Runs `f` on the f32 or f64 data of a CPU storage.
macro_rules! dispatch {
    ($s:expr, $l:expr, $op:expr, |$x:ident| $body:expr) => {
        match $s {
            CpuStorage::F32(v) => {
                let $x = contiguous(v, $l, $op)?;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(v) => {
                let $x = contiguous(v, $l, $op)?;
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: f32 or f64 only", $op),
        }
    };
}

/// As `dispatch!`, for two inputs of the same dtype.
macro_rules! dispatch2 {
    ($s1:expr, $l1:expr, $s2:expr, $l2:expr, $op:expr, |$x:ident, $y:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                let ($x, $y) = (contiguous(a, $l1, $op)?, contiguous(b, $l2, $op)?);
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                let ($x, $y) = (contiguous(a, $l1, $op)?, contiguous(b, $l2, $op)?);
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: f32 or f64 only, same dtype", $op),
        }
    };
}

/// The gradient of an op, computed in one pass over (saved input or output, incoming
/// gradient): candle's composed ops would make 4-10 full-size temporaries per backward.
struct RowGrad<F> {
    name: &'static str,
    /// Row length of both inputs.
    width: usize,
    f: F,
}

/// Per-row kernel: (saved row, gradient row, output row), in f64 arithmetic.
trait RowKernel: Send + Sync {
    fn row<T: Float>(&self, saved: &[T], grad: &[T], out: &mut [T]);
}

impl<F: RowKernel> RowGrad<F> {
    fn run<T: Float>(&self, saved: &[T], grad: &[T]) -> Vec<T> {
        let w = self.width;
        map_rows2(saved, w, grad, w, w, |_, s, g, dst| self.f.row(s, g, dst))
    }
}

impl<F: RowKernel> CustomOp2 for RowGrad<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() || l1.dims().last() != Some(&self.width) {
            candle_core::bail!("{}: {:?} vs {:?}", self.name, l1.dims(), l2.dims());
        }
        let out = dispatch2!(s1, l1, s2, l2, self.name, |s, g| self.run(s, g));
        Ok((out, l1.shape().clone()))
    }
}

/// Applies a one-pass backward kernel to (saved, grad), both (.., width).
fn row_grad<F: RowKernel>(
    name: &'static str,
    f: F,
    saved: &Tensor,
    grad: &Tensor,
) -> Result<Tensor> {
    let width = saved.dims().last().copied().unwrap_or(1);
    saved
        .contiguous()?
        .apply_op2_no_bwd(&grad.contiguous()?, &RowGrad { name, width, f })
}

// ---------------------------------------------------------------------------------------
// RMSNorm: y = x / sqrt(mean(x^2) + eps) * w over the last axis.

/// A norm gain as the kernel reads it, converted once when the model loads.
#[derive(Debug, Clone)]
pub struct Gain(Arc<Vec<f64>>);

impl Gain {
    pub fn new(weight: &Tensor) -> Result<Self> {
        Ok(Self(Arc::new(weight.to_dtype(DType::F64)?.to_vec1()?)))
    }
}

struct RmsNorm {
    weight: Gain,
    eps: f64,
}

fn rms_norm_rows<T: Float>(x: &[T], w: &[f64], eps: f64) -> Vec<T> {
    let d = w.len();
    map_rows(x, d, d, |_, row, dst| {
        let ms = row.iter().map(|v| v.d() * v.d()).sum::<f64>() / d as f64;
        let r = T::f(1.0 / (ms + eps).sqrt());
        for ((o, &v), &g) in dst.iter_mut().zip(row).zip(w) {
            *o = v.mul(r).mul(T::f(g));
        }
    })
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let weight = &self.weight.0;
        if l.dims().last() != Some(&weight.len()) {
            candle_core::bail!(
                "fused-rms-norm: width {:?} vs gain {}",
                l.dims(),
                weight.len()
            );
        }
        let out = dispatch!(s, l, "fused-rms-norm", |x| rms_norm_rows(
            x, weight, self.eps
        ));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(rms_norm_grad(x, grad, &self.weight, self.eps)?))
    }
}

/// d/dx of RMSNorm(x) with gain `weight`, given the output gradient (one pass).
pub fn rms_norm_grad(x: &Tensor, grad: &Tensor, weight: &Gain, eps: f64) -> Result<Tensor> {
    let kernel = RmsNormGrad {
        weight: weight.clone(),
        eps,
    };
    row_grad("fused-rms-norm-grad", kernel, x, grad)
}

struct RmsNormGrad {
    weight: Gain,
    eps: f64,
}

impl RowKernel for RmsNormGrad {
    fn row<T: Float>(&self, x: &[T], g: &[T], dx: &mut [T]) {
        // r = 1/sqrt(mean(x^2)+eps), xh = x r, gw = g w: dx = r (gw - xh mean(gw xh)).
        let w = &self.weight.0;
        let d = x.len() as f64;
        let ms = x.iter().map(|v| v.d() * v.d()).sum::<f64>() / d;
        let r = 1.0 / (ms + self.eps).sqrt();
        let dot = x
            .iter()
            .zip(g)
            .zip(w.iter())
            .map(|((xv, gv), wv)| gv.d() * wv * xv.d() * r)
            .sum::<f64>()
            / d;
        for (((o, xv), gv), wv) in dx.iter_mut().zip(x).zip(g).zip(w.iter()) {
            *o = T::f(r * (gv.d() * wv - xv.d() * r * dot));
        }
    }
}

/// RMSNorm of x (.., d) with gain `weight` (d).
pub fn rms_norm(x: &Tensor, weight: &Gain, eps: f64) -> Result<Tensor> {
    let weight = weight.clone();
    x.contiguous()?.apply_op1(RmsNorm { weight, eps })
}

// ---------------------------------------------------------------------------------------
// Rotary embedding of x (B, H, T, D) with per-row tables (B or 1, T, D/2).

struct Rope {
    cos: Vec<f64>,
    sin: Vec<f64>,
    /// Rows of the tables: 1 (shared) or B.
    table_rows: usize,
    interleaved: bool,
}

impl Rope {
    fn apply<T: Float>(&self, x: &[T], dims: &[usize], sign: f64) -> Vec<T> {
        let (b, h, t, d) = (dims[0], dims[1], dims[2], dims[3]);
        let half = d / 2;
        let mut out = vec![T::default(); x.len()];
        for bi in 0..b {
            let tb = if self.table_rows == 1 { 0 } else { bi };
            for hi in 0..h {
                for ti in 0..t {
                    let base = ((bi * h + hi) * t + ti) * d;
                    let tab = (tb * t + ti) * half;
                    let (src, dst) = (&x[base..base + d], &mut out[base..base + d]);
                    for i in 0..half {
                        let c = T::f(self.cos[tab + i]);
                        let s = T::f(sign * self.sin[tab + i]);
                        let (a, bb) = if self.interleaved {
                            (2 * i, 2 * i + 1)
                        } else {
                            (i, i + half)
                        };
                        dst[a] = src[a].mul(c).sub(src[bb].mul(s));
                        dst[bb] = src[bb].mul(c).add(src[a].mul(s));
                    }
                }
            }
        }
        out
    }
}

struct RopeOp<'a> {
    rope: &'a Rope,
    sign: f64,
}

impl CustomOp1 for RopeOp<'_> {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        if dims.len() != 4 || !dims[3].is_multiple_of(2) {
            candle_core::bail!("fused-rope: input {dims:?}");
        }
        let out = dispatch!(s, l, "fused-rope", |x| self.rope.apply(x, dims, self.sign));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // A rotation: its transpose is the rotation by the opposite angle.
        let back = RopeOp {
            rope: self.rope,
            sign: -self.sign,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// The op that owns its tables (CustomOp1 needs 'static through apply_op1).
struct RopeOwned(Arc<Rope>, f64);

impl CustomOp1 for RopeOwned {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        RopeOp {
            rope: &self.0,
            sign: self.1,
        }
        .cpu_fwd(s, l)
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        RopeOp {
            rope: &self.0,
            sign: self.1,
        }
        .bwd(x, res, grad)
    }
}

/// Rotary tables for one forward, converted once and applied to every layer's Q and K.
#[derive(Clone)]
pub struct RopeTables(Arc<Rope>);

impl RopeTables {
    /// cos/sin (B or 1, 1, T, D/2); `interleaved` pairs (2i, 2i+1) as GGUF stores Q/K,
    /// otherwise (i, i + D/2).
    pub fn new(cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Self> {
        Ok(Self(Arc::new(Rope {
            cos: cos.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?,
            sin: sin.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?,
            table_rows: cos.dim(0)?,
            interleaved,
        })))
    }

    /// Rotary embedding of x (B, H, T, D).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(RopeOwned(self.0.clone(), 1.0))
    }

    /// The inverse rotation (no graph): maps the gradient of the rotated tensor to the
    /// gradient of its input.
    pub fn apply_inverse(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&RopeOp {
            rope: &self.0,
            sign: -1.0,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Softmax(scale * x + mask) over the last axis of scores (B, G, T, S) where the rows of each
// batch entry are T query positions repeated G times; mask (B or 1, T, S) additive.

/// An additive attention mask for one forward, converted once and used by every layer.
#[derive(Clone)]
pub struct SoftmaxMask {
    values: Arc<Vec<f64>>,
    /// 1 (shared by the batch) or B.
    rows: usize,
}

impl SoftmaxMask {
    /// From a mask (B or 1, 1, 1, T, S) or (B or 1, T, S).
    pub fn new(mask: &Tensor) -> Result<Self> {
        Ok(Self {
            values: Arc::new(mask.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?),
            rows: mask.dim(0)?,
        })
    }
}

struct MaskedSoftmax {
    scale: f64,
    mask: Option<SoftmaxMask>,
    t: usize,
}

impl MaskedSoftmax {
    fn rows<T: Float>(&self, x: &[T], dims: &[usize]) -> Vec<T> {
        let s = dims[dims.len() - 1];
        let per_batch: usize = dims[1..dims.len() - 1].iter().product();
        let scale = T::f(self.scale);
        // In the input's precision, as candle's own softmax computes it.
        map_rows(x, s, s, |r, row, dst| {
            let (bi, tq) = (r / per_batch, r % self.t);
            let mask = self.mask.as_ref().map(|m| {
                let mb = if m.rows == 1 { 0 } else { bi };
                &m.values[(mb * self.t + tq) * s..(mb * self.t + tq + 1) * s]
            });
            let mut max = f64::NEG_INFINITY;
            for j in 0..s {
                let v = match mask {
                    Some(m) => row[j].mul(scale).add(T::f(m[j])),
                    None => row[j].mul(scale),
                };
                dst[j] = v;
                max = max.max(v.d());
            }
            if max == f64::NEG_INFINITY {
                dst.fill(T::default());
                return;
            }
            let max = T::f(max);
            let mut sum = T::default();
            for v in dst.iter_mut() {
                *v = v.sub(max).exp();
                sum = sum.add(*v);
            }
            for v in dst.iter_mut() {
                *v = v.div(sum);
            }
        })
    }
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let out = dispatch!(s, l, "fused-masked-softmax", |x| self.rows(x, dims));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(masked_softmax_grad(y, grad, self.scale)?))
    }
}

/// d/dscores of softmax(scale * scores + mask) from its output `probs` and the output
/// gradient (one pass; the mask is constant).
pub fn masked_softmax_grad(probs: &Tensor, grad: &Tensor, scale: f64) -> Result<Tensor> {
    row_grad(
        "fused-masked-softmax-grad",
        SoftmaxGrad { scale },
        probs,
        grad,
    )
}

struct SoftmaxGrad {
    scale: f64,
}

impl RowKernel for SoftmaxGrad {
    fn row<T: Float>(&self, y: &[T], g: &[T], dx: &mut [T]) {
        // dx = scale * y * (g - sum(g y)).
        let dot = y.iter().zip(g).map(|(a, b)| a.d() * b.d()).sum::<f64>();
        for ((o, yv), gv) in dx.iter_mut().zip(y).zip(g) {
            *o = T::f(self.scale * yv.d() * (gv.d() - dot));
        }
    }
}

/// softmax(scale * scores + mask) over the last axis. `scores` (B, G, T, S): each batch
/// entry's rows are its T query positions, repeated over G heads; `mask` (B or 1, 1, 1, T, S)
/// or (B or 1, T, S), additive, -inf where a key is hidden.
pub fn masked_softmax(
    scores: &Tensor,
    scale: f64,
    mask: Option<&SoftmaxMask>,
    t: usize,
) -> Result<Tensor> {
    let mask = mask.cloned();
    scores
        .contiguous()?
        .apply_op1(MaskedSoftmax { scale, mask, t })
}

// ---------------------------------------------------------------------------------------
// SwiGLU over the packed output of one gate+up matmul: [gate | up] (.., 2I) -> (.., I).

struct SwiGlu {
    /// I: the width of the output, half the input's.
    width: usize,
}

fn silu_parts<T: Float>(g: T) -> (T, T) {
    // s = sigmoid(g) = 1 / (1 + exp(-g)), silu(g) = g s, in the input's precision.
    let one = T::f(1.0);
    let s = one.div(one.add(T::f(0.0).sub(g).exp()));
    (s, g.mul(s))
}

impl SwiGlu {
    fn run<T: Float>(&self, x: &[T]) -> Vec<T> {
        let i = self.width;
        map_rows(x, 2 * i, i, |_, row, dst| {
            let (gate, up) = row.split_at(i);
            for ((o, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
                *o = silu_parts(g).1.mul(u);
            }
        })
    }
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut dims = l.dims().to_vec();
        match dims.last_mut() {
            Some(w) if *w == 2 * self.width => *w = self.width,
            _ => candle_core::bail!("fused-swiglu: input {dims:?}, width {}", self.width),
        }
        let out = dispatch!(s, l, "fused-swiglu", |x| self.run(x));
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, packed: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(swiglu_grad(packed, grad)?))
    }
}

/// d/d[gate | up] of [`swiglu`] from its input (.., 2I) and the output gradient (.., I).
pub fn swiglu_grad(packed: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let width = packed.dims().last().copied().unwrap_or(0) / 2;
    packed
        .contiguous()?
        .apply_op2_no_bwd(&grad.contiguous()?, &SwiGluGrad { width })
}

/// d/d[gate | up] of silu(gate) * up, one pass: with s = sigmoid(g),
/// d/dg = grad u s (1 + g (1 - s)), d/du = grad g s.
struct SwiGluGrad {
    width: usize,
}

impl SwiGluGrad {
    fn run<T: Float>(&self, x: &[T], grad: &[T]) -> Vec<T> {
        let i = self.width;
        map_rows2(x, 2 * i, grad, i, 2 * i, |_, row, gr, dst| {
            let (gate, up) = row.split_at(i);
            let (dgate, dup) = dst.split_at_mut(i);
            for j in 0..i {
                let (g, u, d) = (gate[j], up[j], gr[j]);
                let (s, silu) = silu_parts(g);
                let one = T::f(1.0);
                dgate[j] = d.mul(u).mul(s).mul(one.add(g.mul(one.sub(s))));
                dup[j] = d.mul(silu);
            }
        })
    }
}

impl CustomOp2 for SwiGluGrad {
    fn name(&self) -> &'static str {
        "fused-swiglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (d1, d2) = (l1.dims(), l2.dims());
        let ok = d1.len() == d2.len()
            && d1.last() == Some(&(2 * self.width))
            && d2.last() == Some(&self.width)
            && d1[..d1.len() - 1] == d2[..d2.len() - 1];
        if !ok {
            candle_core::bail!("fused-swiglu-grad: {d1:?} vs {d2:?}");
        }
        let out = dispatch2!(s1, l1, s2, l2, "fused-swiglu-grad", |x, g| self.run(x, g));
        Ok((out, l1.shape().clone()))
    }
}

/// silu(gate) * up of a packed [gate | up] (.., 2I) -> (.., I).
pub fn swiglu(packed: &Tensor) -> Result<Tensor> {
    let w = packed.dims().last().copied().unwrap_or(0);
    if w % 2 != 0 {
        candle_core::bail!("fused-swiglu: odd width {w}");
    }
    packed.contiguous()?.apply_op1(SwiGlu { width: w / 2 })
}

// ---------------------------------------------------------------------------------------
// Cross-entropy per row of logits (N, V) against target ids: lse(row) - row[target].

struct CrossEntropy {
    targets: Arc<Vec<u32>>,
}

impl CrossEntropy {
    fn check(&self, dims: &[usize]) -> Result<(usize, usize)> {
        match dims {
            [n, v]
                if *n == self.targets.len() && self.targets.iter().all(|&t| (t as usize) < *v) =>
            {
                Ok((*n, *v))
            }
            _ => candle_core::bail!(
                "fused-cross-entropy: logits {dims:?} for {} targets (ids must be < vocab)",
                self.targets.len()
            ),
        }
    }

    fn run<T: Float>(&self, x: &[T], v: usize) -> Vec<T> {
        map_rows(x, v, 1, |r, row, dst| {
            let t = self.targets[r] as usize;
            dst[0] = T::f(log_sum_exp(row) - row[t].d());
        })
    }
}

/// log(sum(exp(row))): exponentials in the row's precision (a vocabulary-wide row of f64
/// `exp` calls costs several times the f32 ones), the sum in f64.
fn log_sum_exp<T: Float>(row: &[T]) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.d()));
    if !max.is_finite() {
        return max;
    }
    let shift = T::f(max);
    let sum: f64 = row.iter().map(|v| v.sub(shift).exp().d()).sum();
    max + sum.ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, v) = self.check(l.dims())?;
        let out = dispatch!(s, l, "fused-cross-entropy", |x| self.run(x, v));
        Ok((out, Shape::from(n)))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let logits = logits.contiguous()?;
        let grad = grad.contiguous()?;
        Ok(Some(logits.apply_op2_no_bwd(
            &grad,
            &CrossEntropyGrad {
                targets: self.targets.clone(),
            },
        )?))
    }
}

/// d/dlogits of the per-row loss: grad[n] (softmax(row) - onehot(target)).
struct CrossEntropyGrad {
    targets: Arc<Vec<u32>>,
}

impl CrossEntropyGrad {
    fn run<T: Float>(&self, x: &[T], grad: &[T], v: usize) -> Vec<T> {
        map_rows2(x, v, grad, 1, v, |r, row, g, dst| {
            let (g, t) = (g[0], self.targets[r] as usize);
            let lse = T::f(log_sum_exp(row));
            for (o, x) in dst.iter_mut().zip(row) {
                *o = g.mul(x.sub(lse).exp());
            }
            dst[t] = T::f(dst[t].d() - g.d());
        })
    }
}

impl CustomOp2 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = CrossEntropy {
            targets: self.targets.clone(),
        }
        .check(l1.dims())?;
        if l2.dims() != [n] {
            candle_core::bail!("fused-cross-entropy-grad: gradient {:?}", l2.dims());
        }
        let out = dispatch2!(s1, l1, s2, l2, "fused-cross-entropy-grad", |x, g| self
            .run(x, g, v));
        Ok((out, l1.shape().clone()))
    }
}

/// Cross-entropy of each row of `logits` (N, V) against `targets` (N ids): (N,), in the
/// logits' dtype (f32/f64, accumulated in f64). One pass forward and one backward, where
/// candle's composed log-softmax keeps several (N, V) temporaries.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(CrossEntropy {
        targets: Arc::new(targets.to_vec()),
    })
}

// ---------------------------------------------------------------------------------------
// Inference-only f32 kernels for the Whisper encoder: softmax and exact (erf) GELU with
// branch-free exp/erf that the compiler vectorises. perf put 28% of an encoder window in
// glibc's scalar expf and libm's erff (54M softmax exponentials and 9M GELUs per window).

/// How a kernel body multiplies and adds. The vector builds fuse them (every level above
/// portable has FMA: one instruction and one rounding instead of two, which halves the
/// dependent chain of a polynomial); the portable build keeps a multiply and an add, where
/// `f32::mul_add` would be a libm call per element.
pub trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// `a * b + c` with one rounding (the vector builds).
pub struct Fused;

/// `a * b + c` with two roundings (the portable build).
pub struct Unfused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// e^x for f32, Cephes' expf: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial,
/// 2^n from the exponent bits. Relative error < 2e-7 over [-87, 88]; inputs outside are
/// clamped (so -inf gives ~1e-38, not 0; callers handle NaN rows themselves).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    exp_with::<Unfused>(x)
}

/// [`exp_f32`] with its multiply-adds done as `M` does them.
#[inline(always)]
pub fn exp_with<M: MulAdd>(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    // Round to nearest by adding and removing 1.5 * 2^23 (`round()` is a libm call on the
    // baseline x86-64 target and would stop the loop from vectorising).
    const SHIFTER: f32 = 12_582_912.0;
    let shifted = M::mul_add(x, std::f32::consts::LOG2_E, SHIFTER);
    let n = shifted - SHIFTER;
    let r = M::mul_add(n, 2.121_944_4e-4, M::mul_add(n, -0.693_359_4, x));
    let r2 = r * r;
    let mut p = 1.987_569_1e-4f32;
    p = M::mul_add(p, r, 1.398_199_9e-3);
    p = M::mul_add(p, r, 8.333_452e-3);
    p = M::mul_add(p, r, 4.166_579_6e-2);
    p = M::mul_add(p, r, 1.666_666_5e-1);
    p = M::mul_add(p, r, 0.5);
    // 2^n from n's bits: `shifted` lies in [2^23, 2^24), where one unit is one ulp, so its
    // bits are SHIFTER's plus n. (`n as i32` saturates and maps NaN to 0, which LLVM does
    // lane by lane with compares and moves: with AVX-512 that made the whole loop scalar,
    // the encoder's softmax at 16% of a window in perf.)
    let n_int = (shifted.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    let two_n = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    // e^r 2^n = (r + r^2 p) 2^n + 2^n: two dependent multiply-adds after the polynomial where
    // (p r) r + r, + 1, then * 2^n were four (r^2 is computed beside the polynomial). The
    // softmax's exponentials are bound by this chain's length, not by the FMA units. NaN
    // input stays NaN through r.
    M::mul_add(M::mul_add(p, r2, r), two_n, two_n)
}

/// erf(x) for f32, odd-symmetric: Abramowitz & Stegun 7.1.26 (1.5e-7 in exact arithmetic),
/// and below 0.5, where its 1 - (...) form cancels in f32, the Taylor series to x^11.
/// Absolute error < 4e-7 in f32 (measured 3.8e-7; the 1 - (...) form's f32 rounding).
/// (Eigen's and XLA's rational x P(x^2) / Q(x^2) on [-4, 4] halves GELU's time, with the
/// same worst error pointwise, but its error near erf = -1 is the approximation's own, not
/// rounding: GELU's small negative outputs came out far less exact, and the encoder's output
/// drifted 3x further from a float64 encoder's, 6.3e-6 against 2.0e-6 relative L2.)
#[inline(always)]
pub fn erf_f32(x: f32) -> f32 {
    erf_with::<Unfused>(x)
}

/// [`erf_f32`] with its multiply-adds done as `M` does them.
#[inline(always)]
pub fn erf_with<M: MulAdd>(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / M::mul_add(0.327_591_1, a, 1.0);
    let mut poly = 1.061_405_4f32;
    poly = M::mul_add(poly, t, -1.453_152_1);
    poly = M::mul_add(poly, t, 1.421_413_7);
    poly = M::mul_add(poly, t, -0.284_496_74);
    poly = M::mul_add(poly, t, 0.254_829_6);
    let far = M::mul_add(-(poly * t), exp_with::<M>(-a * a), 1.0);
    let a2 = a * a;
    let mut series = -1.0f32 / 1320.0;
    series = M::mul_add(series, a2, 1.0 / 216.0);
    series = M::mul_add(series, a2, -1.0 / 42.0);
    series = M::mul_add(series, a2, 1.0 / 10.0);
    series = M::mul_add(series, a2, -1.0 / 3.0);
    series = M::mul_add(series, a2, 1.0);
    let near = std::f32::consts::FRAC_2_SQRT_PI * a * series;
    let y = if a < 0.5 { near } else { far };
    y.copysign(x)
}

/// `fn $name(args)` that runs `$body::<Fused>(args)` compiled for AVX-512 or AVX2 + FMA,
/// whichever `simd::level()` picks, else `$body::<Unfused>(args)` as the crate is built
/// (baseline x86-64, 4 lanes). `$body` is `#[inline(always)]`, so each copy is vectorised
/// for its own target.
macro_rules! with_simd {
    (fn $name:ident($($arg:ident: $ty:ty),*) => $body:ident) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                use super::simd::SimdLevel;
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
                unsafe fn avx512($($arg: $ty),*) {
                    $body::<Fused>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $body::<Fused>($($arg),*)
                }
                match super::simd::level() {
                    // SAFETY: `level()` is never above what the CPU runs.
                    SimdLevel::Avx512 => return unsafe { avx512($($arg),*) },
                    SimdLevel::Avx2 => return unsafe { avx2($($arg),*) },
                    SimdLevel::Portable => {}
                }
            }
            $body::<Unfused>($($arg),*)
        }
    };
}

#[inline(always)]
fn gelu_body<M: MulAdd>(out: &mut [f32], x: &[f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        let e = erf_with::<M>(x * std::f32::consts::FRAC_1_SQRT_2);
        *o = 0.5 * x * (1.0 + e);
    }
}

with_simd!(fn gelu_chunk(out: &mut [f32], x: &[f32]) => gelu_body);

/// [`gelu_body`] writing over its input (the same arithmetic per element).
#[inline(always)]
fn gelu_in_place_body<M: MulAdd>(x: &mut [f32]) {
    for v in x.iter_mut() {
        let e = erf_with::<M>(*v * std::f32::consts::FRAC_1_SQRT_2);
        *v = 0.5 * *v * (1.0 + e);
    }
}

with_simd!(fn gelu_chunk_in_place(x: &mut [f32]) => gelu_in_place_body);

/// softmax of a row, written over it. The max runs here too, in the vector build (in the
/// caller's baseline build it and a NaN scan took 8% of an encoder window: perf, AVX-512
/// machine); the exponentials and their sum are one pass (32 running sums), so a row is read three times, not four. No separate NaN scan: the max skips
/// NaN, but a NaN input makes the sum of exponentials NaN (finite inputs below a finite max
/// give finite terms). A row with a NaN or an infinity comes out all NaN, as std's
/// `(v - max).exp() / sum` makes it (an infinite max gives inf - inf somewhere, an all
/// -inf row -inf - -inf everywhere; either way the sum is NaN).
#[inline(always)]
fn softmax_in_place_body<M: MulAdd>(row: &mut [f32]) {
    let mut inv = 0f32;
    softmax_unnormalised_body::<M>(row, &mut inv);
    if inv.is_nan() {
        row.fill(f32::NAN);
    } else {
        row.iter_mut().for_each(|d| *d *= inv);
    }
}

/// The softmax's exponentials, exp(x - max), written over `row`, and 1 / their sum into
/// `inv`: the attention scales its hd outputs a row by it instead of the row's keys. A row
/// whose max is not finite (left as it was) or whose sum is NaN gets `inv` NaN; an empty
/// row gets 1.
#[inline(always)]
fn softmax_unnormalised_body<M: MulAdd>(row: &mut [f32], inv: &mut f32) {
    *inv = 1.0;
    if row.is_empty() {
        return;
    }
    *inv = f32::NAN;
    let max = lanes(row, f32::NEG_INFINITY, |m, v| if v > m { v } else { m });
    if max.is_finite() {
        const N: usize = 32;
        let mut acc = [0f32; N];
        let mut chunks = row.chunks_exact_mut(N);
        for c in &mut chunks {
            for i in 0..N {
                c[i] = exp_with::<M>(c[i] - max);
                acc[i] += c[i];
            }
        }
        // The rest by eights (a 1500-wide encoder row leaves 28: as scalars they took ~15%
        // of the row's time), then the last few alone.
        let mut eights = chunks.into_remainder().chunks_exact_mut(8);
        for c in &mut eights {
            for i in 0..8 {
                c[i] = exp_with::<M>(c[i] - max);
                acc[i] += c[i];
            }
        }
        let mut sum = 0f32;
        for v in eights.into_remainder() {
            *v = exp_with::<M>(*v - max);
            sum += *v;
        }
        for a in acc {
            sum += a;
        }
        if !sum.is_nan() {
            *inv = 1.0 / sum;
        }
    }
}

with_simd!(fn softmax_unnormalised(row: &mut [f32], inv: &mut f32) => softmax_unnormalised_body);

with_simd!(fn softmax_in_place(row: &mut [f32]) => softmax_in_place_body);

/// softmax of `row` into `dst` ([`softmax_in_place`] over a copy).
fn softmax_row(dst: &mut [f32], row: &[f32]) {
    dst.copy_from_slice(row);
    softmax_in_place(dst);
}

struct FastGelu;

impl CustomOp1 for FastGelu {
    fn name(&self) -> &'static str {
        "fast-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "fast-gelu-erf")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(PAR_MIN)
            .zip(x.par_chunks(PAR_MIN))
            .for_each(|(o, x)| gelu_chunk(o, x));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// A reduction over 32 interleaved lanes, then across them: a single running value is a
/// chain the compiler must keep in order (no vector instructions); 32 independent ones are
/// four 8-lane (two 16-lane) vectors, whose chains of adds or maxes overlap instead of
/// waiting on each other's latency. The order is the same whatever the vector width.
#[inline(always)]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    const N: usize = 32;
    let mut acc = [init; N];
    let chunks = x.chunks_exact(N);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..N {
            acc[i] = f(acc[i], c[i]);
        }
    }
    let mut out = rest.iter().fold(init, |a, &v| f(a, v));
    for a in acc {
        out = f(out, a);
    }
    out
}

struct FastSoftmax;

impl CustomOp1 for FastSoftmax {
    fn name(&self) -> &'static str {
        "fast-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "fast-softmax")?;
        let n = l.dims().last().copied().unwrap_or(1);
        let out = map_rows(x, n, n, |_, row, dst| softmax_row(dst, row));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

struct GeluInPlace;

impl candle_core::InplaceOp1 for GeluInPlace {
    fn name(&self) -> &'static str {
        "gelu-erf-in-place"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("gelu-erf-in-place: f32 only")
        };
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("gelu-erf-in-place: the input must be contiguous")
        };
        v[a..b]
            .par_chunks_mut(PAR_MIN)
            .for_each(gelu_chunk_in_place);
        Ok(())
    }
}

/// [`gelu_erf_inference`] of a tensor that nothing else reads (a layer's fresh output): on
/// the CPU in f32 it is written over, which saves a zeroed buffer of its size; the same
/// values either way.
pub fn gelu_erf_inference_owned(x: Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous() {
        x.inplace_op1(&GeluInPlace)?;
        Ok(x)
    } else {
        gelu_erf_inference(&x)
    }
}

/// Exact GELU, 0.5 x (1 + erf(x / sqrt 2)), for inference (no backward): the fast kernel on
/// CPU f32, candle's elsewhere.
pub fn gelu_erf_inference(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&FastGelu)
    } else {
        x.gelu_erf()
    }
}

/// Softmax over the last axis for inference (no backward): the fast kernel on CPU f32,
/// candle's elsewhere. candle's CPU kernel sums the exponentials in the input's dtype: in
/// bf16 a row of 1500 attention scores sums to ~2500 where the spacing is 16, and the
/// probabilities came out 57% off (relative L2; `selftest --dtype bf16` found it). Half
/// precision on the CPU is widened to f32 for the softmax, as candle's CUDA kernel
/// accumulates in f32.
pub fn softmax_last_dim_inference(x: &Tensor) -> Result<Tensor> {
    match (x.device().is_cpu(), x.dtype()) {
        (true, DType::F32) => x.contiguous()?.apply_op1_no_bwd(&FastSoftmax),
        (true, dtype @ (DType::BF16 | DType::F16)) => {
            softmax_last_dim_inference(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)
        }
        _ => candle_nn::ops::softmax_last_dim(x),
    }
}

// ---------------------------------------------------------------------------------------
// Convolution as one matrix product (the Whisper encoder's stem).

struct Im2Col {
    taps: usize,
    stride: usize,
    padding: usize,
}

impl Im2Col {
    fn out_len(&self, len: usize) -> usize {
        (len + 2 * self.padding).saturating_sub(self.taps) / self.stride + 1
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col-channels-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, "im2col-channels-last")?;
        let (b, len, ch) = l.shape().dims3()?;
        let out_len = self.out_len(len);
        let row = self.taps * ch;
        // Every element is written below (taps in the padding as zeros): no zeroing pass,
        // which for a reused allocation is a memset on this one thread.
        let mut out = Vec::with_capacity(b * out_len * row);
        if row > 0 {
            out.spare_capacity_mut()
                .par_chunks_mut(row)
                .enumerate()
                .with_min_len(rows_per_task(row))
                .for_each(|(i, dst)| {
                    let (bi, t) = (i / out_len, i % out_len);
                    for (tap, dst) in dst.chunks_exact_mut(ch).enumerate() {
                        // Input position of this tap; None in the padding.
                        let at = (t * self.stride + tap).checked_sub(self.padding);
                        match at.filter(|&at| at < len) {
                            Some(at) => {
                                let src = &x[(bi * len + at) * ch..][..ch];
                                for (d, &v) in dst.iter_mut().zip(src) {
                                    d.write(v);
                                }
                            }
                            None => dst.iter_mut().for_each(|d| {
                                d.write(0.0);
                            }),
                        }
                    }
                });
        }
        // SAFETY: the loop above wrote all b * out_len rows of `row` elements.
        unsafe { out.set_len(b * out_len * row) };
        Ok((CpuStorage::F32(out), Shape::from((b, out_len, row))))
    }
}

/// The rows a 1-D convolution reads, side by side: x (B, L, C), channels last, f32 on the
/// CPU, -> (B, L_out, taps * C), output position t's row holding input positions
/// t * stride - padding + 0..taps (zeros where they fall in the padding). The convolution is
/// then one matrix product with the weight laid out (C_out, taps * C).
pub fn im2col_channels_last(
    x: &Tensor,
    taps: usize,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let (_, len, _) = x.dims3()?;
    if taps == 0 || stride == 0 || len + 2 * padding < taps {
        candle_core::bail!(
            "im2col: {taps} taps, stride {stride}, padding {padding} over {len} positions"
        );
    }
    x.contiguous()?.apply_op1_no_bwd(&Im2Col {
        taps,
        stride,
        padding,
    })
}

// ---------------------------------------------------------------------------------------
// Attention for inference (the Whisper encoder): softmax(q k^T scale) v per head, in blocks
// of query rows, without materialising a head's whole score matrix.

/// Query rows per block. gemm repacks the head's keys and values for every block, so more
/// rows a block pay for that less often, while the block's scores (rows x 1500 for a 30 s
/// window) should stay near the core between the two products and the softmax. Measured
/// with `bench_models attention` (tiny.en's shape, 2-core Zen 3): 32 rows 29.5-29.8 ms, 48
/// 27.1-28.0, 64 26.8-27.0, 96 26.1-26.3, 128 26.8-28.6, 192 27.4-27.5.
const ATTENTION_ROWS: usize = 96;

thread_local! {
    /// One block's scores, then its exponentials in their place (one buffer, not two, for
    /// the caches' sake), reused across blocks and calls.
    static ATTENTION_SCRATCH: std::cell::RefCell<Vec<f32>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

struct BlockedAttention {
    heads: usize,
    scale: f32,
}

/// The output pointer shared by the tasks of [`BlockedAttention`], each writing its own rows
/// and columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint parts of the buffer (see `cpu_fwd`), which outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// Through a method, so that closures capture the wrapper (Send), not its field.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// The softmax's normalisation, applied to a block's hd outputs a row instead of its tk
/// probabilities: row r (of stride `width`, from `at`) times `inv[r]`.
///
/// # Safety
/// `inv.len()` rows of `hd` elements from `at`, `width` apart, must be in bounds of one
/// allocation that nothing else reads or writes meanwhile.
unsafe fn scale_rows(at: *mut f32, width: usize, hd: usize, inv: &[f32]) {
    for (r, &inv) in inv.iter().enumerate() {
        // SAFETY: in bounds and unshared, by the caller's contract.
        let row = unsafe { std::slice::from_raw_parts_mut(at.add(r * width), hd) };
        row.iter_mut().for_each(|o| *o *= inv);
    }
}

/// Each head's keys transposed once, (hd, tk) contiguous per (batch, head): read in place,
/// k^T has a column stride of `width`, and gemm gathered it element by element into its
/// packed layout for every block of queries (~5% of an encoder window in perf). `k` is
/// (b, tk, h * hd). Not zeroed first (a memset on one thread when the allocator reuses
/// memory): every element is written.
fn keys_transposed(k: &[f32], (b, h, tk, hd): (usize, usize, usize, usize)) -> Vec<f32> {
    let width = h * hd;
    let mut kt = Vec::with_capacity(b * h * hd * tk);
    kt.spare_capacity_mut()
        .par_chunks_mut(hd * tk)
        .enumerate()
        .for_each(|(bh, dst)| {
            let (bi, hi) = (bh / h, bh % h);
            for t in 0..tk {
                let key = &k[(bi * tk + t) * width + hi * hd..][..hd];
                for (d, &x) in key.iter().enumerate() {
                    dst[d * tk + t].write(x);
                }
            }
        });
    // SAFETY: each of the b * h chunks of hd * tk elements was written in full above.
    unsafe { kt.set_len(b * h * hd * tk) };
    kt
}

impl CustomOp3 for BlockedAttention {
    fn name(&self) -> &'static str {
        "blocked-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            contiguous_f32(sq, lq, "blocked-attention")?,
            contiguous_f32(sk, lk, "blocked-attention")?,
            contiguous_f32(sv, lv, "blocked-attention")?,
        );
        // Heads side by side in the last axis, as the projections give them: head `h` of
        // row `t` is columns h*hd.. of that row, read with strides (no copies per head).
        let (b, tq, width) = lq.shape().dims3()?;
        let (bk, tk, width_k) = lk.shape().dims3()?;
        let h = self.heads;
        if (bk, width_k) != (b, width) || lv.dims() != lk.dims() || h == 0 || width % h != 0 {
            candle_core::bail!(
                "blocked-attention: q {:?}, k {:?}, v {:?}, {h} heads",
                lq.dims(),
                lk.dims(),
                lv.dims()
            );
        }
        let hd = width / h;
        if tk == 0 || hd == 0 {
            // No keys: every output row is an empty sum (as the composed ops give).
            let out = vec![0f32; b * tq * width];
            return Ok((CpuStorage::F32(out), Shape::from((b, tq, width))));
        }
        let kt = keys_transposed(k, (b, h, tk, hd));
        // Not zeroed first either: every element is written (below) before it is read.
        let mut out = Vec::<f32>::with_capacity(b * tq * width);
        let blocks = tq.div_ceil(ATTENTION_ROWS);
        let dst = SharedOut(out.spare_capacity_mut().as_mut_ptr().cast::<f32>());
        (0..b * h * blocks).into_par_iter().for_each(|task| {
            let (bh, blk) = (task / blocks, task % blocks);
            let (bi, hi) = (bh / h, bh % h);
            let r0 = blk * ATTENTION_ROWS;
            let rows = ATTENTION_ROWS.min(tq - r0);
            // Offsets of this block's first query and of this head's first value.
            let q_at = (bi * tq + r0) * width + hi * hd;
            let kv_at = bi * tk * width + hi * hd;
            let kt = &kt[bh * hd * tk..][..hd * tk];
            let mut inv = [0f32; ATTENTION_ROWS];
            ATTENTION_SCRATCH.with(|scratch| {
                let scores = &mut *scratch.borrow_mut();
                scores.resize(rows * tk, 0.0);
                // SAFETY: q is read as (rows, hd) with row stride `width` from q_at, in
                // bounds of q ((b, tq, width)); kt is (hd, tk) row-major; scores is (rows,
                // tk) row-major; read_dst is false, so scores is only written.
                unsafe {
                    gemm::gemm(
                        rows,
                        tk,
                        hd,
                        scores.as_mut_ptr(),
                        1,
                        tk as isize,
                        false,
                        q.as_ptr().add(q_at),
                        1,
                        width as isize,
                        kt.as_ptr(),
                        1,
                        tk as isize,
                        0.0,
                        self.scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
                for (row, inv) in scores.chunks_exact_mut(tk).zip(inv.iter_mut()) {
                    softmax_unnormalised(row, inv);
                }
                let probs = &*scores;
                // SAFETY: probs is (rows, tk), v is read as (tk, hd) with row stride `width`
                // from kv_at; the destination is rows r0.. of batch bi, columns hi*hd.. (hd of
                // them) of the (b, tq, width) output, which no other task writes; read_dst is
                // false.
                unsafe {
                    gemm::gemm(
                        rows,
                        hd,
                        tk,
                        dst.ptr().add(q_at),
                        1,
                        width as isize,
                        false,
                        probs.as_ptr(),
                        1,
                        tk as isize,
                        v.as_ptr().add(kv_at),
                        1,
                        width as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            });
            // SAFETY: rows r0.. (inv[..rows]) of batch bi, columns hi*hd.. of the output:
            // this task's own part (see above), in bounds, no reference to it alive.
            unsafe { scale_rows(dst.ptr().add(q_at), width, hd, &inv[..rows]) };
        });
        // SAFETY: the tasks cover every (batch, head, block): each wrote its rows' hd columns
        // with gemm (read_dst false: nothing is read first), so all b * tq * width are set.
        unsafe { out.set_len(b * tq * width) };
        Ok((CpuStorage::F32(out), Shape::from((b, tq, width))))
    }
}

/// softmax(q k^T scale) v per head for inference, heads side by side in the last axis as the
/// projections give them: q (B, Tq, H * hd), k and v (B, Tk, H * hd) -> (B, Tq, H * hd). On
/// the CPU in f32, each block of 96 query rows of a head is one task (scores, softmax and the
/// product with v while the block is in cache; each head's keys transposed once, the queries
/// and values read in place, the output written straight into the joined layout); elsewhere
/// candle's ops.
pub fn attention_inference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, tq, width) = q.dims3()?;
    if q.device().is_cpu() && q.dtype() == DType::F32 {
        return q.contiguous()?.apply_op3_no_bwd(
            &k.contiguous()?,
            &v.contiguous()?,
            &BlockedAttention {
                heads,
                scale: scale as f32,
            },
        );
    }
    if heads == 0 || width % heads != 0 {
        candle_core::bail!("attention: width {width} is not {heads} heads");
    }
    let hd = width / heads;
    let split = |x: &Tensor| -> Result<Tensor> {
        let t = x.dim(1)?;
        x.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()
    };
    let scores = (split(q)?.matmul(&split(k)?.t()?)? * scale)?;
    let probs = softmax_last_dim_inference(&scores)?;
    probs
        .matmul(&split(v)?)?
        .transpose(1, 2)?
        .reshape((b, tq, width))
}

// ---------------------------------------------------------------------------------------
// One new position attending over a KV cache (a decode step), the cache read in place.

/// Query heads x keys at or above which a decode step's heads are split across threads (a
/// head over 256 keys is ~30 k multiply-adds, several times a parallel region's cost).
const DECODE_ATTENTION_PAR_MIN: usize = 1 << 11;

struct DecodeAttention {
    scale: f32,
    mask: Option<SoftmaxMask>,
    /// Per batch row, its padding slots in front of the real ones (skipped).
    first: Option<Vec<usize>>,
}

/// A (B, G, S, hd) view with unit stride in hd: element (b, g, j, 0) is at
/// `base + b * sb + g * sg + j * sj`.
#[derive(Clone, Copy)]
struct CacheView<'a> {
    data: &'a [f32],
    base: usize,
    strides: [usize; 3],
}

impl CacheView<'_> {
    fn new<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<CacheView<'a>> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("decode-attention: {what} is not f32");
        };
        let st = l.stride();
        if st.len() != 4 || st[3] != 1 {
            candle_core::bail!("decode-attention: {what} needs unit stride in its last axis");
        }
        Ok(CacheView {
            data,
            base: l.start_offset(),
            strides: [st[0], st[1], st[2]],
        })
    }

    fn row(&self, b: usize, g: usize, j: usize, hd: usize) -> &[f32] {
        let at = self.base + b * self.strides[0] + g * self.strides[1] + j * self.strides[2];
        &self.data[at..at + hd]
    }
}

/// q . k in 8 lanes of partial sums, added in a fixed order (the same result at every
/// vector width the compiler picks).
#[inline(always)]
fn dot8(q: &[f32], k: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (qc, kc) = (q.chunks_exact(8), k.chunks_exact(8));
    let tail: f32 = qc
        .remainder()
        .iter()
        .zip(kc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in qc.zip(kc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

impl DecodeAttention {
    /// One query head `q` (hd) of K/V head g of batch row b: its output into `y` (hd).
    #[inline(always)]
    fn head(
        &self,
        q: &[f32],
        (k, v): (CacheView<'_>, CacheView<'_>),
        (b, g, s): (usize, usize, usize),
        y: &mut [f32],
    ) {
        let hd = q.len();
        let first = self.first.as_ref().map_or(0, |f| f[b]).min(s);
        let mask = self.mask.as_ref().map(|m| {
            let mb = if m.rows == 1 { 0 } else { b };
            &m.values[mb * s..(mb + 1) * s]
        });
        let mut p = vec![0f32; s - first];
        // As `MaskedSoftmax` computes a row in f32.
        let mut max = f32::NEG_INFINITY;
        for (j, pj) in (first..s).zip(p.iter_mut()) {
            let score = dot8(q, k.row(b, g, j, hd)) * self.scale;
            *pj = match mask {
                Some(m) => score + m[j] as f32,
                None => score,
            };
            max = max.max(*pj);
        }
        y.fill(0.0);
        if max == f32::NEG_INFINITY {
            return;
        }
        let mut sum = 0f32;
        for pj in p.iter_mut() {
            *pj = (*pj - max).exp();
            sum += *pj;
        }
        for pj in p.iter_mut() {
            *pj /= sum;
        }
        for (j, &pj) in (first..s).zip(&p) {
            for (yd, vd) in y.iter_mut().zip(v.row(b, g, j, hd)) {
                *yd += pj * vd;
            }
        }
    }

    /// `head` compiled for AVX2 (the same arithmetic: no operation is fused).
    #[target_feature(enable = "avx2,fma")]
    #[cfg(target_arch = "x86_64")]
    unsafe fn head_avx2(
        &self,
        q: &[f32],
        kv: (CacheView<'_>, CacheView<'_>),
        at: (usize, usize, usize),
        y: &mut [f32],
    ) {
        self.head(q, kv, at, y)
    }
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = contiguous_f32(s1, l1, "decode-attention")?;
        let (k, v) = (
            CacheView::new(s2, l2, "keys")?,
            CacheView::new(s3, l3, "values")?,
        );
        let (b, g, r, hd) = l1.shape().dims4()?;
        let (kb, kg, s, khd) = l2.shape().dims4()?;
        if (kb, kg, khd) != (b, g, hd) || l3.shape() != l2.shape() {
            candle_core::bail!(
                "decode-attention: q {:?}, k {:?}, v {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        if let Some(m) = &self.mask {
            if m.values.len() != m.rows * s || (m.rows != 1 && m.rows != b) {
                candle_core::bail!("decode-attention: mask does not match {b} rows of {s} keys");
            }
        }
        if self.first.as_ref().is_some_and(|f| f.len() != b) {
            candle_core::bail!("decode-attention: front padding is not one per row");
        }
        let mut out = vec![0f32; b * g * r * hd];
        let avx2 = super::simd::level() >= super::simd::SimdLevel::Avx2;
        // Head h of the output is query head h % r of K/V head (h / r) % g of row h / (g r).
        let task = |h: usize, y: &mut [f32]| {
            let at = (h / (g * r), (h / r) % g, s);
            let q = &q[h * hd..(h + 1) * hd];
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: `avx2` is set only where the CPU runs AVX2 and FMA.
                return unsafe { self.head_avx2(q, (k, v), at, y) };
            }
            let _ = avx2;
            self.head(q, (k, v), at, y)
        };
        if hd == 0 {
        } else if b * g * r * s >= DECODE_ATTENTION_PAR_MIN {
            out.par_chunks_exact_mut(hd)
                .enumerate()
                .for_each(|(h, y)| task(h, y));
        } else {
            for (h, y) in out.chunks_exact_mut(hd).enumerate() {
                task(h, y);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, 1, g * r * hd))))
    }
}

/// softmax(q k^T scale + mask) v for one new position per batch row, reading the keys and
/// values where the cache holds them (no copy of the cache per step, no matrix-product
/// set-up for one query row). q (B, G, R, hd): the R query heads that share each of the G
/// K/V heads; k and v (B, G, S, hd) with unit stride in hd (the cache buffers narrowed to
/// S positions); `mask` as for [`masked_softmax`] with one query position; `first[b]`: row
/// b's padding slots in front of its real ones, which it skips, so a row's arithmetic is
/// what it is alone. Returns (B, 1, G * R * hd), the heads in order. CPU f32, no backward.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&SoftmaxMask>,
    first: Option<&[usize]>,
    scale: f64,
) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(
        k,
        v,
        &DecodeAttention {
            scale: scale as f32,
            mask: mask.cloned(),
            first: first.map(<[usize]>::to_vec),
        },
    )
}

// ---------------------------------------------------------------------------------------
// Batched matrix products without a graph (attention on the training path).

struct BatchedMatmul {
    transpose_a: bool,
    transpose_b: bool,
}

impl BatchedMatmul {
    /// (batch, m, k, n) of op(a) (m, k) times op(b) (k, n), checked.
    fn dims(&self, a: &[usize], b: &[usize]) -> Result<(usize, usize, usize, usize)> {
        let bad = || candle_core::bail!("batched-matmul: {a:?} x {b:?}");
        if a.len() < 2 || a.len() != b.len() || a[..a.len() - 2] != b[..b.len() - 2] {
            return bad();
        }
        let (ra, ca) = (a[a.len() - 2], a[a.len() - 1]);
        let (rb, cb) = (b[b.len() - 2], b[b.len() - 1]);
        let (m, k) = if self.transpose_a { (ca, ra) } else { (ra, ca) };
        let (k2, n) = if self.transpose_b { (cb, rb) } else { (rb, cb) };
        if k != k2 {
            return bad();
        }
        Ok((a[..a.len() - 2].iter().product(), m, k, n))
    }

    fn run<T: Float>(
        &self,
        a: &[T],
        b: &[T],
        (batch, m, k, n): (usize, usize, usize, usize),
    ) -> Vec<T> {
        // Row and column strides of op(x) for x stored row-major (rows, cols).
        let strides = |transposed: bool, cols: usize| -> (isize, isize) {
            if transposed {
                (1, cols as isize)
            } else {
                (cols as isize, 1)
            }
        };
        let (a_rs, a_cs) = strides(self.transpose_a, if self.transpose_a { m } else { k });
        let (b_rs, b_cs) = strides(self.transpose_b, if self.transpose_b { k } else { n });
        let mut out = vec![T::default(); batch * m * n];
        if m * n == 0 {
            return out;
        }
        out.par_chunks_exact_mut(m * n)
            .enumerate()
            .for_each(|(i, dst)| {
                let (lhs, rhs) = (
                    &a[i * m * k..(i + 1) * m * k],
                    &b[i * k * n..(i + 1) * k * n],
                );
                // SAFETY: lhs, rhs and dst hold exactly (m, k), (k, n) and (m, n) elements
                // with the strides given; read_dst is false, so dst is only written.
                unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        lhs.as_ptr(),
                        a_cs,
                        a_rs,
                        rhs.as_ptr(),
                        b_cs,
                        b_rs,
                        T::f(0.0),
                        T::f(1.0),
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            });
        out
    }
}

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1.dims(), l2.dims())?;
        let out = dispatch2!(s1, l1, s2, l2, "batched-matmul", |a, b| self
            .run(a, b, dims));
        let mut shape = l1.dims()[..l1.dims().len() - 2].to_vec();
        shape.extend([dims.1, dims.3]);
        Ok((out, Shape::from(shape)))
    }
}

/// op(a) x op(b) over leading batch dims, op = transpose when asked; no graph (for values
/// and gradients computed off the graph). Parallel over the batch, each product on one
/// thread: attention's products are a few MFLOP each, and splitting each one across threads
/// (as candle's matmul does) costs more in synchronisation than it gains.
pub fn batched_matmul(
    a: &Tensor,
    transpose_a: bool,
    b: &Tensor,
    transpose_b: bool,
) -> Result<Tensor> {
    a.contiguous()?.apply_op2_no_bwd(
        &b.contiguous()?,
        &BatchedMatmul {
            transpose_a,
            transpose_b,
        },
    )
}

// ---------------------------------------------------------------------------------------
// A value computed off the graph, put on it with a hand-written backward.

struct Attached<F> {
    backward: F,
}

impl<F: Fn(&Tensor) -> Result<Tensor> + Send + Sync> CustomOp2 for Attached<F> {
    fn name(&self) -> &'static str {
        "attached-backward"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        _l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch!(s2, l2, "attached-backward", |v| v.to_vec());
        Ok((out, l2.shape().clone()))
    }

    fn bwd(
        &self,
        _input: &Tensor,
        _value: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.backward)(grad)?), None))
    }
}

/// `value`, computed from `input` without recording a graph, as a node of `input`'s graph
/// whose backward is `backward` (output gradient -> input gradient). A whole decoder layer
/// becomes one node: candle's backward allocates a zeroed tensor and adds into it for the
/// input of every node, which for a layer's ~25 small ops cost more than its elementwise
/// work. f32/f64 on CPU.
pub fn attach<F>(input: &Tensor, value: &Tensor, backward: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    input.apply_op2(&value.contiguous()?, Attached { backward })
}

/// Where a taped backward leaves the gradient of a parameter used off the graph, for the
/// [`grad_port`] that hands it to candle's backward.
pub type GradSlot = std::sync::Arc<std::sync::Mutex<Option<Tensor>>>;

struct GradPort {
    slot: GradSlot,
}

impl CustomOp2 for GradPort {
    fn name(&self) -> &'static str {
        "grad-port"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = dispatch!(s1, l1, "grad-port", |v| v.to_vec());
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _input: &Tensor,
        _param: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let param_grad = self.slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok((Some(grad.clone()), param_grad))
    }
}

/// `input` unchanged (a copy), as a graph node whose backward passes the gradient through
/// and gives `param` the gradient found in `slot` by then. Placed below a taped layer that
/// used `param` off the graph: candle runs the layer's backward (which fills the slot)
/// before this node's, since this node feeds the layer. f32/f64 on CPU.
pub fn grad_port(input: &Tensor, param: &Tensor, slot: GradSlot) -> Result<Tensor> {
    input.contiguous()?.apply_op2(param, GradPort { slot })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Shape, Var, D};

    /// Normal draws (mean 0, standard deviation `std`) of `dtype` from a generator seeded by
    /// `seed`, on the CPU: a test's inputs are the same on every run, so that a failure
    /// reproduces (candle cannot seed its CPU generator, and unseeded draws once failed a
    /// tolerance in CI that hundreds of runs had met).
    pub fn seeded_randn(seed: u64, std: f64, shape: impl Into<Shape>, dtype: DType) -> Tensor {
        use rand::{Rng, SeedableRng};
        let shape: Shape = shape.into();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let values: Vec<f64> = (0..shape.elem_count())
            .map(|_| {
                // Box-Muller; u1 in (0, 1] keeps the logarithm finite.
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random();
                std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .expect("seeded draws")
    }

    /// A softmax over 1500 attention scores in bf16 on the CPU is within bf16 rounding of
    /// the f32 one (candle's CPU kernel, summing in bf16, was 57% off).
    #[test]
    fn half_precision_softmax_on_the_cpu_is_within_rounding() {
        let x = seeded_randn(1001, 1.0, (2, 3, 1500), DType::F32);
        let reference = softmax_last_dim_inference(&x).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let y = softmax_last_dim_inference(&x.to_dtype(dtype).unwrap()).unwrap();
            assert_eq!(y.dtype(), dtype);
            let y = y.to_dtype(DType::F32).unwrap();
            let err = (&y - &reference).unwrap().sqr().unwrap().sum_all().unwrap();
            let norm = reference.sqr().unwrap().sum_all().unwrap();
            let rel = (err.to_scalar::<f32>().unwrap() / norm.to_scalar::<f32>().unwrap()).sqrt();
            // bf16 keeps 8 bits of mantissa: 2^-9 relative rounding per value.
            assert!(rel < 1e-2, "{dtype:?}: relative L2 {rel}");
        }
    }

    /// A decode step's attention read in place from narrowed cache buffers equals candle's
    /// composed ops on copies (grouped heads, an additive mask with hidden slots, a width
    /// that is not a multiple of 8), at every SIMD level bit for bit; a row with padding in
    /// front gives bit for bit what it gives alone, without the padding.
    #[test]
    fn decode_attention_over_a_cache_view_matches_composed_ops() {
        let dev = Device::Cpu;
        let (b, g, r, hd, cap, s) = (2, 2, 3, 12, 10, 7);
        let q = seeded_randn(1002, 1.0, (b, g, r, hd), DType::F32);
        let kbuf = seeded_randn(1003, 1.0, (b, g, cap, hd), DType::F32);
        let vbuf = seeded_randn(1004, 1.0, (b, g, cap, hd), DType::F32);
        let (k, v) = (kbuf.narrow(2, 0, s).unwrap(), vbuf.narrow(2, 0, s).unwrap());
        assert!(
            !k.is_contiguous(),
            "the test needs a strided view, as the cache gives"
        );
        // Row 0: two padding slots in front; row 1: slot 4 hidden.
        let mut m = vec![0f32; b * s];
        m[0] = f32::NEG_INFINITY;
        m[1] = f32::NEG_INFINITY;
        m[s + 4] = f32::NEG_INFINITY;
        let mask_t = Tensor::from_vec(m, (b, 1, 1, 1, s), &dev).unwrap();
        let mask = SoftmaxMask::new(&mask_t).unwrap();
        let scale = 0.3;

        let scores = (q.matmul(&k.contiguous().unwrap().t().unwrap()).unwrap() * scale)
            .unwrap()
            .broadcast_add(&mask_t.reshape((b, 1, 1, s)).unwrap())
            .unwrap();
        let want = candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(&v.contiguous().unwrap())
            .unwrap()
            .reshape((b, 1, g * r * hd))
            .unwrap();
        let mut outputs = Vec::new();
        for level in crate::models::simd::available() {
            let got = crate::models::simd::with_level(level, || {
                decode_attention(&q, &k, &v, Some(&mask), Some(&[2, 0]), scale).unwrap()
            });
            assert_eq!(got.dims(), [b, 1, g * r * hd]);
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-5, "{level:?}: {diff}");
            outputs.push(got.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
        assert!(outputs.windows(2).all(|w| w[0] == w[1]));

        // Row 0 alone, its cache starting after the padding.
        let alone = decode_attention(
            &q.narrow(0, 0, 1).unwrap(),
            &k.narrow(0, 0, 1).unwrap().narrow(2, 2, s - 2).unwrap(),
            &v.narrow(0, 0, 1).unwrap().narrow(2, 2, s - 2).unwrap(),
            None,
            None,
            scale,
        )
        .unwrap();
        let batched = decode_attention(&q, &k, &v, Some(&mask), Some(&[2, 0]), scale).unwrap();
        assert_eq!(
            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            batched
                .narrow(0, 0, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );

        // A longer cache splits the heads across threads: the same values.
        let (cap, s) = (400, 390);
        let kbuf = seeded_randn(1005, 1.0, (1, g, cap, hd), DType::F32);
        let vbuf = seeded_randn(1006, 1.0, (1, g, cap, hd), DType::F32);
        let (k, v) = (kbuf.narrow(2, 0, s).unwrap(), vbuf.narrow(2, 0, s).unwrap());
        let q = q.narrow(0, 1, 1).unwrap();
        let want = candle_nn::ops::softmax(
            &(q.matmul(&k.contiguous().unwrap().t().unwrap()).unwrap() * scale).unwrap(),
            D::Minus1,
        )
        .unwrap()
        .matmul(&v.contiguous().unwrap())
        .unwrap()
        .reshape((1, 1, g * r * hd))
        .unwrap();
        let got = decode_attention(&q, &k, &v, None, None, scale).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5);
        // Shapes that disagree are an error, not a panic.
        assert!(decode_attention(&q, &k.narrow(3, 0, 8).unwrap(), &v, None, None, scale).is_err());
    }

    /// The largest |a - b| over the elements (any float dtype), for the kernels' tests.
    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// GELU written over its input gives the values of the one that allocates.
    #[test]
    fn gelu_in_place_equals_gelu() {
        let x = seeded_randn(1007, 3.0, (3, 40_000), DType::F32);
        // Both at one pinned level: the vector paths multiply-add in one rounding and the
        // portable one in two, so a test forcing another level meanwhile would change one
        // side's rounding (this test failed that way in a full run).
        for level in crate::models::simd::available() {
            let (want, got) = crate::models::simd::with_level(level, || {
                (
                    gelu_erf_inference(&x).unwrap(),
                    gelu_erf_inference_owned(x.copy().unwrap()).unwrap(),
                )
            });
            assert_eq!(
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{level:?}"
            );
        }
    }

    /// Blocked attention equals softmax(q k^T scale) v with the heads joined, for query
    /// counts that are not a multiple of the block and keys of another length.
    #[test]
    fn blocked_attention_matches_composed_attention() {
        let (b, h, tq, tk, hd) = (2, 3, 130, 77, 8);
        let q = seeded_randn(1008, 1.0, (b, h, tq, hd), DType::F32);
        let k = seeded_randn(1009, 1.0, (b, h, tk, hd), DType::F32);
        let v = seeded_randn(1010, 1.0, (b, h, tk, hd), DType::F32);
        let scale = 0.35;
        // The heads side by side, as the projections give them.
        let join = |x: &Tensor| {
            let t = x.dim(2).unwrap();
            x.transpose(1, 2).unwrap().reshape((b, t, h * hd)).unwrap()
        };
        let got = attention_inference(&join(&q), &join(&k), &join(&v), h, scale).unwrap();
        assert_eq!(got.dims(), &[b, tq, h * hd]);
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let want = probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, tq, h * hd))
            .unwrap();
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-5, "max difference {diff}");
    }

    #[test]
    fn blocked_attention_gives_nan_rows_for_non_finite_scores_only() {
        // A query row with an infinite entry has no softmax (its max is not finite): its
        // outputs are NaN in every head it touches, the other rows are untouched.
        let dev = Device::Cpu;
        let (tq, tk, width, heads) = (100, 30, 16, 2);
        let mut qv: Vec<f32> = (0..tq * width)
            .map(|i| ((i * 37 % 11) as f32) / 11.0)
            .collect();
        qv[5 * width + 1] = f32::INFINITY; // row 5, head 0
        let q = Tensor::from_vec(qv, (1, tq, width), &dev).unwrap();
        let k = seeded_randn(1011, 1.0, (1, tk, width), DType::F32);
        let v = seeded_randn(1012, 1.0, (1, tk, width), DType::F32);
        let got = attention_inference(&q, &k, &v, heads, 0.5).unwrap();
        let got: Vec<Vec<f32>> = got.squeeze(0).unwrap().to_vec2().unwrap();
        for (r, row) in got.iter().enumerate() {
            let (head0, head1) = row.split_at(width / heads);
            assert_eq!(
                head0.iter().all(|x| x.is_nan()),
                r == 5,
                "row {r}: {head0:?}"
            );
            assert!(head0.iter().all(|x| x.is_nan()) || head0.iter().all(|x| x.is_finite()));
            assert!(head1.iter().all(|x| x.is_finite()), "row {r}: {head1:?}");
        }
        // No keys at all: every output is an empty sum.
        let none = Tensor::zeros((1, 0, width), DType::F32, &dev).unwrap();
        let got = attention_inference(&q, &none, &none, heads, 0.5).unwrap();
        assert_eq!(got.dims(), &[1, tq, width]);
        assert_eq!(max_abs_diff(&got, &got.zeros_like().unwrap()), 0.0);
    }

    #[test]
    fn im2col_then_a_product_is_candle_s_conv1d() {
        // The encoder's stem on the CPU: a convolution as im2col rows times the weight laid
        // out (C_out, taps * C_in), against candle's conv1d, for Whisper's two settings and
        // lengths whose last window reaches into the padding.
        let dev = Device::Cpu;
        let (b, c_in, c_out, taps) = (2, 5, 4, 3);
        for (len, stride) in [(11, 1), (11, 2), (12, 2), (3, 2)] {
            let x = seeded_randn(1013, 1.0, (b, c_in, len), DType::F32);
            let w = seeded_randn(1014, 1.0, (c_out, c_in, taps), DType::F32);
            let want = x
                .conv1d(&w, 1, stride, 1, 1)
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            let rows = im2col_channels_last(&x.transpose(1, 2).unwrap(), taps, stride, 1).unwrap();
            let w2 = w
                .permute((0, 2, 1))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((c_out, taps * c_in))
                .unwrap();
            let got = rows.broadcast_matmul(&w2.t().unwrap()).unwrap();
            assert_eq!(got.dims(), want.dims(), "len {len} stride {stride}");
            let diff = max_abs_diff(&got, &want);
            assert!(
                diff < 1e-5,
                "len {len} stride {stride}: max difference {diff}"
            );
        }
        let x = Tensor::zeros((1, 2, 4), DType::F32, &dev).unwrap();
        assert!(im2col_channels_last(&x, 0, 1, 1).is_err());
        assert!(im2col_channels_last(&x, 3, 0, 1).is_err());
        assert!(im2col_channels_last(&x, 9, 1, 1).is_err());
    }

    /// Fused and composed forms agree in value and in gradient (f64).
    #[test]
    fn fused_ops_match_composed_ops() {
        let dev = Device::Cpu;
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = max_abs_diff(a, b);
            assert!(d < 1e-10, "{what}: max difference {d}");
        };
        let x = Var::from_tensor(&seeded_randn(1015, 1.0, (2, 3, 5, 8), DType::F64)).unwrap();
        let probe = seeded_randn(1016, 1.0, (2, 3, 5, 8), DType::F64);
        // Gradients of <y, probe>: a random direction through the op's backward.
        let grads = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();

        // RMSNorm.
        let w = seeded_randn(1017, 1.0, 8, DType::F64);
        let fused = rms_norm(&x, &Gain::new(&w).unwrap(), 1e-5).unwrap();
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let composed = x
            .broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w)
            .unwrap();
        close(&fused, &composed, "rms-norm value");
        let gf = grads(&fused);
        let gc = grads(&composed);
        close(
            gf.get(&x).unwrap(),
            gc.get(&x).unwrap(),
            "rms-norm gradient",
        );

        // Rotary, both layouts, per-row tables.
        let cos = seeded_randn(1018, 1.0, (2, 1, 5, 4), DType::F64);
        let sin = seeded_randn(1019, 1.0, (2, 1, 5, 4), DType::F64);
        for interleaved in [false, true] {
            let fused = RopeTables::new(&cos, &sin, interleaved)
                .unwrap()
                .apply(&x)
                .unwrap();
            let (b, h, t, d) = (2, 3, 5, 8);
            let composed = if interleaved {
                let c = cos.unsqueeze(D::Minus1).unwrap();
                let s = sin.unsqueeze(D::Minus1).unwrap();
                let xr = x.reshape((b, h, t, d / 2, 2)).unwrap();
                let x0 = xr.narrow(D::Minus1, 0, 1).unwrap();
                let x1 = xr.narrow(D::Minus1, 1, 1).unwrap();
                let y0 = (x0.broadcast_mul(&c).unwrap() - x1.broadcast_mul(&s).unwrap()).unwrap();
                let y1 = (x0.broadcast_mul(&s).unwrap() + x1.broadcast_mul(&c).unwrap()).unwrap();
                Tensor::cat(&[y0, y1], D::Minus1)
                    .unwrap()
                    .flatten_from(D::Minus2)
                    .unwrap()
            } else {
                let c = Tensor::cat(&[&cos, &cos], D::Minus1).unwrap();
                let s = Tensor::cat(&[&sin, &sin], D::Minus1).unwrap();
                let x1 = x.narrow(D::Minus1, 0, d / 2).unwrap();
                let x2 = x.narrow(D::Minus1, d / 2, d / 2).unwrap();
                let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
                (x.broadcast_mul(&c).unwrap() + rot.broadcast_mul(&s).unwrap()).unwrap()
            };
            close(&fused, &composed, "rope value");
            let gf = grads(&fused);
            let gc = grads(&composed);
            close(gf.get(&x).unwrap(), gc.get(&x).unwrap(), "rope gradient");
        }

        // Masked softmax: a causal mask on (B=2, G=3, T=5, S=8) with 3 cached keys.
        let mut m = vec![0f64; 5 * 8];
        for i in 0..5 {
            for j in 0..8 {
                if j > i + 3 {
                    m[i * 8 + j] = f64::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(m, (1, 1, 1, 5, 8), &dev).unwrap();
        let fused = masked_softmax(&x, 0.5, Some(&SoftmaxMask::new(&mask).unwrap()), 5).unwrap();
        let composed = candle_nn::ops::softmax(
            &(x.as_tensor() * 0.5)
                .unwrap()
                .reshape((2, 3, 1, 5, 8))
                .unwrap()
                .broadcast_add(&mask)
                .unwrap()
                .reshape((2, 3, 5, 8))
                .unwrap(),
            D::Minus1,
        )
        .unwrap();
        close(&fused, &composed, "softmax value");
        let gf = grads(&fused);
        let gc = grads(&composed);
        close(gf.get(&x).unwrap(), gc.get(&x).unwrap(), "softmax gradient");

        // SwiGLU of the packed [gate | up] (2, 3, 5, 16) -> (2, 3, 5, 8).
        let u = Var::from_tensor(&seeded_randn(1020, 1.0, (2, 3, 5, 8), DType::F64)).unwrap();
        let packed = Tensor::cat(&[x.as_tensor(), u.as_tensor()], D::Minus1).unwrap();
        let fused = swiglu(&packed).unwrap();
        let composed = (x.silu().unwrap() * u.as_tensor()).unwrap();
        close(&fused, &composed, "swiglu value");
        let gf = grads(&fused);
        let gc = grads(&composed);
        close(
            gf.get(&x).unwrap(),
            gc.get(&x).unwrap(),
            "swiglu gate gradient",
        );
        close(
            gf.get(&u).unwrap(),
            gc.get(&u).unwrap(),
            "swiglu up gradient",
        );
        assert!(swiglu(&Tensor::zeros((2, 7), DType::F64, &dev).unwrap()).is_err());

        // Cross-entropy rows against candle_nn's (mean) cross-entropy.
        let logits = Var::from_tensor(&seeded_randn(1021, 3.0, (4, 11), DType::F64)).unwrap();
        let targets = [3u32, 0, 10, 3];
        let fused = cross_entropy_rows(&logits, &targets)
            .unwrap()
            .mean_all()
            .unwrap();
        let composed =
            candle_nn::loss::cross_entropy(&logits, &Tensor::new(&targets[..], &dev).unwrap())
                .unwrap();
        close(&fused, &composed, "cross-entropy value");
        let gf = fused.backward().unwrap();
        let gc = composed.backward().unwrap();
        close(
            gf.get(&logits).unwrap(),
            gc.get(&logits).unwrap(),
            "cross-entropy gradient",
        );
        assert!(cross_entropy_rows(&logits, &[0, 1, 11, 2]).is_err());
    }

    #[test]
    fn fast_exp_and_erf_match_std() {
        // Both roundings: the portable build's (exp_f32, erf_f32) and the vector builds'.
        type Approx = fn(f32) -> f32;
        let kinds: [(&str, Approx, Approx); 2] = [
            ("unfused", exp_f32, erf_f32),
            ("fused", exp_with::<Fused>, erf_with::<Fused>),
        ];
        for (kind, exp, erf) in kinds {
            let (mut worst_exp, mut worst_erf) = (0f64, 0f64);
            let mut x = -87.0f32;
            while x < 88.0 {
                let exact = (x as f64).exp();
                worst_exp = worst_exp.max(((exp(x) as f64) - exact).abs() / exact);
                x += 0.0137;
            }
            let mut x = -6.0f32;
            while x < 6.0 {
                let exact = libm_erf(x as f64);
                worst_erf = worst_erf.max(((erf(x) as f64) - exact).abs());
                x += 0.0011;
            }
            assert!(
                worst_exp < 3e-7,
                "{kind} exp: worst relative error {worst_exp}"
            );
            assert!(
                worst_erf < 4e-7,
                "{kind} erf: worst absolute error {worst_erf}"
            );
            assert!(exp(f32::NEG_INFINITY) < 1e-37, "{kind}");
            assert!(erf(f32::NAN).is_nan(), "{kind}");
        }
    }

    /// erf by its Taylor series / continued fraction in f64 (a reference independent of the
    /// approximation under test).
    fn libm_erf(x: f64) -> f64 {
        // Series: erf x = 2/sqrt(pi) sum (-1)^n x^(2n+1) / (n! (2n+1)); converges for |x| <= 6
        // in f64 with enough terms when summed with compensation; beyond 3 use 1 - erfc via
        // the continued fraction.
        if x.abs() < 3.0 {
            let (mut term, mut sum, mut n) = (x, x, 0.0);
            while term.abs() > 1e-18 * sum.abs().max(1e-300) {
                n += 1.0;
                term *= -x * x / n;
                sum += term / (2.0 * n + 1.0);
            }
            2.0 / std::f64::consts::PI.sqrt() * sum
        } else {
            let a = x.abs();
            let mut f = a;
            for k in (1..60).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            let erfc = (-a * a).exp() / (std::f64::consts::PI.sqrt() * f);
            (1.0 - erfc).copysign(x)
        }
    }

    #[test]
    fn fast_softmax_and_gelu_match_candle() {
        let close = |a: &Tensor, b: &Tensor, tol: f32, what: &str| {
            let d = max_abs_diff(a, b);
            assert!(d < tol as f64, "{what}: max difference {d}");
        };
        // Widths that reach each part of the row loop: under 8, 32-wide chunks with a tail
        // of eights and singles (50 = 32 + 2 x 8 + 2), and the encoder's 1500 (46 x 32 + 3 x 8 + 4).
        for width in [7, 50, 1500] {
            let x = (seeded_randn(1022, 4.0, (3, 5, width), DType::F32))
                .contiguous()
                .unwrap();
            for level in crate::models::simd::available() {
                crate::models::simd::with_level(level, || {
                    close(
                        &softmax_last_dim_inference(&x).unwrap(),
                        &candle_nn::ops::softmax_last_dim(&x).unwrap(),
                        1e-6,
                        &format!("softmax, width {width}, {level:?}"),
                    );
                    close(
                        &gelu_erf_inference(&x).unwrap(),
                        &x.gelu_erf().unwrap(),
                        2e-6,
                        &format!("gelu, width {width}, {level:?}"),
                    );
                });
            }
        }
        // A NaN stays visible; rows with a NaN, a +inf or nothing but -inf come out all NaN,
        // as std's (v - max).exp() / sum makes them, at every level and at every position.
        let inf = f32::INFINITY;
        for level in crate::models::simd::available() {
            for width in [3usize, 45] {
                for at in [0, width / 2, width - 1] {
                    for bad in [f32::NAN, inf] {
                        let mut row = vec![0.5f32; width];
                        row[at] = bad;
                        let mut out = vec![0f32; width];
                        crate::models::simd::with_level(level, || softmax_row(&mut out, &row));
                        assert!(
                            out.iter().all(|v| v.is_nan()),
                            "{level:?}: {bad} at {at} of {width}: {out:?}"
                        );
                    }
                }
                let row = vec![-inf; width];
                let mut out = vec![0f32; width];
                crate::models::simd::with_level(level, || softmax_row(&mut out, &row));
                assert!(out.iter().all(|v| v.is_nan()), "{level:?}: all -inf");
            }
        }
    }
}
