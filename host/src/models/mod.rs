//! Frozen models (Whisper encoder, Llama-family LLM) and what they share: weight loading with
//! integrity checks, the device/dtype choice, the frozen linear op, non-finite tracing.

pub mod ct2;
pub mod device;
pub mod frozen;
pub mod fused;
pub mod llm;
pub mod lora;
pub mod nonfinite;
pub mod packed;
pub mod projector;
pub mod simd;
pub mod trainable;
pub mod weights;
pub mod whisper;

pub use device::Runtime;
pub use weights::{ModelError, WeightStore};
