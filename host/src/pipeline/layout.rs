//! The one sequence layout: `[prompt before audio][projected audio][prompt after
//! audio][target]`, as embeddings. Training lays out whole rows (right-padded into a batch by
//! the loss); captioning lays out what follows the shared prefix (left-padded by the decode
//! loop); both call [`sequence_embeddings`].

use candle_core::Tensor;

use crate::models::llm::LanguageModel;
use crate::models::projector::Projector;
use crate::models::weights::Result;

/// Embeddings (1, T, hidden) of `before`, the projected `audio` (1, N, hidden), `after` and
/// `target`, in that order; empty pieces are left out.
pub fn sequence_embeddings(
    llm: &impl LanguageModel,
    before: &[u32],
    audio: &Tensor,
    after: &[u32],
    target: &[u32],
) -> Result<Tensor> {
    let device = llm.device().clone();
    let embed = |ids: &[u32]| -> Result<Option<Tensor>> {
        if ids.is_empty() {
            return Ok(None);
        }
        Ok(Some(llm.embed(&Tensor::new(ids, &device)?.unsqueeze(0)?)?))
    };
    let parts: Vec<Tensor> = [
        embed(before)?,
        Some(audio.to_dtype(llm.dtype())?),
        embed(after)?,
        embed(target)?,
    ]
    .into_iter()
    .flatten()
    .collect();
    Ok(Tensor::cat(&parts, 1)?)
}

/// The projector applied to each encoder window (1, frames, d_enc), the results joined in
/// time: (1, N, hidden).
pub fn project_windows(projector: &Projector, encoded: &[Tensor]) -> Result<Tensor> {
    let _span = tracing::debug_span!("project", windows = encoded.len()).entered();
    let windows = encoded
        .iter()
        .map(|e| projector.forward(e))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&windows, 1)?)
}
