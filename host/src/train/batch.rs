//! Sequence layout and the caption-only loss.
//!
//! Each example is `[prompt before audio][projected audio][prompt after audio][target]`.
//! Examples are right-padded to the longest in the batch; with causal attention the padding
//! never influences a real position, and the loss only reads the positions that predict
//! target tokens (shifted by one), so prompt, audio and padding are excluded.

use candle_core::{DType, Tensor};

use crate::models::llm::{LanguageModel, Llama};
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::weights::Result;

/// Token ids of one example's text pieces.
#[derive(Debug, Clone)]
pub struct TextPieces {
    pub before: Vec<u32>,
    pub after: Vec<u32>,
    pub target: Vec<u32>,
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
pub fn caption_loss(
    llm: &Llama,
    pieces: &[TextPieces],
    audio: &[Tensor],
    trace: NonFiniteTrace,
) -> Result<BatchLoss> {
    let device = llm.device().clone();
    let h = llm.hidden_size();
    let mut rows = Vec::with_capacity(pieces.len());
    let mut lengths = Vec::with_capacity(pieces.len());
    let mut positions: Vec<u32> = Vec::new();
    let mut targets: Vec<u32> = Vec::new();
    for (p, a) in pieces.iter().zip(audio) {
        let embed = |ids: &[u32]| -> Result<Option<Tensor>> {
            if ids.is_empty() {
                return Ok(None);
            }
            Ok(Some(llm.embed(&Tensor::new(ids, &device)?.unsqueeze(0)?)?))
        };
        let parts: Vec<Tensor> = [
            embed(&p.before)?,
            Some(a.to_dtype(llm.dtype())?),
            embed(&p.after)?,
            embed(&p.target)?,
        ]
        .into_iter()
        .flatten()
        .collect();
        let row = Tensor::cat(&parts, 1)?;
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
    let hidden = llm.forward_hidden(&x, 0, None, trace)?;
    let hidden = hidden.reshape(((), h))?;
    let picked = hidden.index_select(&Tensor::new(flat_positions.as_slice(), &device)?, 0)?;
    // f32 (f64 for an f64 model, so gradient checks are exact enough).
    let logits = llm.logits(&picked)?;
    let target_t = Tensor::new(targets.as_slice(), &device)?;
    let loss = candle_nn::loss::cross_entropy(&logits, &target_t)?;
    // Diagnostics (no graph needed).
    let probs = candle_nn::ops::softmax_last_dim(&logits.detach().to_dtype(DType::F32)?)?;
    let p_correct = probs
        .gather(&target_t.unsqueeze(1)?, 1)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let argmax = logits.detach().argmax(1)?.to_vec1::<u32>()?;
    let n = targets.len().max(1) as f64;
    Ok(BatchLoss {
        loss,
        target_tokens: targets.len(),
        accuracy: argmax.iter().zip(&targets).filter(|(a, t)| a == t).count() as f64 / n,
        mean_prob: p_correct.iter().map(|&p| p as f64).sum::<f64>() / n,
    })
}
