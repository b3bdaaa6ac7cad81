//! Captioning: `[prompt before audio][projected audio][prompt after audio]` into the frozen
//! LLM, then decoding with a KV cache until EOS, a stop string or the token limit.
//!
//! The prompt text before the audio is usually identical for every clip, so its keys and
//! values are computed once ([`PromptPrefix`]) and copied into each batch. A batch holds
//! clips whose remaining prompt (audio + text after it) may differ in length: it is
//! left-padded, with per-row positions and a mask that hides the padding, so every row sees
//! exactly what it would see alone. Rows that finish drop out of the batch.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::models::llm::{ChatTokenizer, KvCache, LanguageModel, LogitsAt};
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::projector::Projector;
use crate::models::weights::{ModelError, Result};
use crate::sampler::Sampler;

/// The prompt embeddings for one clip: (1, T, hidden).
pub fn prompt_embeddings(
    llm: &impl LanguageModel,
    before: &[u32],
    audio: &Tensor,
    after: &[u32],
) -> Result<Tensor> {
    let device = llm.device().clone();
    let mut parts = Vec::new();
    if !before.is_empty() {
        parts.push(llm.embed(&Tensor::new(before, &device)?.unsqueeze(0)?)?);
    }
    parts.push(audio.to_dtype(llm.dtype())?);
    if !after.is_empty() {
        parts.push(llm.embed(&Tensor::new(after, &device)?.unsqueeze(0)?)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Projected audio of one or more encoder windows (1, 1500, d_enc) followed by the prompt
/// text after the audio: the part of a clip's prompt that follows the shared prefix.
pub fn clip_rest(
    llm: &impl LanguageModel,
    projector: &Projector,
    encoded: &[Tensor],
    after: &[u32],
) -> Result<Tensor> {
    let windows = encoded
        .iter()
        .map(|e| projector.forward(e))
        .collect::<Result<Vec<_>>>()?;
    prompt_embeddings(llm, &[], &Tensor::cat(&windows, 1)?, after)
}

/// The keys and values of the prompt text before the audio, computed once and reused for
/// every clip that shares it.
pub struct PromptPrefix {
    pub ids: Vec<u32>,
    cache: KvCache,
}

impl PromptPrefix {
    pub fn new(llm: &impl LanguageModel, ids: &[u32]) -> Result<Self> {
        let mut cache = llm.new_cache();
        if !ids.is_empty() {
            let x = llm.embed(&Tensor::new(ids, llm.device())?.unsqueeze(0)?)?;
            llm.forward(
                &x,
                0,
                Some(&mut cache),
                LogitsAt::Last,
                NonFiniteTrace::default(),
            )?;
        }
        Ok(Self {
            ids: ids.to_vec(),
            cache,
        })
    }
}

/// One clip to caption.
pub struct CaptionRequest {
    /// What follows the prefix: projected audio and the prompt after it, (1, L, hidden).
    pub rest: Tensor,
    pub sampler: Sampler,
    pub max_tokens: usize,
    /// The caption ends before the first of these (empty strings are ignored).
    pub stop_strings: Vec<String>,
}

/// Why a caption ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Eos,
    StopString,
    MaxTokens,
}

#[derive(Debug, Clone)]
pub struct Caption {
    /// Generated ids (without EOS; up to and including the token that completed a stop
    /// string).
    pub ids: Vec<u32>,
    /// The decoded ids, cut before the first stop string.
    pub text: String,
    pub finish: Finish,
    /// From the start of the batch to the first token, and to the last.
    pub first_token: Duration,
    pub done: Duration,
}

/// Text of `ids` cut before the earliest stop string; whether one was found.
fn cut_at_stop(text: &mut String, stops: &[String]) -> bool {
    let first = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min();
    if let Some(i) = first {
        text.truncate(i);
    }
    first.is_some()
}

/// Row state while a batch decodes.
struct Row {
    request: usize,
    /// The position of this row's next input.
    next_pos: usize,
    ids: Vec<u32>,
    text: String,
    first_token: Option<Duration>,
}

/// Captions every request after `prefix` in one batch. `on_text(i, text)` is called after
/// each new token of request `i` with its caption so far (cut at any stop string), for
/// streaming. `eos: None` never stops at EOS (benchmarks).
pub fn caption_batch(
    llm: &impl LanguageModel,
    tokenizer: &ChatTokenizer,
    prefix: &PromptPrefix,
    eos: Option<u32>,
    mut requests: Vec<CaptionRequest>,
    mut on_text: impl FnMut(usize, &str),
) -> Result<Vec<Caption>> {
    let started = Instant::now();
    let n = requests.len();
    let mut out: Vec<Option<Caption>> = vec![None; n];
    let p = prefix.ids.len();
    let mut rows = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        if r.max_tokens == 0 {
            out[i] = Some(Caption {
                ids: Vec::new(),
                text: String::new(),
                finish: Finish::MaxTokens,
                first_token: Duration::ZERO,
                done: Duration::ZERO,
            });
        } else {
            rows.push(i);
        }
    }
    if rows.is_empty() {
        return Ok(out.into_iter().map(|c| c.expect("set")).collect());
    }
    // Left-pad the rests to a common length; padding slots are zeros and masked.
    let lens: Vec<usize> = rows
        .iter()
        .map(|&i| requests[i].rest.dim(1))
        .collect::<candle_core::Result<_>>()?;
    let longest = *lens.iter().max().expect("non-empty");
    let mut parts = Vec::with_capacity(rows.len());
    let mut slots: Vec<Vec<Option<usize>>> = Vec::with_capacity(rows.len());
    for (&i, &len) in rows.iter().zip(&lens) {
        let rest = &requests[i].rest;
        let (_, _, hidden) = rest.dims3()?;
        let pad = longest - len;
        parts.push(if pad == 0 {
            rest.clone()
        } else {
            let zeros = Tensor::zeros((1, pad, hidden), rest.dtype(), rest.device())?;
            Tensor::cat(&[&zeros, rest], 1)?
        });
        let mut s: Vec<Option<usize>> = (0..p).map(Some).collect();
        s.extend(std::iter::repeat_n(None, pad));
        s.extend((p..p + len).map(Some));
        slots.push(s);
    }
    // Inference only: detached from the projector's parameters, so no activation is kept
    // alive for a backward pass that never comes (that held gigabytes per batch).
    let mut embeds = Tensor::cat(&parts, 0)?.detach();
    let mut cache = prefix.cache.select_rows(&vec![0; rows.len()])?;
    let mut state: Vec<Row> = rows
        .iter()
        .zip(&lens)
        .map(|(&i, &len)| Row {
            request: i,
            next_pos: p + len,
            ids: Vec::new(),
            text: String::new(),
            first_token: None,
        })
        .collect();
    let device = llm.device().clone();
    let mut step = 0;
    loop {
        let logits = llm.forward_padded(&embeds, &slots, &mut cache, NonFiniteTrace::default())?;
        let logits = logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut keep = Vec::with_capacity(state.len());
        let mut next_ids = Vec::with_capacity(state.len());
        for (b, (row, logits)) in state.iter_mut().zip(&logits).enumerate() {
            if logits.iter().any(|v| !v.is_finite()) {
                return Err(ModelError::NonFiniteActivation {
                    layer: format!("llm logits at generation step {step}"),
                    detail: "rerun with --trace-nonfinite to find the first layer".into(),
                });
            }
            let request = &mut requests[row.request];
            let next = request.sampler.sample(logits);
            row.first_token.get_or_insert_with(|| started.elapsed());
            let finish = if Some(next) == eos {
                Some(Finish::Eos)
            } else {
                row.ids.push(next);
                row.text = tokenizer.decode(&row.ids)?;
                if cut_at_stop(&mut row.text, &request.stop_strings) {
                    Some(Finish::StopString)
                } else {
                    on_text(row.request, &row.text);
                    (row.ids.len() >= request.max_tokens).then_some(Finish::MaxTokens)
                }
            };
            match finish {
                Some(finish) => {
                    out[row.request] = Some(Caption {
                        ids: std::mem::take(&mut row.ids),
                        text: std::mem::take(&mut row.text),
                        finish,
                        first_token: row.first_token.unwrap_or_default(),
                        done: started.elapsed(),
                    });
                }
                None => {
                    keep.push(b);
                    next_ids.push(next);
                }
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < state.len() {
            cache = cache.select_rows(&keep)?;
            let mut old_state: Vec<Option<Row>> = state.into_iter().map(Some).collect();
            let old_slots = std::mem::take(&mut slots);
            state = keep
                .iter()
                .map(|&b| old_state[b].take().expect("kept once"))
                .collect();
            slots = keep.iter().map(|&b| old_slots[b].clone()).collect();
        }
        for (row, s) in state.iter_mut().zip(&mut slots) {
            s.push(Some(row.next_pos));
            row.next_pos += 1;
        }
        let ids = Tensor::from_vec(next_ids, (state.len(), 1), &device)?;
        embeds = llm.embed(&ids)?;
        step += 1;
    }
    Ok(out
        .into_iter()
        .map(|c| c.expect("every row finishes"))
        .collect())
}

/// Caption encoded audio after `prefix` (one clip, no streaming): a batch of one.
#[allow(clippy::too_many_arguments)]
pub fn caption_clip(
    llm: &impl LanguageModel,
    tokenizer: &ChatTokenizer,
    projector: &Projector,
    prefix: &PromptPrefix,
    after: &[u32],
    encoded: &[Tensor],
    stop_strings: &[String],
    max_tokens: usize,
    sampler: Sampler,
) -> Result<String> {
    let request = CaptionRequest {
        rest: clip_rest(llm, projector, encoded, after)?,
        sampler,
        max_tokens,
        stop_strings: stop_strings.to_vec(),
    };
    let mut captions = caption_batch(
        llm,
        tokenizer,
        prefix,
        tokenizer.special.eos,
        vec![request],
        |_, _| {},
    )?;
    Ok(captions.remove(0).text)
}

/// The write-up's sampler, kept as a reference and a benchmark baseline: every new token
/// re-runs the whole sequence, without a KV cache. Returns the generated ids.
pub fn caption_without_cache(
    llm: &impl LanguageModel,
    prompt: &Tensor,
    eos: Option<u32>,
    max_tokens: usize,
    sampler: &mut Sampler,
) -> Result<Vec<u32>> {
    let device = llm.device().clone();
    let mut seq = prompt.detach();
    let mut ids = Vec::new();
    while ids.len() < max_tokens {
        let logits = llm.forward(&seq, 0, None, LogitsAt::Last, NonFiniteTrace::default())?;
        let row = logits
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let next = sampler.sample(&row);
        if Some(next) == eos {
            break;
        }
        ids.push(next);
        let e = llm.embed(&Tensor::new(&[next], &device)?.unsqueeze(0)?)?;
        seq = Tensor::cat(&[&seq, &e], 1)?;
    }
    Ok(ids)
}
