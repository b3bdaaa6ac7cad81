//! The one decode loop: a batch of prompts that continue a shared prefix, decoded with a KV
//! cache one token per step until EOS, a stop string or the token limit; greedy or sampled
//! per row. `generate`, captioning and evaluation all decode through [`decode_batch`].
//!
//! The rows' prompts (what follows the prefix) may differ in length: they are left-padded,
//! with per-row positions and a mask that hides the padding, so every row sees exactly what
//! it would see alone. Rows that finish drop out of the batch.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::{ChatTokenizer, KvCache, LanguageModel};
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::weights::{ModelError, Result};
use crate::sampler::Sampler;

/// One prompt to continue.
pub struct DecodeRequest {
    /// What follows the prefix (e.g. projected audio and the prompt after it), (1, L, hidden).
    pub rest: Tensor,
    pub sampler: Sampler,
    pub max_tokens: usize,
    /// The output ends before the first of these (empty strings are ignored; needs text).
    pub stop_strings: Vec<String>,
}

/// Why a decode ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Eos,
    StopString,
    MaxTokens,
    /// The next token would not fit the model's context.
    Context,
    /// Its caller no longer wants it (`DecodeOptions::cancelled`): what it has so far.
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct Decoded {
    /// Generated ids (without EOS; up to and including the token that completed a stop
    /// string).
    pub ids: Vec<u32>,
    /// The decoded ids, cut before the first stop string (empty without a tokenizer).
    pub text: String,
    pub finish: Finish,
    /// From the start of the batch to the first token, and to the last.
    pub first_token: Duration,
    pub done: Duration,
}

/// What the loop needs besides the requests.
pub struct DecodeOptions<'a> {
    /// Decodes text for stop strings and streaming; without it there is neither.
    pub tokenizer: Option<&'a ChatTokenizer>,
    /// `None` never stops at EOS (benchmarks).
    pub eos: Option<u32>,
    pub trace: NonFiniteTrace,
    /// Asked before each step for each request still decoding (by its index in `requests`):
    /// true ends it there (a server's client went away), so the others go on without it.
    pub cancelled: Option<&'a dyn Fn(usize) -> bool>,
}

/// Text cut before the earliest stop string; whether one was found.
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

/// Decodes every request after `prefix` (batch 1; copied for every row) in one batch.
/// `on_text(i, text)` is called after each new token of request `i` with its text so far
/// (cut at any stop string), for streaming. The samplers' states advance in `requests`.
pub fn decode_batch(
    llm: &impl LanguageModel,
    prefix: &KvCache,
    requests: &mut [DecodeRequest],
    options: &DecodeOptions,
    mut on_text: impl FnMut(usize, &str),
) -> Result<Vec<Decoded>> {
    let _span = tracing::debug_span!("decode loop", rows = requests.len()).entered();
    let started = Instant::now();
    let mut out: Vec<Option<Decoded>> = vec![None; requests.len()];
    let live: Vec<usize> = (0..requests.len())
        .filter(|&i| requests[i].max_tokens > 0)
        .collect();
    for (i, slot) in out.iter_mut().enumerate() {
        if requests[i].max_tokens == 0 {
            *slot = Some(finished(
                Vec::new(),
                String::new(),
                Finish::MaxTokens,
                None,
                started,
            ));
        }
    }
    if !live.is_empty() {
        // Per row, the slots its cache holds (None: padding); kept beside the rows because
        // the forward takes them for the whole batch.
        let (mut embeds, mut state, mut slots) = left_padded(prefix.len(), requests, &live)?;
        let mut cache = prefix.select_rows(&vec![0; live.len()])?;
        let device = llm.device().clone();
        let mut step = 0;
        loop {
            let logits = llm.forward_padded(&embeds, &slots, &mut cache, options.trace)?;
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
                if options.cancelled.is_some_and(|c| c(row.request)) {
                    let ids = std::mem::take(&mut row.ids);
                    let text = std::mem::take(&mut row.text);
                    out[row.request] = Some(finished(
                        ids,
                        text,
                        Finish::Cancelled,
                        row.first_token,
                        started,
                    ));
                    continue;
                }
                let request = &mut requests[row.request];
                let next = request.sampler.sample(logits);
                row.first_token.get_or_insert_with(|| started.elapsed());
                let finish = advance(row, request, next, options, &mut on_text)?;
                // The token just taken is fed at `next_pos`: past the context it cannot be,
                // and the caption ends there with what it has (not an error that loses it).
                let finish = finish.or_else(|| {
                    (row.next_pos >= llm.max_positions()).then(|| {
                        tracing::warn!(
                            "generation stopped at the model's context of {} positions",
                            llm.max_positions()
                        );
                        Finish::Context
                    })
                });
                match finish {
                    Some(finish) => {
                        let ids = std::mem::take(&mut row.ids);
                        let text = std::mem::take(&mut row.text);
                        out[row.request] =
                            Some(finished(ids, text, finish, row.first_token, started));
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
                let mut old: Vec<Option<(Row, Slots)>> =
                    state.into_iter().zip(slots).map(Some).collect();
                (state, slots) = keep
                    .iter()
                    .map(|&b| old[b].take().expect("kept once"))
                    .unzip();
            }
            for (row, s) in state.iter_mut().zip(&mut slots) {
                s.push(Some(row.next_pos));
                row.next_pos += 1;
            }
            embeds = llm.embed(&Tensor::from_vec(next_ids, (state.len(), 1), &device)?)?;
            step += 1;
        }
    }
    Ok(out
        .into_iter()
        .map(|c| c.expect("every row finishes"))
        .collect())
}

fn finished(
    ids: Vec<u32>,
    text: String,
    finish: Finish,
    first_token: Option<Duration>,
    started: Instant,
) -> Decoded {
    Decoded {
        ids,
        text,
        finish,
        first_token: first_token.unwrap_or_default(),
        done: started.elapsed(),
    }
}

/// Takes token `next` into `row`: whether (and why) the row is finished.
fn advance(
    row: &mut Row,
    request: &DecodeRequest,
    next: u32,
    options: &DecodeOptions,
    on_text: &mut impl FnMut(usize, &str),
) -> Result<Option<Finish>> {
    if Some(next) == options.eos {
        return Ok(Some(Finish::Eos));
    }
    row.ids.push(next);
    if let Some(tokenizer) = options.tokenizer {
        row.text = tokenizer.decode(&row.ids)?;
        if cut_at_stop(&mut row.text, &request.stop_strings) {
            return Ok(Some(Finish::StopString));
        }
        on_text(row.request, &row.text);
    }
    Ok((row.ids.len() >= request.max_tokens).then_some(Finish::MaxTokens))
}

/// The slots one row's cache holds, in order (None: padding).
type Slots = Vec<Option<usize>>;

/// The live requests' rests left-padded to a common length (padding slots are zeros and
/// masked), as one (B, L, hidden) batch after `prefix_len` cached positions; the rows'
/// state and slots.
fn left_padded(
    prefix_len: usize,
    requests: &[DecodeRequest],
    live: &[usize],
) -> Result<(Tensor, Vec<Row>, Vec<Slots>)> {
    let lens: Vec<usize> = live
        .iter()
        .map(|&i| requests[i].rest.dim(1))
        .collect::<candle_core::Result<_>>()?;
    let longest = *lens.iter().max().expect("non-empty");
    let mut parts = Vec::with_capacity(live.len());
    let mut rows = Vec::with_capacity(live.len());
    let mut all_slots = Vec::with_capacity(live.len());
    for (&i, &len) in live.iter().zip(&lens) {
        let rest = &requests[i].rest;
        let (_, _, hidden) = rest.dims3()?;
        let pad = longest - len;
        parts.push(if pad == 0 {
            rest.clone()
        } else {
            let zeros = Tensor::zeros((1, pad, hidden), rest.dtype(), rest.device())?;
            Tensor::cat(&[&zeros, rest], 1)?
        });
        let mut slots: Vec<Option<usize>> = (0..prefix_len).map(Some).collect();
        slots.extend(std::iter::repeat_n(None, pad));
        slots.extend((prefix_len..prefix_len + len).map(Some));
        all_slots.push(slots);
        rows.push(Row {
            request: i,
            next_pos: prefix_len + len,
            ids: Vec::new(),
            text: String::new(),
            first_token: None,
        });
    }
    // Inference only: detached from the projector's parameters, so no activation is kept
    // alive for a backward pass that never comes (that held gigabytes per batch).
    Ok((Tensor::cat(&parts, 0)?.detach(), rows, all_slots))
}
