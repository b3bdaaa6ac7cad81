//! The teacher-forced caption loss (training, the eval loss, selftest): sequence layout and
//! the cross-entropy on the target tokens only.
//!
//! Each example is `[prompt before audio][projected audio][prompt after audio][target]`.
//! Examples are right-padded to the longest in the batch; with causal attention the padding
//! never influences a real position, and the loss only reads the positions that predict
//! target tokens (shifted by one), so prompt, audio and padding are excluded.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::models::llm::{KvCache, LanguageModel, Llama, PrefixCache};
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::weights::Result;
use crate::pipeline::{sequence_embeddings, TextPieces};

impl BatchLoss {
    /// The loss as a number.
    pub fn value(&self) -> Result<f64> {
        Ok(self.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }
}

/// Loss and the diagnostics computed with it.
pub struct BatchLoss {
    /// Mean cross-entropy per target token (a scalar with a graph back to the projector).
    pub loss: Tensor,
    pub target_tokens: usize,
    /// Fraction of target tokens that are the argmax.
    pub accuracy: f64,
    /// Mean probability of the correct token.
    pub mean_prob: f64,
}

/// Forward the batch and compute the caption-only loss. `audio[i]` is (1, N_i, hidden).
/// With `prefixes`, a text-before-audio shared by every example of the batch is not
/// recomputed (same loss and gradients, less work); without, everything is one forward
/// (e.g. to trace non-finite values through every layer).
pub fn caption_loss(
    llm: &Llama,
    pieces: &[TextPieces],
    audio: &[Tensor],
    prefixes: Option<&PrefixCache>,
    trace: NonFiniteTrace,
) -> Result<BatchLoss> {
    let device = llm.device().clone();
    let h = llm.hidden_size();
    let shared_before = pieces
        .first()
        .map(|p| p.before.as_slice())
        .filter(|b| !b.is_empty() && pieces.iter().all(|p| p.before == *b));
    let prefix = match (prefixes, shared_before) {
        (Some(cache), Some(ids)) => Some::<Arc<KvCache>>(cache.get_or_compute(llm, ids)?),
        _ => None,
    };
    let mut rows = Vec::with_capacity(pieces.len());
    let mut lengths = Vec::with_capacity(pieces.len());
    let mut positions: Vec<u32> = Vec::new();
    let mut targets: Vec<u32> = Vec::new();
    for (p, a) in pieces.iter().zip(audio) {
        let before = if prefix.is_some() { &[][..] } else { &p.before };
        let row = sequence_embeddings(llm, before, a, &p.after, &p.target)?;
        let len = row.dim(1)?;
        let first_target = len - p.target.len();
        lengths.push(len);
        rows.push(row);
        for (j, &t) in p.target.iter().enumerate() {
            // The logit at position k predicts the token at k + 1.
            positions.push((first_target + j - 1) as u32);
            targets.push(t);
        }
    }
    let t_max = *lengths.iter().max().unwrap_or(&0);
    let mut padded = Vec::with_capacity(rows.len());
    let mut flat_positions = Vec::with_capacity(positions.len());
    let mut k = 0;
    for (b, (row, (&len, p))) in rows.iter().zip(lengths.iter().zip(pieces)).enumerate() {
        padded.push(if len < t_max {
            let pad = Tensor::zeros((1, t_max - len, h), row.dtype(), &device)?;
            Tensor::cat(&[row, &pad], 1)?
        } else {
            row.clone()
        });
        for _ in 0..p.target.len() {
            flat_positions.push(b as u32 * t_max as u32 + positions[k]);
            k += 1;
        }
    }
    let x = Tensor::cat(&padded, 0)?;
    let hidden = match &prefix {
        Some(prefix) => llm.forward_after_prefix(&x, prefix, trace)?,
        None => llm.forward_hidden(&x, 0, None, trace)?,
    };
    let hidden = hidden.reshape(((), h))?;
    let picked = hidden.index_select(&Tensor::new(flat_positions.as_slice(), &device)?, 0)?;
    // f32 (f64 for an f64 model, so gradient checks are exact enough).
    let logits = llm.logits(&picked)?;
    // Per target token: -log p(correct).
    let token_losses = if llm.use_fused() {
        crate::models::fused::cross_entropy_rows(&logits, &targets)?
    } else {
        let target_t = Tensor::new(targets.as_slice(), &device)?.unsqueeze(1)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, 1)?;
        log_probs.gather(&target_t, 1)?.squeeze(1)?.neg()?
    };
    let loss = token_losses.mean_all()?;
    // Diagnostics (no graph needed).
    let p_correct: Vec<f64> = token_losses
        .detach()
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .into_iter()
        .map(|l| (-l).exp())
        .collect();
    let argmax = logits.detach().argmax(1)?.to_vec1::<u32>()?;
    let n = targets.len().max(1) as f64;
    Ok(BatchLoss {
        loss,
        target_tokens: targets.len(),
        accuracy: argmax.iter().zip(&targets).filter(|(a, t)| a == t).count() as f64 / n,
        mean_prob: p_correct.iter().sum::<f64>() / n,
    })
}
