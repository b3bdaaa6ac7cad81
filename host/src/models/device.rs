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
