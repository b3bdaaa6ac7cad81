//! `--trace-nonfinite`: check each layer's output during a forward pass and stop at the first
//! layer that produces NaN/Inf, naming it; on the CPU training path also each layer's input
//! gradient during the backward. Off by default (it syncs and scans every output).

use candle_core::Tensor;

use super::weights::{count_non_finite, ModelError, Result};

/// Passed down through forward passes; `check` is a no-op unless enabled.
#[derive(Debug, Clone, Copy, Default)]
pub struct NonFiniteTrace {
    pub enabled: bool,
}

impl NonFiniteTrace {
    pub fn on() -> Self {
        Self { enabled: true }
    }

    /// Errors naming `layer` when `output` holds a non-finite value.
    pub fn check(&self, layer: impl FnOnce() -> String, output: &Tensor) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let layer = layer();
        if let Some(report) = count_non_finite(&layer, output)? {
            return Err(ModelError::NonFiniteActivation {
                layer,
                detail: format!(
                    "NaN: {}, +Inf: {}, -Inf: {}",
                    report.nan, report.pos_inf, report.neg_inf
                ),
            });
        }
        Ok(())
    }
}
