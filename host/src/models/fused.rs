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

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
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
    let mut out = vec![T::default(); x.len()];
    out.par_chunks_exact_mut(d)
        .zip(x.par_chunks_exact(d))
        .with_min_len(rows_per_task(d))
        .for_each(|(dst, row)| {
            let ms = row.iter().map(|v| v.d() * v.d()).sum::<f64>() / d as f64;
            let r = T::f(1.0 / (ms + eps).sqrt());
            for ((o, &v), &g) in dst.iter_mut().zip(row).zip(w) {
                *o = v.mul(r).mul(T::f(g));
            }
        });
    out
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
        // r = 1/sqrt(mean(x^2)+eps), xh = x r, gw = g w: dx = r (gw - xh mean(gw xh)).
        let w =
            Tensor::from_iter(self.weight.0.iter().copied(), x.device())?.to_dtype(x.dtype())?;
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xh = x.broadcast_mul(&r)?;
        let gw = grad.broadcast_mul(&w)?;
        let dot = (&gw * &xh)?.mean_keepdim(D::Minus1)?;
        Ok(Some((gw - xh.broadcast_mul(&dot)?)?.broadcast_mul(&r)?))
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
        if dims.len() != 4 || dims[3] % 2 != 0 {
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
        let mut out = vec![T::default(); x.len()];
        let scale = T::f(self.scale);
        // In the input's precision, as candle's own softmax computes it.
        out.par_chunks_exact_mut(s)
            .zip(x.par_chunks_exact(s))
            .enumerate()
            .with_min_len(rows_per_task(s))
            .for_each(|(r, (dst, row))| {
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
            });
        out
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
        // dx = scale * y * (g - sum(g y)).
        let dot = (grad * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some(
            (grad.broadcast_sub(&dot)? * y)?.affine(self.scale, 0.0)?,
        ))
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
// SwiGLU: silu(gate) * up.

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("fused-swiglu: {:?} vs {:?}", l1.dims(), l2.dims());
        }
        fn run<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
            g.par_iter()
                .zip(u.par_iter())
                .with_min_len(PAR_MIN)
                .map(|(&g, &u)| {
                    // silu(g) = g / (1 + exp(-g)), in the input's precision.
                    let one = T::f(1.0);
                    g.div(one.add(T::f(0.0).sub(g).exp())).mul(u)
                })
                .collect()
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => CpuStorage::F32(run(
                contiguous(g, l1, "fused-swiglu")?,
                contiguous(u, l2, "fused-swiglu")?,
            )),
            (CpuStorage::F64(g), CpuStorage::F64(u)) => CpuStorage::F64(run(
                contiguous(g, l1, "fused-swiglu")?,
                contiguous(u, l2, "fused-swiglu")?,
            )),
            _ => candle_core::bail!("fused-swiglu: f32 or f64 only, same dtype"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // s = sigmoid(g): d/dg = u s (1 + g (1 - s)), d/du = g s.
        let s = (gate.neg()?.exp()? + 1.0)?.recip()?;
        let silu = (gate * &s)?;
        let ds = ((gate * (1.0 - &s)?)? + 1.0)?;
        let dg = (((grad * up)? * &s)? * ds)?;
        let du = (grad * silu)?;
        Ok((Some(dg), Some(du)))
    }
}

/// silu(gate) * up, elementwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Fused and composed forms agree in value and in gradient (f64).
    #[test]
    fn fused_ops_match_composed_ops() {
        let dev = Device::Cpu;
        let close = |a: &Tensor, b: &Tensor, what: &str| {
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            let d = d.to_scalar::<f64>().unwrap();
            assert!(d < 1e-10, "{what}: max difference {d}");
        };
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 5, 8), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f64, 1.0, (2, 3, 5, 8), &dev).unwrap();
        // Gradients of <y, probe>: a random direction through the op's backward.
        let grads = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();

        // RMSNorm.
        let w = Tensor::randn(0f64, 1.0, 8, &dev).unwrap();
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
        let cos = Tensor::randn(0f64, 1.0, (2, 1, 5, 4), &dev).unwrap();
        let sin = Tensor::randn(0f64, 1.0, (2, 1, 5, 4), &dev).unwrap();
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

        // SwiGLU.
        let u = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 5, 8), &dev).unwrap()).unwrap();
        let fused = swiglu(&x, &u).unwrap();
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
    }
}
