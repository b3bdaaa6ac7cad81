//! The one place where device and dtype are chosen. Layers never pick their own.

use candle_core::{DType, Device};

/// Where the frozen models run and in which precision.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub device: Device,
    /// Compute dtype of the frozen models: f32 on CPU (candle's CPU bf16 matmul widens to f32
    /// on every call, which is slow), bf16 on CUDA.
    pub dtype: DType,
}

impl Runtime {
    /// The GPU when built with the `cuda` feature and one is present, else the CPU.
    pub fn best_available() -> Self {
        #[cfg(feature = "cuda")]
        {
            if let Ok(device) = Device::new_cuda(0) {
                tracing::info!("running on CUDA device 0 (bf16)");
                return Self {
                    device,
                    dtype: DType::BF16,
                };
            }
            tracing::warn!("built with CUDA but no usable GPU found; running on the CPU");
        }
        Self::cpu()
    }

    pub fn cpu() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}

/// For work where CPU matmuls and elementwise ops alternate quickly (a training step):
/// keeps candle's elementwise ops on the calling thread unless `CANDLE_NUM_THREADS` is set.
/// candle runs elementwise ops on its own worker pool, whose workers spin for a while after
/// each op, while matmuls run on rayon's pool; the spinning workers then take cores from the
/// matmul (`scripts/bench_train.sh` prints the step both ways; figures in BENCHMARKS.md).
/// The encoder alone is faster with the pool, so this is not the default. Takes effect only
/// before candle's first CPU op in this process.
pub fn keep_elementwise_on_caller() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Runs `f` on a thread of rayon's pool, the one the parallel products (gemm, packed
/// blocks, fused kernels) use, and waits for it. A thread outside the pool that starts a
/// parallel product sleeps until the pool has finished it and is then woken: ~120 times per
/// decoded token, which cost a fifth of a decode step (`bench_models llm`). On a thread of
/// the pool, `f` works on its own products, so the handoff happens once per call. Runs `f`
/// in place when already on the pool.
pub fn on_compute_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    rayon::join(f, || ()).0
}
