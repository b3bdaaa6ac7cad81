//! A linear layer over a frozen weight whose backward pass computes only the input gradient.
//!
//! candle's `matmul` backward always computes and stores the right-hand operand's gradient,
//! even for a constant weight: for a frozen LLM that is one weight-sized tensor per projection
//! held in the GradStore (for 7B in bf16, ~14 GB) and roughly double the backward matmul work.
//! Here the weight is hidden inside a custom op whose backward returns `None` for it.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use rayon::prelude::*;

use super::packed::{PackedMatrix, PackedProduct};

/// Products with at most this many rows (one decoded token per sequence of a batch) read
/// the packed blocks when there are some; with more rows gemm reuses each f32 weight across
/// the rows. The packed kernels compute each row on its own, so a decode step of up to this
/// many rows gives every row exactly what it gets alone (gemm rounds a row differently
/// when the row count changes): a server's batch sizes stay within it. 16 rather than 4
/// left batch-16 captioning unchanged (1.17 vs 1.16 clips/s in `bench_caption.sh`: its
/// prompts, not its decode steps, take most of the time).
pub const PACKED_MAX_ROWS: usize = 16;

/// y = x W^T (+ b) with W frozen: (.., in) -> (.., out).
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    /// (out, in)
    weight: Tensor,
    /// The (in, out) view the matmul actually consumes: made once so that it is the same
    /// graph node every call (a gradient for it would be keyed on this id).
    weight_t: Tensor,
    bias: Option<Tensor>,
    /// Plain candle matmul instead of the custom op (for the memory benchmark's baseline).
    plain: bool,
    /// The weight in the GGUF blocks it was stored in, for few-row products on the CPU.
    packed: Option<Arc<PackedMatrix>>,
    /// The bias's values on the host, for [`FrozenLinear::forward_plus`]'s fused path (CPU
    /// f32 biases only).
    bias_values: Option<Arc<[f32]>>,
}

impl FrozenLinear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        let weight_t = weight.t().expect("a linear weight is 2-D");
        let bias_values = bias
            .as_ref()
            .filter(|b| b.device().is_cpu() && b.dtype() == DType::F32 && b.rank() == 1)
            .and_then(|b| b.to_vec1::<f32>().ok())
            .map(Arc::from);
        Self {
            weight,
            weight_t,
            bias,
            plain: false,
            packed: None,
            bias_values,
        }
    }

    /// Few-row products (decoding) read `packed`, the same weight in GGUF blocks.
    pub fn with_packed(mut self, packed: Option<Arc<PackedMatrix>>) -> Self {
        self.packed = packed.filter(|p| {
            let (r, c) = p.dims();
            self.weight.dims() == [r, c]
                && self.weight.device().is_cpu()
                && self.weight.dtype() == DType::F32
        });
        self
    }

    /// Whether few-row products read packed blocks.
    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// Same values, but through candle's stock matmul (keeps weight gradients).
    pub fn with_stock_backward(mut self) -> Self {
        self.plain = true;
        self
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The right-hand operand of the matmul (a view of the weight).
    pub fn matmul_operand(&self) -> &Tensor {
        &self.weight_t
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (in_dim, lead) = match dims.split_last() {
            Some((&k, lead)) => (k, lead.to_vec()),
            None => candle_core::bail!("FrozenLinear needs at least one dimension"),
        };
        let out_dim = self.weight.dim(0)?;
        if self.weight.rank() != 2 || self.weight.dim(1)? != in_dim {
            candle_core::bail!(
                "FrozenLinear: input width {in_dim}, weight {:?}",
                self.weight.dims()
            );
        }
        let x2 = x.reshape(((), in_dim))?;
        let few_rows = x2.dim(0)? <= PACKED_MAX_ROWS;
        let y = if let Some(p) = self.packed.as_ref().filter(|_| few_rows && !x2.track_op()) {
            // No gradient wanted (inference, or a taped layer whose backward uses `weight`).
            // The weight is f32 (`with_packed`), so is a valid input.
            x2.contiguous()?.apply_op1_no_bwd(&PackedProduct(p))?
        } else if let Some(b) = self
            .bias
            .as_ref()
            .filter(|_| !self.plain && !x2.track_op() && self.biased_product_applies())
        {
            // Inference on the CPU in f32: the bias is the product's starting value, which
            // saves zeroing the output and a second pass to add the bias.
            x2.contiguous()?.apply_op3_no_bwd(
                &self.weight,
                b,
                &BiasedProduct {
                    residual_bias: None,
                },
            )?
        } else {
            let y = if self.plain {
                x2.matmul(&self.weight_t)?
            } else {
                x2.contiguous()?.apply_op2(&self.weight_t, FrozenMatmul)?
            };
            match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        };
        let mut out_shape = lead;
        out_shape.push(out_dim);
        y.reshape(out_shape)
    }
}

impl FrozenLinear {
    /// `residual + self.forward(x)` (a residual connection after the layer). For inference
    /// on the CPU in f32 with a bias, the residual plus the bias is the product's starting
    /// value: no separate pass (and tensor) for the addition. The same values either way up
    /// to rounding (the order of the three additions differs).
    pub fn forward_plus(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        // The residual has x's shape with the layer's output width last.
        let shapes_fit = x.dims().split_last().is_some_and(|(&k, lead)| {
            k == in_dim && residual.dims() == [lead, &[out_dim]].concat().as_slice()
        });
        let fused = self.bias_values.as_ref().filter(|_| {
            shapes_fit
                && !self.plain
                && !x.track_op()
                && !residual.track_op()
                && self.biased_product_applies()
                && residual.device().is_cpu()
                && residual.dtype() == DType::F32
        });
        let Some(bias) = fused else {
            return self.forward(x)? + residual;
        };
        let x2 = x.reshape(((), in_dim))?.contiguous()?;
        let r2 = residual.reshape(((), out_dim))?.contiguous()?;
        let y = x2.apply_op3_no_bwd(
            &self.weight,
            &r2,
            &BiasedProduct {
                residual_bias: Some(bias.clone()),
            },
        )?;
        y.reshape(residual.dims())
    }

    /// Whether [`BiasedProduct`] can run this layer: CPU f32 weight and bias, contiguous.
    fn biased_product_applies(&self) -> bool {
        self.weight.device().is_cpu()
            && self.weight.dtype() == DType::F32
            && self.weight.is_contiguous()
            && self
                .bias
                .as_ref()
                .is_some_and(|b| b.dtype() == DType::F32 && b.is_contiguous())
    }
}

/// x (m, k) W^T + b for W (n, k) and b (n), f32 on the CPU, no graph: the output starts as
/// b in every row and gemm adds the product into it. With `residual_bias`, the third input is
/// an (m, n) residual instead of the bias, and the output starts as residual + bias.
struct BiasedProduct {
    residual_bias: Option<Arc<[f32]>>,
}

impl CustomOp3 for BiasedProduct {
    fn name(&self) -> &'static str {
        "biased-product"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = lx.shape().dims2()?;
        let (n, k2) = lw.shape().dims2()?;
        let start_dims: &[usize] = match &self.residual_bias {
            Some(b) if b.len() == n => &[m, n],
            Some(_) => &[],
            None => &[n],
        };
        if k != k2 || lb.dims() != start_dims {
            candle_core::bail!(
                "biased-product: x {:?}, weight {:?}, bias or residual {:?}",
                lx.dims(),
                lw.dims(),
                lb.dims()
            );
        }
        use super::fused::contiguous_f32 as slice;
        let (x, w, start) = (
            slice(sx, lx, "biased-product")?,
            slice(sw, lw, "biased-product")?,
            slice(sb, lb, "biased-product")?,
        );
        // The starting rows, written by all threads (`b.repeat(m)` was one thread's memcpy,
        // ~3% of an encoder window while the other cores waited).
        let mut out = Vec::with_capacity(m * n);
        if n > 0 {
            out.spare_capacity_mut()
                .par_chunks_mut(n)
                .enumerate()
                .with_min_len((1 << 15) / n + 1)
                .for_each(|(r, row)| match &self.residual_bias {
                    Some(bias) => {
                        let residual = &start[r * n..(r + 1) * n];
                        for ((d, &v), &b) in row.iter_mut().zip(residual).zip(bias.iter()) {
                            d.write(v + b);
                        }
                    }
                    None => {
                        for (d, &v) in row.iter_mut().zip(start) {
                            d.write(v);
                        }
                    }
                });
        }
        // SAFETY: each of the m rows of n elements was written above.
        unsafe { out.set_len(m * n) };
        let mut out: Vec<f32> = out;
        if m * n * k > 0 {
            let threads = rayon::current_num_threads();
            // SAFETY: x is (m, k) row-major, w (n, k) row-major read as its transpose
            // (k, n), out (m, n) row-major holding the bias (read: read_dst), all in bounds.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    true,
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr(),
                    k as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    if threads > 1 && m * n * k >= 1 << 15 {
                        gemm::Parallelism::Rayon(threads)
                    } else {
                        gemm::Parallelism::None
                    },
                )
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

/// x (m, k) @ wt (k, n) where wt is a (transposed) view of the frozen weight.
struct FrozenMatmul;

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (k2, n) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-matmul: inner dims differ ({k} vs {k2})");
        }
        let out = s1.matmul(s2, (1, m, n, k), l1, l2)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (_, n) = l2.shape().dims2()?;
        let out = s1.matmul(s2, (1, m, n, k), l1, l2)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        wt: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // d/dx (x Wt) = grad Wt^T; the weight gets nothing.
        Ok((Some(grad_res.matmul(&wt.t()?)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::fused::tests::seeded_randn;
    use candle_core::{Device, Var};

    /// Inference with a bias (the product started from the bias) gives candle's
    /// x W^T + b; with a gradient wanted, the graph path is taken and the input gets its
    /// gradient.
    #[test]
    fn biased_product_equals_matmul_plus_bias() {
        let w = seeded_randn(2001, 1.0, (24, 40), DType::F32);
        let b = seeded_randn(2002, 1.0, 24, DType::F32);
        let layer = FrozenLinear::new(w.clone(), Some(b.clone()));
        let x = seeded_randn(2003, 1.0, (2, 9, 40), DType::F32);
        let want = x
            .broadcast_matmul(&w.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        use crate::models::fused::tests::max_abs_diff as max_diff;
        let got = layer.forward(&x).unwrap();
        assert_eq!(got.dims(), &[2, 9, 24]);
        assert!(max_diff(&got, &want) < 1e-4);
        let xv = Var::from_tensor(&x).unwrap();
        let y = layer.forward(xv.as_tensor()).unwrap();
        assert!(max_diff(&y, &want) < 1e-4);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(xv.as_tensor()).is_some(),
            "the input got no gradient"
        );
    }

    /// `forward_plus` is residual + x W^T + b on every path: the fused one (inference, CPU
    /// f32, a bias), a layer without a bias, a taped input, and a residual of another shape
    /// (refused by the addition, as `forward(x) + residual` refuses it).
    #[test]
    fn forward_plus_adds_the_residual() {
        use crate::models::fused::tests::max_abs_diff as max_diff;
        let dev = Device::Cpu;
        let w = seeded_randn(2004, 1.0, (24, 40), DType::F32);
        let b = seeded_randn(2005, 1.0, 24, DType::F32);
        let x = seeded_randn(2006, 1.0, (2, 9, 40), DType::F32);
        let residual = seeded_randn(2007, 1.0, (2, 9, 24), DType::F32);
        let product = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        for bias in [Some(b.clone()), None] {
            let layer = FrozenLinear::new(w.clone(), bias.clone());
            let want = match &bias {
                Some(b) => product.broadcast_add(b).unwrap(),
                None => product.clone(),
            };
            let want = (want + &residual).unwrap();
            let got = layer.forward_plus(&x, &residual).unwrap();
            assert_eq!(got.dims(), &[2, 9, 24]);
            assert!(max_diff(&got, &want) < 1e-4, "bias {}", bias.is_some());
            let xv = Var::from_tensor(&x).unwrap();
            let taped = layer.forward_plus(xv.as_tensor(), &residual).unwrap();
            assert!(max_diff(&taped, &want) < 1e-4);
            let grads = taped.sum_all().unwrap().backward().unwrap();
            assert!(grads.get(xv.as_tensor()).is_some());
        }
        let layer = FrozenLinear::new(w, Some(b));
        let wrong = Tensor::zeros((2, 8, 24), DType::F32, &dev).unwrap();
        assert!(layer.forward_plus(&x, &wrong).is_err());
    }
}
