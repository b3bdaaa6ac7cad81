//! The one thread that owns the models: it takes checked requests from a bounded queue and
//! answers them through [`Captioner`] (the same path as `earshot caption`), requests waiting
//! together with the same decoding settings in one decode loop, sending each answer, or its
//! growing text when streamed, back to its handler.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::api::{cut_at_stops, ApiError, ChatJob, FinishReason, StreamText, Usage};
use super::metrics::Metrics;
use crate::caption::{
    CaptionEvent, CaptionItem, CaptionSettings, Captioner, LongAudio, Span, WindowCaption,
};
use crate::models::llm::Finish;
use crate::plugins::PostProcessor;
use crate::sampler::SamplingParams;

/// A request ready for the model: its checked fields and its decoded audio.
pub struct WorkerJob {
    pub chat: ChatJob,
    /// 16 kHz mono, every audio part in order.
    pub samples: Vec<f32>,
    pub events: UnboundedSender<WorkerEvent>,
    /// Set by the handler when its client is gone or its deadline passed: a job still
    /// queued is then dropped unanswered.
    pub cancelled: Arc<AtomicBool>,
}

/// What the worker sends back for a job.
#[derive(Debug)]
pub enum WorkerEvent {
    /// More of the answer (streamed requests only).
    Delta(String),
    Done {
        text: String,
        finish: FinishReason,
        usage: Usage,
        /// Each window's span and text (one window, without a span, up to 30 s of audio).
        segments: Vec<(Option<Span>, String)>,
    },
    Failed(ApiError),
}

/// The models and the stream-side post-processor.
pub struct Worker {
    pub captioner: Captioner,
    /// A second instance of the run's post-processor, applied to the growing text of a
    /// streamed answer (the captioner's own applies it to the finished one).
    pub stream_post: Option<PostProcessor>,
    pub metrics: Arc<Metrics>,
}

/// The label of a window's line when an answer has several windows (audio over 30 s).
fn window_label((start, end): Span) -> String {
    format!("[{start:.1}-{end:.1} s] ")
}

/// Requests whose decoding settings match can share a decode loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchKey {
    max_tokens: usize,
    temperature: u32,
    top_p: Option<u32>,
    seed: u64,
}

fn batch_key(chat: &ChatJob) -> BatchKey {
    let greedy = chat.temperature == 0.0;
    BatchKey {
        max_tokens: chat.max_tokens,
        temperature: chat.temperature.to_bits(),
        // Greedy decoding reads neither top_p nor the seed.
        top_p: chat.top_p.filter(|_| !greedy).map(f32::to_bits),
        seed: if greedy { 0 } else { chat.seed },
    }
}

/// One request's streamed text while its batch decodes.
#[derive(Default)]
struct ItemStream {
    stream: StreamText,
    done_lines: Vec<String>,
    label: String,
}

impl Worker {
    /// Answers jobs until every sender is gone. Jobs waiting together with the same decoding
    /// settings (greedy ones always match) are answered together, up to `max_batch`, in one
    /// decode loop; the others wait for the next round, in arrival order.
    pub fn run(mut self, jobs: std::sync::mpsc::Receiver<WorkerJob>, max_batch: usize) {
        let mut pending: std::collections::VecDeque<WorkerJob> = Default::default();
        loop {
            if pending.is_empty() {
                match jobs.recv() {
                    Ok(job) => pending.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                pending.push_back(job);
            }
            let key = batch_key(&pending[0].chat);
            let mut batch = Vec::new();
            let mut rest = std::collections::VecDeque::new();
            for job in pending.drain(..) {
                if batch.len() < max_batch.max(1) && batch_key(&job.chat) == key {
                    batch.push(job);
                } else {
                    rest.push_back(job);
                }
            }
            pending = rest;
            self.metrics
                .queued
                .fetch_sub(batch.len() as u64, Ordering::Relaxed);
            batch.retain(|job| !job.cancelled.load(Ordering::Relaxed) && !job.events.is_closed());
            if batch.is_empty() {
                continue;
            }
            self.metrics.busy.store(1, Ordering::Relaxed);
            self.metrics.observe_batch(batch.len());
            let started = Instant::now();
            let senders: Vec<_> = batch.iter().map(|j| j.events.clone()).collect();
            let answers =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.answer_batch(batch)));
            let answers = match answers {
                Ok(a) => a,
                Err(_) => (0..senders.len())
                    .map(|_| {
                        WorkerEvent::Failed(ApiError::status(
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            "server_error",
                            "the model failed on this request (a bug: please report it)",
                        ))
                    })
                    .collect(),
            };
            let seconds = started.elapsed().as_secs_f64();
            for (event, events) in answers.into_iter().zip(senders) {
                if let WorkerEvent::Done { usage, .. } = &event {
                    self.metrics
                        .completion_tokens
                        .fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
                    self.metrics.observe_generation(seconds);
                }
                let _ = events.send(event);
            }
            self.metrics.busy.store(0, Ordering::Relaxed);
        }
    }

    /// Answers jobs that share their decoding settings, in one decode loop: one event each.
    fn answer_batch(&mut self, jobs: Vec<WorkerJob>) -> Vec<WorkerEvent> {
        let first = &jobs[0].chat;
        let settings = CaptionSettings {
            max_tokens: first.max_tokens,
            batch_size: jobs.len(),
            sampling: SamplingParams {
                temperature: first.temperature,
                top_k: None,
                top_p: first.top_p,
                seed: first.seed,
            },
            long_audio: LongAudio::PerWindow,
        };
        let mut metadata = Vec::new();
        let mut items = Vec::new();
        let mut chats = Vec::new();
        let mut senders = Vec::new();
        let mut cancel_flags = Vec::new();
        for (k, job) in jobs.into_iter().enumerate() {
            let mut meta = Vec::new();
            if let Some(text) = &job.chat.text {
                // The first-party templates take per-example `instruction` as the question.
                meta.push(("instruction".to_string(), text.clone()));
            }
            items.push(CaptionItem::samples(
                &format!("request {k}"),
                job.samples,
                meta.clone(),
            ));
            metadata.push(meta);
            senders.push(job.events);
            cancel_flags.push(job.cancelled);
            chats.push(job.chat);
        }
        let mut streams: Vec<ItemStream> =
            (0..items.len()).map(|_| ItemStream::default()).collect();
        // A request whose client went away (its handler or stream dropped) stops decoding
        // at the next step; the rest of the batch goes on.
        let gone: Vec<_> = cancel_flags.clone();
        let cancelled = |item: usize| gone[item].load(Ordering::Relaxed);
        let post = &mut self.stream_post;
        let results =
            self.captioner
                .caption_streaming_batched(
                    &items,
                    &settings,
                    &cancelled,
                    &mut |event| match event {
                        CaptionEvent::Started {
                            item,
                            span,
                            windows,
                        } => {
                            streams[item].label = span
                                .filter(|_| windows > 1)
                                .map(window_label)
                                .unwrap_or_default();
                        }
                        CaptionEvent::Partial { item, text } => {
                            if !chats[item].stream {
                                return;
                            }
                            // What the answer would be if it ended here, cut to whole words when a
                            // post-processor may still change the last one.
                            let shown = match post.as_mut() {
                                Some(p) => match p.process(text, &[], &metadata[item]) {
                                    Ok(t) => match t.rfind(char::is_whitespace) {
                                        Some(at) => t[..at].to_string(),
                                        None => String::new(),
                                    },
                                    Err(_) => return,
                                },
                                None => text.to_string(),
                            };
                            let s = &mut streams[item];
                            let mut so_far = s.done_lines.join("\n");
                            if !so_far.is_empty() {
                                so_far.push('\n');
                            }
                            so_far.push_str(&s.label);
                            so_far.push_str(&shown);
                            let hold = chats[item]
                                .stop
                                .iter()
                                .map(|x| x.chars().count())
                                .max()
                                .unwrap_or(0);
                            if let Some(d) = s.stream.grow(&so_far, hold) {
                                let _ = senders[item].send(WorkerEvent::Delta(d));
                            }
                        }
                        CaptionEvent::Finished { item, result } => {
                            if let Ok(c) = result {
                                let s = &mut streams[item];
                                let line = format!("{}{}", s.label, c.text);
                                s.done_lines.push(line);
                            }
                        }
                    },
                );
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                let e = ApiError::status(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    format!("captioning failed: {e:#}"),
                );
                return chats
                    .iter()
                    .map(|_| WorkerEvent::Failed(e.clone()))
                    .collect();
            }
        };
        let cancelled_here = results
            .iter()
            .filter(|r| {
                r.as_ref()
                    .is_ok_and(|c| c.iter().any(|w| w.finish == Finish::Cancelled))
            })
            .count();
        self.metrics
            .cancelled
            .fetch_add(cancelled_here as u64, Ordering::Relaxed);
        results
            .into_iter()
            .zip(chats)
            .zip(streams)
            .zip(senders)
            .map(|(((result, chat), mut stream), events)| {
                finish_one(result, &chat, &mut stream.stream, &events)
                    .unwrap_or_else(WorkerEvent::Failed)
            })
            .collect()
    }
}

/// One request's answer from its captions: window lines joined, cut at its stop strings,
/// its finish reason and usage; a streamed answer's last delta sent.
fn finish_one(
    result: std::result::Result<Vec<WindowCaption>, String>,
    chat: &ChatJob,
    stream: &mut StreamText,
    events: &UnboundedSender<WorkerEvent>,
) -> Result<WorkerEvent, ApiError> {
    let captions = match result {
        Ok(c) => c,
        Err(msg) if msg.contains("exceed the LLM's context") => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("the audio and max_tokens do not fit the model: {msg}"),
            ))
        }
        Err(msg) => {
            return Err(ApiError::status(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("the request could not be answered: {msg}"),
            ))
        }
    };
    let several = captions.len() > 1;
    let text = captions
        .iter()
        .map(|c| match c.span.filter(|_| several) {
            Some(span) => format!("{}{}", window_label(span), c.text),
            None => c.text.clone(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let (text, stopped) = cut_at_stops(&text, &chat.stop);
    let length = captions
        .iter()
        .any(|c| matches!(c.finish, Finish::MaxTokens | Finish::Context));
    let finish = if length && !stopped {
        FinishReason::Length
    } else {
        FinishReason::Stop
    };
    let usage = Usage {
        prompt_tokens: captions.iter().map(|c| c.prompt_positions).sum(),
        completion_tokens: captions.iter().map(|c| c.tokens).sum(),
    };
    if chat.stream {
        match stream.finish(&text) {
            Ok(rest) if !rest.is_empty() => {
                let _ = events.send(WorkerEvent::Delta(rest));
            }
            Ok(_) => {}
            Err(sent) => tracing::warn!(
                "a streamed answer's last text ({:?}) does not extend what was sent ({:?}); \
                 the stream ends with what was sent",
                text,
                sent
            ),
        }
    }
    let segments = captions.iter().map(|c| (c.span, c.text.clone())).collect();
    Ok(WorkerEvent::Done {
        text,
        finish,
        usage,
        segments,
    })
}
