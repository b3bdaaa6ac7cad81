//! The one decode loop: a batch of prompts that continue a shared prefix, decoded with a KV
//! cache one token per step until EOS, a stop string or the token limit; greedy or sampled
//! per row. `generate`, captioning and evaluation all decode through [`decode_batch`].
//!
//! Each row's prompt (what follows the prefix) is prefilled on its own; rows of different
//! lengths line up at the right, the shorter padded in front, with per-row positions and a
//! mask that hides the padding, so every row computes exactly what it would alone. Rows that
//! finish drop out of the batch; with [`DecodeLoop`] new rows join it between steps
//! (continuous batching).

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::{ChatTokenizer, KvCache, LanguageModel};
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::weights::{ModelError, Result};
use crate::sampler::Sampler;

/// One prompt to continue.
#[derive(Clone)]
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
    /// The caller's number for this request.
    request: usize,
    /// The position of this row's next input.
    next_pos: usize,
    ids: Vec<u32>,
    text: String,
    first_token: Option<Duration>,
    /// When it joined the loop (its times count from here).
    joined: Instant,
    /// The slots its cache holds, in order (None: padding).
    slots: Slots,
    /// The token it feeds at the next step.
    next: u32,
}

/// A request that left the loop: the request back (its sampler advanced) and its output.
pub struct Left {
    pub request: usize,
    pub decode: DecodeRequest,
    pub decoded: Decoded,
}

/// A running decode batch that requests join at step boundaries and leave when done
/// (continuous batching). Joining prefills the new rows after their prefix and takes their
/// first tokens; each [`DecodeLoop::step`] feeds every row its last token and takes the
/// next. Rows line up at the right: a row shorter than the batch starts with padding slots
/// (masked), and padding no row needs any more is dropped, so the cache holds at most the
/// longest row's slots.
pub struct DecodeLoop {
    rows: Vec<(Row, DecodeRequest)>,
    cache: Option<KvCache>,
    step: usize,
}

impl Default for DecodeLoop {
    fn default() -> Self {
        Self::new()
    }
}

impl DecodeLoop {
    pub fn new() -> Self {
        Self {
            rows: Vec::new(),
            cache: None,
            step: 0,
        }
    }

    /// Rows decoding.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Slots the running batch's cache holds per row.
    pub fn slots(&self) -> usize {
        self.cache.as_ref().map_or(0, KvCache::len)
    }

    /// Starts `requests` (numbered by the caller) after `prefix` (batch 1, shared by them):
    /// their rests are prefilled together and their first tokens taken; those that finish at
    /// once (EOS first, `max_tokens` 0 or 1, cancelled) are returned, the others join the
    /// batch. `on_text(request, text)` as in [`decode_batch`].
    pub fn join(
        &mut self,
        llm: &impl LanguageModel,
        prefix: &KvCache,
        requests: Vec<(usize, DecodeRequest)>,
        options: &DecodeOptions,
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<Left>> {
        let _span = tracing::debug_span!("decode join", rows = requests.len()).entered();
        let joined = Instant::now();
        let mut left = Vec::new();
        let mut live = Vec::new();
        for (id, request) in requests {
            if request.max_tokens == 0 {
                left.push(Left {
                    request: id,
                    decoded: finished(Vec::new(), String::new(), Finish::MaxTokens, None, joined),
                    decode: request,
                });
            } else {
                live.push((id, request));
            }
        }
        if live.is_empty() {
            return Ok(left);
        }
        // Each request is prefilled on its own: a batched prefill's matmuls have other
        // shapes, which the CPU kernels block (and so round) differently, and a sampled
        // answer would then depend on what else arrived with it. Prefill is one large
        // product per layer either way. Each row holds its prefix and rest without padding
        // between them, and padding only ever goes in front, where the attention skips it
        // per row (see `Placement::Padded`): a row's arithmetic is exactly what it is alone,
        // whoever it decodes beside.
        let mut parts: Vec<(KvCache, Vec<(Row, DecodeRequest)>)> = Vec::new();
        for (id, request) in live {
            let (embeds, row) = new_row(prefix.len(), id, &request, joined)?;
            let mut cache = prefix.select_rows(&[0])?;
            let logits = forward_rows(llm, &embeds, &[&row], &mut cache, options)?;
            match take_token(
                llm,
                row,
                request,
                &logits[0],
                options,
                &mut on_text,
                self.step,
            )? {
                Taken::Goes(row, request) => parts.push((cache, vec![(row, request)])),
                Taken::Left(l) => left.push(l),
            }
        }
        if parts.is_empty() {
            return Ok(left);
        }
        if let Some(running) = self.cache.take() {
            parts.insert(0, (running, std::mem::take(&mut self.rows)));
        }
        let len = parts.iter().map(|(c, _)| c.len()).max().unwrap_or(0);
        let caches: Vec<&KvCache> = parts.iter().map(|(c, _)| c).collect();
        let cache = if parts.len() == 1 {
            None
        } else {
            Some(KvCache::concat_rows(&caches, len)?)
        };
        let mut rows = Vec::new();
        let mut only = None;
        for (c, part_rows) in parts {
            rows.extend(part_rows);
            only = Some(c);
        }
        for (row, _) in &mut rows {
            front_pad(&mut row.slots, len);
        }
        self.cache = Some(match cache {
            Some(c) => c,
            None => only.expect("one part"),
        });
        self.rows = rows;
        Ok(left)
    }

    /// One step of every row: feeds each its last token and takes the next. Returns the rows
    /// that finished (they leave the batch).
    pub fn step(
        &mut self,
        llm: &impl LanguageModel,
        options: &DecodeOptions,
        mut on_text: impl FnMut(usize, &str),
    ) -> Result<Vec<Left>> {
        let Some(mut cache) = self.cache.take() else {
            return Ok(Vec::new());
        };
        self.step += 1;
        let _span = tracing::trace_span!("decode step", rows = self.rows.len()).entered();
        let device = llm.device().clone();
        for (row, _) in &mut self.rows {
            row.slots.push(Some(row.next_pos));
            row.next_pos += 1;
        }
        let ids: Vec<u32> = self.rows.iter().map(|(row, _)| row.next).collect();
        let embeds = llm.embed(&Tensor::from_vec(ids, (self.rows.len(), 1), &device)?)?;
        let rows: Vec<&Row> = self.rows.iter().map(|(r, _)| r).collect();
        let logits = forward_rows(llm, &embeds, &rows, &mut cache, options)?;
        let mut left = Vec::new();
        let mut keep = Vec::with_capacity(self.rows.len());
        let mut kept = Vec::with_capacity(self.rows.len());
        for (b, ((row, request), logits)) in self.rows.drain(..).zip(&logits).enumerate() {
            match take_token(llm, row, request, logits, options, &mut on_text, self.step)? {
                Taken::Goes(row, request) => {
                    keep.push(b);
                    kept.push((row, request));
                }
                Taken::Left(l) => left.push(l),
            }
        }
        self.rows = kept;
        if self.rows.is_empty() {
            return Ok(left);
        }
        if keep.len() < logits.len() {
            cache = cache.select_rows(&keep)?;
            // Leading slots that every remaining row pads are no longer needed.
            let unused = self
                .rows
                .iter()
                .map(|(r, _)| r.slots.iter().take_while(|s| s.is_none()).count())
                .min()
                .unwrap_or(0);
            if unused > 0 {
                cache = cache.drop_front(unused)?;
                for (row, _) in &mut self.rows {
                    row.slots.drain(..unused);
                }
            }
        }
        self.cache = Some(cache);
        Ok(left)
    }
}

/// `slots` with padding in front up to `len`.
fn front_pad(slots: &mut Slots, len: usize) {
    let pad = len - slots.len();
    if pad > 0 {
        slots.splice(0..0, std::iter::repeat_n(None, pad));
    }
}

/// The logits at each row's last slot, as f32 rows.
fn forward_rows<R: std::borrow::Borrow<Row>>(
    llm: &impl LanguageModel,
    embeds: &Tensor,
    rows: &[R],
    cache: &mut KvCache,
    options: &DecodeOptions,
) -> Result<Vec<Vec<f32>>> {
    let slots: Vec<Slots> = rows.iter().map(|r| r.borrow().slots.clone()).collect();
    let logits = llm.forward_padded(embeds, &slots, cache, options.trace)?;
    Ok(logits.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

enum Taken {
    Goes(Row, DecodeRequest),
    Left(Left),
}

/// Takes one row's next token from its logits: the row goes on, or leaves finished.
fn take_token(
    llm: &impl LanguageModel,
    mut row: Row,
    mut request: DecodeRequest,
    logits: &[f32],
    options: &DecodeOptions,
    on_text: &mut impl FnMut(usize, &str),
    step: usize,
) -> Result<Taken> {
    if logits.iter().any(|v| !v.is_finite()) {
        return Err(ModelError::NonFiniteActivation {
            layer: format!("llm logits at generation step {step}"),
            detail: "rerun with --trace-nonfinite to find the first layer".into(),
        });
    }
    let finish = if options.cancelled.is_some_and(|c| c(row.request)) {
        Some(Finish::Cancelled)
    } else {
        let next = request.sampler.sample(logits);
        row.first_token.get_or_insert_with(|| row.joined.elapsed());
        row.next = next;
        let finish = advance(&mut row, &request, next, options, on_text)?;
        // The token just taken is fed at `next_pos`: past the context it cannot be, and the
        // caption ends there with what it has (not an error that loses it).
        finish.or_else(|| {
            (row.next_pos >= llm.max_positions()).then(|| {
                tracing::warn!(
                    "generation stopped at the model's context of {} positions",
                    llm.max_positions()
                );
                Finish::Context
            })
        })
    };
    Ok(match finish {
        None => Taken::Goes(row, request),
        Some(finish) => Taken::Left(Left {
            request: row.request,
            decoded: finished(row.ids, row.text, finish, row.first_token, row.joined),
            decode: request,
        }),
    })
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
    let mut out: Vec<Option<Decoded>> = vec![None; requests.len()];
    let mut batch = DecodeLoop::new();
    let numbered = requests.iter().cloned().enumerate().collect();
    let mut left = batch.join(llm, prefix, numbered, options, &mut on_text)?;
    loop {
        for l in left.drain(..) {
            requests[l.request] = l.decode;
            out[l.request] = Some(l.decoded);
        }
        if batch.is_empty() {
            break;
        }
        left = batch.step(llm, options, &mut on_text)?;
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

/// A request's row after `prefix_len` cached positions, and its rest as the input of its
/// prefill.
fn new_row(
    prefix_len: usize,
    id: usize,
    request: &DecodeRequest,
    joined: Instant,
) -> Result<(Tensor, Row)> {
    let len = request.rest.dim(1)?;
    let row = Row {
        request: id,
        next_pos: prefix_len + len,
        ids: Vec::new(),
        text: String::new(),
        first_token: None,
        joined,
        slots: (0..prefix_len + len).map(Some).collect(),
        next: 0,
    };
    // Inference only: detached from the projector's parameters, so no activation is kept
    // alive for a backward pass that never comes (that held gigabytes per batch).
    Ok((request.rest.detach(), row))
}
