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
    /// The GPU when built with the `cuda` feature and one is present, else the CPU. Under
    /// an MPI or Slurm launcher each rank takes the GPU of its node-local rank
    /// ([`cuda_ordinal`]): one GPU per rank.
    pub fn best_available() -> Self {
        #[cfg(feature = "cuda")]
        {
            let ordinal = cuda_ordinal(|name| std::env::var(name).ok());
            match Device::new_cuda(ordinal) {
                Ok(device) => {
                    tracing::info!("running on CUDA device {ordinal} (bf16)");
                    return Self {
                        device,
                        dtype: DType::BF16,
                    };
                }
                Err(e) => tracing::warn!(
                    "built with CUDA but CUDA device {ordinal} is not usable ({e}); running on \
                     the CPU{}",
                    if ordinal > 0 {
                        " (the device is this rank's node-local rank: launch at most as many \
                         ranks per node as it has GPUs)"
                    } else {
                        ""
                    }
                ),
            }
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

/// The launchers' names for a process's rank among the ranks on its node: Open MPI's
/// mpirun, Slurm's srun, MPICH's hydra.
const LOCAL_RANK_VARS: [&str; 3] = [
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "SLURM_LOCALID",
    "MPI_LOCALRANKID",
];

/// The CUDA device this process uses, from its environment (`env(name)`): its node-local
/// rank under a launcher, so that the ranks on a node take one GPU each, modulo the devices
/// `CUDA_VISIBLE_DEVICES` lists when it lists any (Slurm's `--gpus-per-task=1` leaves each
/// rank one device, its device 0); device 0 without a launcher.
pub fn cuda_ordinal(env: impl Fn(&str) -> Option<String>) -> usize {
    let Some(local) = LOCAL_RANK_VARS
        .iter()
        .find_map(|name| env(name)?.trim().parse::<usize>().ok())
    else {
        return 0;
    };
    let visible = env("CUDA_VISIBLE_DEVICES")
        .map(|v| v.split(',').filter(|d| !d.trim().is_empty()).count())
        .unwrap_or(0);
    match visible {
        0 => local,
        n => local % n,
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

/// Counts the CPU threads once, at start-up, instead of on every matrix product.
///
/// candle 0.11's CPU matmul asks `candle_core::utils::get_num_threads()` how many threads
/// to split over, and that reads `RAYON_NUM_THREADS` and, when it is unset, counts the
/// physical cores by reading all of `/proc/cpuinfo` again, on every call: ~60 times per
/// decoded token (attention over the cache), 5% of a decode step on 2 cores, and far more
/// on a server whose `/proc/cpuinfo` lists a hundred cores. Setting the variable to the
/// value candle would compute makes that call a lookup. rayon's own pool is built first, at
/// its default size (every logical CPU), so it is the same as without this; candle's
/// elementwise pool reads the same variable after `CANDLE_NUM_THREADS`, and gets the same
/// count it would have computed. A user's valid `RAYON_NUM_THREADS` is left alone.
///
/// Call first in `main`, before any other thread exists: setting an environment variable
/// while another thread reads the environment is a data race in glibc.
pub fn count_threads_once() {
    const VAR: &str = "RAYON_NUM_THREADS";
    let user_set = std::env::var(VAR)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > 0);
    if user_set {
        return;
    }
    // An error means the pool already exists (a second call): its size is fixed either way.
    let _ = rayon::ThreadPoolBuilder::new().build_global();
    let candle_threads = candle_core::utils::get_num_threads();
    std::env::set_var(VAR, candle_threads.to_string());
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

#[cfg(test)]
mod tests {
    use super::cuda_ordinal;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    /// One GPU per rank on a node: the node-local rank picks it, from whichever launcher
    /// set it; a launcher that leaves each rank only its own GPU visible gives device 0.
    #[test]
    fn each_rank_on_a_node_takes_its_own_gpu() {
        assert_eq!(cuda_ordinal(env(&[])), 0);
        assert_eq!(cuda_ordinal(env(&[("OMPI_COMM_WORLD_LOCAL_RANK", "3")])), 3);
        assert_eq!(cuda_ordinal(env(&[("SLURM_LOCALID", "2")])), 2);
        assert_eq!(cuda_ordinal(env(&[("MPI_LOCALRANKID", "1")])), 1);
        // Slurm --gpus-per-task=1: each rank sees one device.
        assert_eq!(
            cuda_ordinal(env(&[
                ("SLURM_LOCALID", "5"),
                ("CUDA_VISIBLE_DEVICES", "5")
            ])),
            0
        );
        assert_eq!(
            cuda_ordinal(env(&[
                ("OMPI_COMM_WORLD_LOCAL_RANK", "5"),
                ("CUDA_VISIBLE_DEVICES", "0,1,2,3")
            ])),
            1
        );
        // Not a number: as without a launcher.
        assert_eq!(cuda_ordinal(env(&[("SLURM_LOCALID", "x")])), 0);
    }
}
