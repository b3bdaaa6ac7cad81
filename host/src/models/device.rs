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

/// Device memory in bytes, as the CUDA driver counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes of tensors allocated now (the stream-ordered pool candle allocates from).
    pub in_use: u64,
    /// Most bytes of tensors allocated at once since the last `reset_peak`.
    pub peak: u64,
    /// Everything in use on the device (total - free): tensors, the pool's reserve, the
    /// CUDA context, cuBLAS workspaces, and other processes.
    pub device_used: u64,
}

/// Reads a CUDA device's memory from the driver. candle allocates every tensor with
/// `cuMemAllocAsync` from the device's memory pool (where the device supports pools, as every
/// GPU since Pascal on a recent driver does), and the pool keeps a high-water mark of bytes in
/// use (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`): an exact peak between two readings, where sampling
/// `cuMemGetInfo` would miss short-lived activations. `None` on the CPU and in a build
/// without the cuda feature.
pub struct MemoryMeter {
    #[cfg(feature = "cuda")]
    stream: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    #[cfg(feature = "cuda")]
    pool: Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool>,
}

#[cfg(feature = "cuda")]
mod pool_attributes {
    pub use candle_core::cuda_backend::cudarc::driver::result::mem_pool;
    pub use candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute::{
        CU_MEMPOOL_ATTR_USED_MEM_CURRENT as IN_USE, CU_MEMPOOL_ATTR_USED_MEM_HIGH as PEAK,
    };
}

impl MemoryMeter {
    pub fn of(device: &Device) -> Option<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = device {
            use candle_core::cuda_backend::cudarc::driver::result::device::get_mem_pool;
            let stream = cuda.cuda_stream();
            let ctx = stream.context().clone();
            ctx.bind_to_thread().ok()?;
            // Without pools candle allocates with cuMemAlloc: only the device total is known.
            let pool = if ctx.has_async_alloc() {
                // SAFETY: the device handle comes from a live context.
                unsafe { get_mem_pool(ctx.cu_device()) }.ok()
            } else {
                None
            };
            return Some(Self { stream, pool });
        }
        let _ = device;
        None
    }

    /// Starts a new peak from what is allocated now.
    pub fn reset_peak(&self) {
        #[cfg(feature = "cuda")]
        if let Some(pool) = self.pool {
            let _ = self.stream.synchronize();
            let mut zero: u64 = 0;
            // SAFETY: the pool belongs to the live context; USED_MEM_HIGH takes a cuuint64_t,
            // and setting it to 0 resets it to the current use.
            let _ = unsafe {
                pool_attributes::mem_pool::set_attribute(
                    pool,
                    pool_attributes::PEAK,
                    (&mut zero as *mut u64).cast(),
                )
            };
        }
    }

    /// The device's memory now, after the work queued so far has finished.
    pub fn read(&self) -> DeviceMemory {
        #[cfg(feature = "cuda")]
        {
            let _ = self.stream.synchronize();
            let attribute = |attr| -> u64 {
                let Some(pool) = self.pool else { return 0 };
                let mut value: u64 = 0;
                // SAFETY: as in reset_peak; both attributes are cuuint64_t.
                let ok = unsafe {
                    pool_attributes::mem_pool::get_attribute(
                        pool,
                        attr,
                        (&mut value as *mut u64).cast(),
                    )
                };
                ok.map_or(0, |()| value)
            };
            let device_used = self
                .stream
                .context()
                .mem_get_info()
                .map_or(0, |(free, total)| total.saturating_sub(free) as u64);
            DeviceMemory {
                in_use: attribute(pool_attributes::IN_USE),
                peak: attribute(pool_attributes::PEAK),
                device_used,
            }
        }
        #[cfg(not(feature = "cuda"))]
        DeviceMemory::default()
    }
}
