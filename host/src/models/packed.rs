//! Frozen weights kept in the GGUF block formats they were stored in (Q4_0, Q4_1, Q8_0), for
//! products with a few rows: decoding one token reads every weight once, and the f32 copy of
//! a Q4_1 matrix is 6.4x its bytes, so a decode step spends its time reading memory.
//!
//! Each block is expanded to f32 inside the dot product and the activations stay f32
//! (llama.cpp instead rounds them to 8 bits), so a product equals the one with the
//! dequantized f32 matrix up to the order of f32 rounding. At load the blocks are split into
//! three arrays (scales and offsets widened to f32, the integer weights as stored): the
//! kernels then broadcast a scale from memory instead of converting f16 per block, and the
//! offset term of a row is one vectorised dot product with the input's block sums instead of
//! a scalar multiply-add per block (8-13% less time a block on the AVX2 kernel, for 20% more
//! bytes: the kernel is compute-bound; `bench_models packed`, figures in BENCHMARKS.md). Products with many rows (prompts,
//! training) use the dequantized matrix, which the gemm kernels read at full speed.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use half::f16;
use rayon::prelude::*;

/// Weights per block in every supported format.
const BLOCK: usize = 32;

/// Weights below which a product runs on the calling thread. Every projection of SmolLM2
/// is above it: split across 2 threads, decoding ran at 96-101 tok/s against 82-85 with
/// only products of >= 1M weights split (`bench_models llm`, run on the compute pool).
const PAR_MIN_WEIGHTS: usize = 1 << 15;

/// Weights per parallel task (whole output rows; small tasks keep the threads balanced,
/// 4x larger ones measured the same).
const TASK_WEIGHTS: usize = 1 << 13;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// f16 scale d, 16 bytes of 4-bit q: w = d (q - 8).
    Q4_0,
    /// f16 scale d and minimum m, 16 bytes of 4-bit q: w = d q + m.
    Q4_1,
    /// f16 scale d, 32 signed bytes q: w = d q.
    Q8_0,
}

impl BlockFormat {
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes of a block's integer weights (without its scale and offset).
    fn quant_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => BLOCK / 2,
            Self::Q8_0 => BLOCK,
        }
    }

    /// Bytes of one block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// A block's 32 integer weights q as f32, from its stored bytes.
fn quants_f32(format: BlockFormat, qs: &[u8]) -> [f32; BLOCK] {
    let mut q = [0f32; BLOCK];
    match format {
        BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
            for (j, &b) in qs.iter().enumerate() {
                q[j] = (b & 0x0F) as f32;
                q[j + BLOCK / 2] = (b >> 4) as f32;
            }
        }
        BlockFormat::Q8_0 => {
            for (v, &b) in q.iter_mut().zip(qs) {
                *v = b as i8 as f32;
            }
        }
    }
    q
}

/// A (rows, cols) weight matrix as whole rows of blocks, row-major, each block split into
/// its parts (block i of the matrix is `scales[i]`, `offsets[i]`, `quants[i * qb..]`).
#[derive(Debug, Clone, PartialEq)]
pub struct PackedMatrix {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    /// Each block's scale d, widened from f16 (exact).
    scales: Vec<f32>,
    /// Each block's offset per unit of its input sum (w = d q + offset): Q4_1's m, Q4_0's
    /// -8 d (exact); empty for Q8_0, which has none.
    offsets: Vec<f32>,
    /// Each block's integer weights as the file stores them: 16 bytes of nibbles (byte j
    /// holds weight j low and j + 16 high) or 32 signed bytes.
    quants: Vec<u8>,
}

/// One weight row's parts.
#[derive(Clone, Copy)]
struct Row<'a> {
    scales: &'a [f32],
    /// Empty when the format has no offsets.
    offsets: &'a [f32],
    quants: &'a [u8],
}

impl PackedMatrix {
    /// `Some` for a 2-D tensor in a supported format whose rows are whole blocks.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let Some(format) = BlockFormat::from_ggml(q.dtype()) else {
            return Ok(None);
        };
        let Ok((rows, cols)) = q.shape().dims2() else {
            return Ok(None);
        };
        if cols % BLOCK != 0 {
            return Ok(None);
        }
        Self::from_bytes(format, rows, cols, q.data()?.into_owned()).map(Some)
    }

    pub fn from_bytes(
        format: BlockFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self> {
        let want = rows * (cols / BLOCK) * format.block_bytes();
        if !cols.is_multiple_of(BLOCK) || data.len() != want {
            candle_core::bail!(
                "packed {format:?} matrix ({rows}, {cols}) needs {want} bytes, got {}",
                data.len()
            );
        }
        let blocks = data.len() / format.block_bytes();
        let mut scales = Vec::with_capacity(blocks);
        let mut offsets = Vec::with_capacity(if format == BlockFormat::Q8_0 {
            0
        } else {
            blocks
        });
        let mut quants = Vec::with_capacity(blocks * format.quant_bytes());
        let half = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        for block in data.chunks_exact(format.block_bytes()) {
            let d = half(block, 0);
            scales.push(d);
            match format {
                BlockFormat::Q4_0 => offsets.push(-8.0 * d),
                BlockFormat::Q4_1 => offsets.push(half(block, 2)),
                BlockFormat::Q8_0 => {}
            }
            quants.extend_from_slice(&block[block.len() - format.quant_bytes()..]);
        }
        Ok(Self {
            format,
            rows,
            cols,
            scales,
            offsets,
            quants,
        })
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The rows of `parts` one after another (stacked projections); `None` unless every
    /// part has the same format and width.
    pub fn stack(parts: &[&PackedMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.format != first.format || p.cols != first.cols)
        {
            return None;
        }
        let joined = |part: fn(&PackedMatrix) -> &[f32]| -> Vec<f32> {
            parts.iter().flat_map(|p| part(p).iter().copied()).collect()
        };
        Some(Self {
            format: first.format,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            scales: joined(|p| &p.scales),
            offsets: joined(|p| &p.offsets),
            quants: parts
                .iter()
                .flat_map(|p| p.quants.iter().copied())
                .collect(),
        })
    }

    fn row(&self, r: usize) -> Row<'_> {
        let nb = self.cols / BLOCK;
        let qb = nb * self.format.quant_bytes();
        Row {
            scales: &self.scales[r * nb..(r + 1) * nb],
            offsets: if self.offsets.is_empty() {
                &[]
            } else {
                &self.offsets[r * nb..(r + 1) * nb]
            },
            quants: &self.quants[r * qb..(r + 1) * qb],
        }
    }

    /// Block i's integer weights as f32.
    fn block_quants(&self, i: usize) -> [f32; BLOCK] {
        let qb = self.format.quant_bytes();
        quants_f32(self.format, &self.quants[i * qb..(i + 1) * qb])
    }

    /// The matrix in f32 (rows, cols), each weight computed as d q + m exactly like
    /// candle's dequantization (tests compare the two).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for (i, &d) in self.scales.iter().enumerate() {
            let q = self.block_quants(i);
            out.extend(q.iter().map(|&q| match self.format {
                BlockFormat::Q4_1 => q * d + self.offsets[i],
                // d (q - 8), as ggml writes it (exact: q - 8 is a small integer).
                BlockFormat::Q4_0 => (q - 8.0) * d,
                BlockFormat::Q8_0 => q * d,
            }));
        }
        out
    }

    /// x W^T for x (m, cols) row-major: (m, rows).
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        assert_eq!(x.len(), m * k, "packed product: input is not (m, cols)");
        if m == 0 || n == 0 || k == 0 {
            return vec![0.0; m * n];
        }
        let nb = k / BLOCK;
        // Each block's input sum, for the offset term: sum_j (d q_j + o) x_j = d (q . x) + o sum(x).
        let sums: Vec<f32> = x
            .chunks_exact(BLOCK)
            .map(|c| c.iter().sum::<f32>())
            .collect();
        let rows_of_x: Vec<(&[f32], &[f32])> =
            x.chunks_exact(k).zip(sums.chunks_exact(nb)).collect();
        // (rows, m): each output row of W is one contiguous run, whichever task computes it.
        let mut out_t = vec![0f32; n * m];
        let level = super::simd::level();
        let work = |first_row: usize, chunk: &mut [f32]| {
            for (i, dst) in chunk.chunks_exact_mut(m).enumerate() {
                let w = self.row(first_row + i);
                for (xs, d) in rows_of_x.chunks(4).zip(dst.chunks_mut(4)) {
                    dot_rows(self.format, &w, xs, d, level);
                }
            }
        };
        if n * k >= PAR_MIN_WEIGHTS {
            let per_task = (TASK_WEIGHTS / k).max(1);
            out_t
                .par_chunks_mut(per_task * m)
                .enumerate()
                .for_each(|(t, chunk)| work(t * per_task, chunk));
        } else {
            work(0, &mut out_t);
        }
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0f32; m * n];
        for (r, row) in out_t.chunks_exact(m).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                out[i * n + r] = v;
            }
        }
        out
    }
}

/// `out[i] = w . x_i` for up to four input rows (x_i, its block sums), one weight row `w`,
/// with the widest kernel `level` allows.
fn dot_rows(
    format: BlockFormat,
    w: &Row<'_>,
    xs: &[(&[f32], &[f32])],
    out: &mut [f32],
    level: super::simd::SimdLevel,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd::SimdLevel;
        macro_rules! by_shape {
            ($kernel:ident) => {
                match (format, xs.len()) {
                    (BlockFormat::Q4_0 | BlockFormat::Q4_1, 1) => x86::$kernel::<Q4, 1>(w, xs, out),
                    (BlockFormat::Q4_0 | BlockFormat::Q4_1, 2) => x86::$kernel::<Q4, 2>(w, xs, out),
                    (BlockFormat::Q4_0 | BlockFormat::Q4_1, 3) => x86::$kernel::<Q4, 3>(w, xs, out),
                    (BlockFormat::Q4_0 | BlockFormat::Q4_1, _) => x86::$kernel::<Q4, 4>(w, xs, out),
                    (BlockFormat::Q8_0, 1) => x86::$kernel::<Q8, 1>(w, xs, out),
                    (BlockFormat::Q8_0, 2) => x86::$kernel::<Q8, 2>(w, xs, out),
                    (BlockFormat::Q8_0, 3) => x86::$kernel::<Q8, 3>(w, xs, out),
                    (BlockFormat::Q8_0, _) => x86::$kernel::<Q8, 4>(w, xs, out),
                }
            };
        }
        use x86::{Q4, Q8};
        // SAFETY: `level` is never above what the CPU runs (AVX2 implies FMA and F16C,
        // AVX-512 implies AVX2); every row of `xs` has `w`'s width and one sum per block of
        // `w` (checked in `matmul_t`), and `w`'s parts hold the same number of blocks, so the
        // kernels read inside all of them.
        match level {
            SimdLevel::Avx512 => return unsafe { by_shape!(dot512) },
            SimdLevel::Avx2 => return unsafe { by_shape!(dot) },
            SimdLevel::Portable => {}
        }
    }
    let _ = level;
    dot_rows_scalar(format, w, xs, out)
}

fn dot_rows_scalar(format: BlockFormat, w: &Row<'_>, xs: &[(&[f32], &[f32])], out: &mut [f32]) {
    let mut acc = [0f32; 4];
    let qb = format.quant_bytes();
    for (b, &d) in w.scales.iter().enumerate() {
        let q = quants_f32(format, &w.quants[b * qb..(b + 1) * qb]);
        for (a, (x, _)) in acc.iter_mut().zip(xs) {
            let x = &x[b * BLOCK..(b + 1) * BLOCK];
            let dot: f32 = q.iter().zip(x).map(|(q, x)| q * x).sum();
            *a += d * dot;
        }
    }
    for ((o, a), (_, sums)) in out.iter_mut().zip(acc).zip(xs) {
        let offsets: f32 = w.offsets.iter().zip(*sums).map(|(o, s)| o * s).sum();
        *o = a + offsets;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Row, BLOCK};

    /// How a block's stored integer weights expand to f32 lanes.
    pub trait Block {
        /// Stored bytes of one block's weights.
        const BYTES: usize;
        /// The 32 weights' q in four vectors of 8.
        unsafe fn load(q: *const u8) -> [__m256; 4];
        /// The 32 weights' q in two vectors of 16, for AVX-512.
        unsafe fn load512(q: *const u8) -> [__m512; 2];
    }

    /// 4-bit weights (Q4_0, Q4_1: their offsets are applied apart).
    pub struct Q4;
    /// 8-bit signed weights (Q8_0).
    pub struct Q8;

    /// 8 bytes at `p`, each widened to an i32 lane (zero- or sign-extended): one
    /// instruction with its load, where loading 16 bytes and shifting costs three.
    #[inline(always)]
    unsafe fn widen_u8(p: *const u8) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
    }

    #[inline(always)]
    unsafe fn widen_i8(p: *const u8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }

    /// 16 bytes at `p`, each widened to an i32 lane.
    #[inline(always)]
    unsafe fn widen16_u8(p: *const u8) -> __m512i {
        _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
    }

    /// 16 signed bytes at `p` as 16 f32 lanes.
    #[inline(always)]
    unsafe fn widen16_i8(p: *const u8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i)))
    }

    impl Block for Q4 {
        const BYTES: usize = 16;
        /// Byte j holds weight j (low nibble) and weight j + 16 (high nibble).
        #[inline(always)]
        unsafe fn load(qs: *const u8) -> [__m256; 4] {
            let (a, b) = (widen_u8(qs), widen_u8(qs.add(8)));
            let mask = _mm256_set1_epi32(0x0F);
            [
                _mm256_cvtepi32_ps(_mm256_and_si256(a, mask)),
                _mm256_cvtepi32_ps(_mm256_and_si256(b, mask)),
                _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)),
                _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)),
            ]
        }
        /// One widening gives both halves of the block.
        #[inline(always)]
        unsafe fn load512(qs: *const u8) -> [__m512; 2] {
            let a = widen16_u8(qs);
            [
                _mm512_cvtepi32_ps(_mm512_and_si512(a, _mm512_set1_epi32(0x0F))),
                _mm512_cvtepi32_ps(_mm512_srli_epi32(a, 4)),
            ]
        }
    }

    impl Block for Q8 {
        const BYTES: usize = 32;
        #[inline(always)]
        unsafe fn load(q: *const u8) -> [__m256; 4] {
            [
                widen_i8(q),
                widen_i8(q.add(8)),
                widen_i8(q.add(16)),
                widen_i8(q.add(24)),
            ]
        }
        #[inline(always)]
        unsafe fn load512(q: *const u8) -> [__m512; 2] {
            [widen16_i8(q), widen16_i8(q.add(16))]
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// sum_b offsets[b] sums[b], 8 blocks a step (0 without offsets). Shared by both
    /// kernels, so that they add the offset term in the same order.
    #[inline(always)]
    unsafe fn offset_term(offsets: &[f32], sums: &[f32]) -> f32 {
        let n = offsets.len();
        let (o, s) = (offsets.as_ptr(), sums.as_ptr());
        let mut acc = _mm256_setzero_ps();
        let mut b = 0;
        while b + 8 <= n {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(o.add(b)), _mm256_loadu_ps(s.add(b)), acc);
            b += 8;
        }
        let mut tail = 0f32;
        while b < n {
            tail += *o.add(b) * *s.add(b);
            b += 1;
        }
        hsum(acc) + tail
    }

    /// `out[i] = w . x_i` for R input rows: each block of `w` is expanded once for all R.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot<B: Block, const R: usize>(
        w: &Row<'_>,
        xs: &[(&[f32], &[f32])],
        out: &mut [f32],
    ) {
        let blocks = w.scales.len();
        let mut acc = [_mm256_setzero_ps(); R];
        let (scales, q) = (w.scales.as_ptr(), w.quants.as_ptr());
        for b in 0..blocks {
            let q = B::load(q.add(b * B::BYTES));
            let d = _mm256_broadcast_ss(&*scales.add(b));
            for r in 0..R {
                let x = xs[r].0.as_ptr().add(b * BLOCK);
                let mut t = _mm256_mul_ps(q[0], _mm256_loadu_ps(x));
                t = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(x.add(8)), t);
                t = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(x.add(16)), t);
                t = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(x.add(24)), t);
                acc[r] = _mm256_fmadd_ps(t, d, acc[r]);
            }
        }
        for r in 0..R {
            out[r] = hsum(acc[r]) + offset_term(w.offsets, xs[r].1);
        }
    }

    /// Block `b` of the weight row into R accumulators (inlined into `dot512`, so
    /// compiled with its features).
    #[inline(always)]
    unsafe fn block512<B: Block, const R: usize>(
        w: &Row<'_>,
        b: usize,
        xs: &[(&[f32], &[f32])],
        acc: &mut [__m512; R],
    ) {
        let q = B::load512(w.quants.as_ptr().add(b * B::BYTES));
        let d = _mm512_set1_ps(*w.scales.get_unchecked(b));
        for r in 0..R {
            let x = xs[r].0.as_ptr().add(b * BLOCK);
            let t = _mm512_mul_ps(q[0], _mm512_loadu_ps(x));
            let t = _mm512_fmadd_ps(q[1], _mm512_loadu_ps(x.add(16)), t);
            acc[r] = _mm512_fmadd_ps(t, d, acc[r]);
        }
    }

    /// `dot` with 16 lanes: a block is two vectors, and blocks alternate between two sets of
    /// accumulators so that consecutive blocks' additions do not wait on each other.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
    pub unsafe fn dot512<B: Block, const R: usize>(
        w: &Row<'_>,
        xs: &[(&[f32], &[f32])],
        out: &mut [f32],
    ) {
        let blocks = w.scales.len();
        let mut acc = [[_mm512_setzero_ps(); R]; 2];
        let [acc0, acc1] = &mut acc;
        for b in (0..blocks / 2 * 2).step_by(2) {
            block512::<B, R>(w, b, xs, acc0);
            block512::<B, R>(w, b + 1, xs, acc1);
        }
        if blocks % 2 == 1 {
            block512::<B, R>(w, blocks - 1, xs, acc0);
        }
        for r in 0..R {
            out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]))
                + offset_term(w.offsets, xs[r].1);
        }
    }
}

/// The packed product as a candle op on a contiguous (m, cols) f32 CPU tensor; no backward
/// (used only where no gradient is wanted).
pub struct PackedProduct<'a>(pub &'a PackedMatrix);

impl CustomOp1 for PackedProduct<'_> {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let x = super::fused::contiguous_f32(s, l, "packed-matmul")?;
        if k != self.0.cols {
            candle_core::bail!(
                "packed-matmul: input width {k}, weight ({}, {})",
                self.0.rows,
                self.0.cols
            );
        }
        Ok((
            CpuStorage::F32(self.0.matmul_t(x, m)),
            Shape::from((m, self.0.rows)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Random blocks of `format` with realistic scales (and a Q8_0 of extreme q values).
    fn random(format: BlockFormat, rows: usize, cols: usize, seed: u64) -> PackedMatrix {
        let data = random_bytes(format, rows, cols, seed);
        PackedMatrix::from_bytes(format, rows, cols, data).unwrap()
    }

    /// The GGUF bytes of `random`'s matrix.
    fn random_bytes(format: BlockFormat, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut data = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32(rng.random_range(0.001..0.05));
            let m = f16::from_f32(rng.random_range(-0.2..0.0));
            data.extend(d.to_le_bytes());
            if format == BlockFormat::Q4_1 {
                data.extend(m.to_le_bytes());
            }
            let n = if format == BlockFormat::Q8_0 { 32 } else { 16 };
            data.extend((0..n).map(|_| rng.random::<u8>()));
        }
        data
    }

    fn reference(w: &[f32], x: &[f32], m: usize, rows: usize, cols: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * rows];
        for i in 0..m {
            for r in 0..rows {
                out[i * rows + r] = (0..cols)
                    .map(|j| w[r * cols + j] as f64 * x[i * cols + j] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn dequantize_matches_candle() {
        for (format, dtype) in [
            (BlockFormat::Q4_0, GgmlDType::Q4_0),
            (BlockFormat::Q4_1, GgmlDType::Q4_1),
            (BlockFormat::Q8_0, GgmlDType::Q8_0),
        ] {
            let bytes = random_bytes(format, 5, 64, 7);
            let p = PackedMatrix::from_bytes(format, 5, 64, bytes.clone()).unwrap();
            let q = QTensor::new(
                candle_core::quantized::QStorage::from_data(
                    std::borrow::Cow::Borrowed(&bytes),
                    &candle_core::Device::Cpu,
                    dtype,
                )
                .unwrap(),
                (5, 64),
            )
            .unwrap();
            let theirs = q
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(p.dequantize(), theirs, "{format:?}");
            let again = PackedMatrix::from_qtensor(&q).unwrap().unwrap();
            assert_eq!(again, p);
        }
    }

    #[test]
    fn products_equal_the_dequantized_matrix() {
        let (rows, cols) = (37, 96);
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let p = random(format, rows, cols, 3);
            let w = p.dequantize();
            let mut rng = rand::rngs::StdRng::seed_from_u64(11);
            for m in 1..=9 {
                let x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                let want = reference(&w, &x, m, rows, cols);
                let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
                for level in crate::models::simd::available() {
                    let got = crate::models::simd::with_level(level, || p.matmul_t(&x, m));
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (*g as f64 - w).abs() <= 1e-5 * scale,
                            "{format:?} m={m} {level:?} [{i}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn large_products_split_across_threads_agree() {
        // Above PAR_MIN_WEIGHTS, with a last task shorter than the others.
        let (rows, cols) = (4100, 288);
        let p = random(BlockFormat::Q4_1, rows, cols, 5);
        let w = p.dequantize();
        let x: Vec<f32> = (0..2 * cols).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let want = reference(&w, &x, 2, rows, cols);
        let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
        let got = p.matmul_t(&x, 2);
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 1e-5 * scale);
        }
    }

    #[test]
    fn stacking_keeps_rows_in_order_and_refuses_mixed_formats() {
        let a = random(BlockFormat::Q4_1, 3, 64, 1);
        let b = random(BlockFormat::Q4_1, 2, 64, 2);
        let s = PackedMatrix::stack(&[&a, &b]).unwrap();
        assert_eq!(s.dims(), (5, 64));
        let mut want = a.dequantize();
        want.extend(b.dequantize());
        assert_eq!(s.dequantize(), want);
        let c = random(BlockFormat::Q8_0, 2, 64, 2);
        assert!(PackedMatrix::stack(&[&a, &c]).is_none());
        assert!(PackedMatrix::from_bytes(BlockFormat::Q4_1, 2, 64, vec![0; 79]).is_err());
        // Degenerate shapes give empty or zero products, not a panic.
        let empty = PackedMatrix::from_bytes(BlockFormat::Q8_0, 3, 0, Vec::new()).unwrap();
        assert_eq!(empty.matmul_t(&[], 2), vec![0.0; 6]);
        assert!(a.matmul_t(&[], 0).is_empty());
    }
}
