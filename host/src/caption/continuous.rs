//! Continuous captioning: items arrive while others decode and join the running decode
//! batch at the next step ([`DecodeLoop`]), each with its own settings (sampling, token
//! limit), and leave it as soon as their captions are done. A server answers through this,
//! so a request never waits for a batch it did not start with.

use std::collections::{HashMap, HashSet};

use super::WindowCaption;
use super::{CaptionError, CaptionEvent, CaptionItem, CaptionSettings, Captioner, Job, Result};
use crate::models::llm::{DecodeLoop, DecodeOptions, DecodeRequest, Left};
use crate::models::nonfinite::NonFiniteTrace;
use crate::sampler::Sampler;

/// One finished item: its captions in window order, or why it failed.
pub type ItemOutcome = std::result::Result<Vec<WindowCaption>, CaptionError>;

/// Where [`Captioner::caption_continuously`] takes its items from and sends what becomes of
/// them. Items are numbered by the feed (`id`), unique among those in flight.
pub trait CaptionFeed {
    /// Items to start now, at most `room` (fewer is fine). With `wait`, nothing is decoding:
    /// block until an item comes. `None`: no item will ever come again (the run ends once
    /// what is decoding is done).
    fn take(
        &mut self,
        room: usize,
        wait: bool,
    ) -> Option<Vec<(usize, CaptionItem, CaptionSettings)>>;
    /// Asked before each step for every item decoding: true ends its captions there
    /// ([`crate::models::llm::Finish::Cancelled`]).
    fn cancelled(&self, id: usize) -> bool;
    /// Progress, by item id ([`CaptionEvent::Partial`] after every token).
    fn event(&mut self, event: CaptionEvent);
    /// An item is done: every caption of it finished, or it failed.
    fn done(&mut self, id: usize, outcome: ItemOutcome);
}

/// An item while its captions decode.
struct Pending {
    item: CaptionItem,
    /// By window; each filled when its caption leaves the batch.
    captions: Vec<Option<WindowCaption>>,
}

/// A caption decoding: its item and window.
struct RowJob {
    job: Job,
    window: usize,
}

impl Captioner {
    /// Captions items as `feed` hands them over, up to `max_rows` captions decoding together:
    /// new items are encoded and prefilled and join the running batch at the next step.
    /// One item's failure fails that item only; a failure of the batch's forward fails the
    /// items decoding then and the run goes on. Returns when the feed has no more items and
    /// nothing is decoding.
    pub fn caption_continuously(
        &mut self,
        max_rows: usize,
        feed: &mut dyn CaptionFeed,
    ) -> Result<()> {
        let max_rows = max_rows.max(1);
        let mut batch = DecodeLoop::new();
        let mut pending: HashMap<usize, Pending> = HashMap::new();
        let mut rows: HashMap<usize, RowJob> = HashMap::new();
        let mut next_row = 0usize;
        let mut open = true;
        loop {
            let room = max_rows.saturating_sub(batch.len());
            if open && room > 0 {
                match feed.take(room, batch.is_empty()) {
                    None => open = false,
                    Some(items) => {
                        for (id, item, settings) in items {
                            let joined = self.start_item(
                                id,
                                item,
                                &settings,
                                &mut batch,
                                &mut next_row,
                                feed,
                            );
                            match joined {
                                Ok(started) if started.pending.captions.is_empty() => {
                                    feed.done(id, Ok(Vec::new()))
                                }
                                Ok(started) => {
                                    pending.insert(id, started.pending);
                                    rows.extend(started.rows);
                                    self.settle(started.left, &mut rows, &mut pending, feed);
                                }
                                Err(ItemStart::Failed(e)) => feed.done(id, Err(*e)),
                                Err(ItemStart::Batch(e)) => {
                                    // The running batch's cache may be half-merged: every
                                    // item in it fails, and the loop starts afresh.
                                    fail_all(&mut pending, &mut rows, feed, &e);
                                    feed.done(id, Err(CaptionError::Decode(e)));
                                    batch = DecodeLoop::new();
                                }
                            }
                        }
                    }
                }
            }
            if batch.is_empty() {
                if !open {
                    return Ok(());
                }
                continue;
            }
            let gone: HashSet<usize> = rows
                .iter()
                .filter(|(_, r)| !pending.contains_key(&r.job.item) || feed.cancelled(r.job.item))
                .map(|(&row, _)| row)
                .collect();
            let cancelled = |row: usize| gone.contains(&row);
            let options = DecodeOptions {
                tokenizer: Some(&self.llm.tokenizer),
                eos: self.llm.tokenizer.special.eos,
                trace: NonFiniteTrace::default(),
                cancelled: Some(&cancelled),
            };
            let stepped = batch.step(&self.llm.model, &options, |row, text| {
                if let Some(r) = rows.get(&row) {
                    feed.event(CaptionEvent::Partial {
                        item: r.job.item,
                        text,
                    });
                }
            });
            match stepped {
                Ok(left) => self.settle(left, &mut rows, &mut pending, feed),
                Err(e) => {
                    fail_all(&mut pending, &mut rows, feed, &format!("{e:#}"));
                    batch = DecodeLoop::new();
                }
            }
        }
    }

    /// Prepares item `id` (audio, encoder, prompt) and joins its captions to the batch.
    fn start_item(
        &mut self,
        id: usize,
        item: CaptionItem,
        settings: &CaptionSettings,
        batch: &mut DecodeLoop,
        next_row: &mut usize,
        feed: &mut dyn CaptionFeed,
    ) -> std::result::Result<Started, ItemStart> {
        let sampler = Sampler::new(settings.sampling).map_err(|e| ItemStart::failed(e.into()))?;
        let jobs = self
            .prepare(id, &item, settings)
            .map_err(ItemStart::failed)?;
        let windows = jobs.len();
        // Every window of an item has the item's prompt, so one prefix.
        let Some(prefix) = jobs.first().map(|j| j.prefix.clone()) else {
            let pending = Pending {
                item,
                captions: Vec::new(),
            };
            return Ok(Started {
                pending,
                rows: Vec::new(),
                left: Vec::new(),
            });
        };
        let prefix = self
            .prefixes
            .get_or_compute(&self.llm.model, &prefix)
            .map_err(|e| ItemStart::failed(e.into()))?;
        let mut row_jobs = Vec::with_capacity(windows);
        let mut requests = Vec::with_capacity(windows);
        for (window, job) in jobs.into_iter().enumerate() {
            feed.event(CaptionEvent::Started {
                item: id,
                span: job.span,
                windows,
            });
            let row = *next_row;
            *next_row += 1;
            requests.push((
                row,
                DecodeRequest {
                    rest: job.rest.clone(),
                    sampler: sampler.clone(),
                    max_tokens: settings.max_tokens,
                    stop_strings: job.stop_strings.clone(),
                },
            ));
            row_jobs.push((row, RowJob { job, window }));
        }
        let options = DecodeOptions {
            tokenizer: Some(&self.llm.tokenizer),
            eos: self.llm.tokenizer.special.eos,
            trace: NonFiniteTrace::default(),
            cancelled: None,
        };
        let left = batch
            .join(&self.llm.model, &prefix, requests, &options, |_, text| {
                feed.event(CaptionEvent::Partial { item: id, text });
            })
            .map_err(|e| ItemStart::Batch(format!("{e:#}")))?;
        let pending = Pending {
            item,
            captions: (0..windows).map(|_| None).collect(),
        };
        Ok(Started {
            pending,
            rows: row_jobs,
            left,
        })
    }

    /// Post-processes the captions that left the batch; items whose captions are all done
    /// go to the feed.
    fn settle(
        &mut self,
        left: Vec<Left>,
        rows: &mut HashMap<usize, RowJob>,
        pending: &mut HashMap<usize, Pending>,
        feed: &mut dyn CaptionFeed,
    ) {
        for l in left {
            let Some(RowJob { job, window }) = rows.remove(&l.request) else {
                continue;
            };
            let Some(state) = pending.get_mut(&job.item) else {
                continue;
            };
            let result = self.finish(&job, &state.item, l.decoded);
            feed.event(CaptionEvent::Finished {
                item: job.item,
                result: &result,
            });
            match result {
                Ok(caption) => state.captions[window] = Some(caption),
                Err(e) => {
                    // One failed caption fails its item; its other windows stop at the
                    // next step (rows of items no longer pending are cancelled).
                    pending.remove(&job.item);
                    feed.done(job.item, Err(CaptionError::PostProcess(e)));
                    continue;
                }
            }
            if state.captions.iter().all(Option::is_some) {
                let state = pending.remove(&job.item).expect("present above");
                let captions = state.captions.into_iter().flatten().collect();
                feed.done(job.item, Ok(captions));
            }
        }
    }
}

/// An item that joined: its state, its rows, and those of its captions already done.
struct Started {
    pending: Pending,
    rows: Vec<(usize, RowJob)>,
    left: Vec<Left>,
}

/// Why an item could not join.
enum ItemStart {
    /// Its own problem (audio, prompt, context): it alone fails.
    Failed(Box<CaptionError>),
    /// Joining the batch failed (the model's forward): everything decoding fails.
    Batch(String),
}

impl ItemStart {
    fn failed(e: CaptionError) -> Self {
        Self::Failed(Box::new(e))
    }
}

/// Fails every item decoding (the batch's forward failed).
fn fail_all(
    pending: &mut HashMap<usize, Pending>,
    rows: &mut HashMap<usize, RowJob>,
    feed: &mut dyn CaptionFeed,
    message: &str,
) {
    rows.clear();
    for (id, _) in pending.drain() {
        feed.done(id, Err(CaptionError::Decode(message.to_string())));
    }
}
