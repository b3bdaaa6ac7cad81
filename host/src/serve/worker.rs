//! The one thread that owns the models: it takes checked requests from a bounded queue and
//! answers them through [`Captioner`] (the same path as `earshot caption`) with continuous
//! batching: a request joins the running decode loop at the next step and leaves it when
//! done, its answer, or its growing text when streamed, sent back to its handler.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::api::{cut_at_stops, ApiError, ChatJob, FinishReason, StreamText, Usage};
use super::metrics::Metrics;
use crate::caption::{
    CaptionError, CaptionEvent, CaptionFeed, CaptionItem, CaptionSettings, Captioner, ItemOutcome,
    LongAudio, Span,
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

/// One request's streamed text while it decodes.
#[derive(Default)]
struct ItemStream {
    stream: StreamText,
    done_lines: Vec<String>,
    label: String,
}

/// A request the worker took: what it needs to answer it.
struct InFlight {
    chat: ChatJob,
    metadata: Vec<(String, String)>,
    events: UnboundedSender<WorkerEvent>,
    cancelled: Arc<AtomicBool>,
    stream: ItemStream,
    started: Instant,
}

/// The queue as the captioner's feed: requests taken as room frees, their progress streamed
/// to their handlers and their answers sent.
struct Feed<'a> {
    jobs: &'a std::sync::mpsc::Receiver<WorkerJob>,
    in_flight: std::collections::HashMap<usize, InFlight>,
    next_id: usize,
    stream_post: &'a mut Option<PostProcessor>,
    metrics: &'a Metrics,
}

impl Worker {
    /// Answers jobs until every sender is gone, up to `max_batch` captions decoding together:
    /// a job that arrives while others decode joins their decode loop at the next step
    /// (continuous batching), whatever its sampling settings, and leaves it when done.
    pub fn run(mut self, jobs: std::sync::mpsc::Receiver<WorkerJob>, max_batch: usize) {
        let mut feed = Feed {
            jobs: &jobs,
            in_flight: Default::default(),
            next_id: 0,
            stream_post: &mut self.stream_post,
            metrics: &self.metrics,
        };
        loop {
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.captioner.caption_continuously(max_batch, &mut feed)
            }));
            let failure = match run {
                Ok(Ok(())) => return,
                Ok(Err(e)) => format!("captioning failed: {e:#}"),
                Err(_) => "the model failed on this request (a bug: please report it)".into(),
            };
            // Whatever was in flight fails; the worker takes the next jobs afresh.
            let e = ApiError::status(
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                failure,
            );
            for (_, job) in feed.in_flight.drain() {
                let _ = job.events.send(WorkerEvent::Failed(e.clone()));
            }
            self.metrics.busy.store(0, Ordering::Relaxed);
        }
    }
}

impl Feed<'_> {
    /// A job as a caption item with its settings; None for a job whose client is gone.
    fn admit(&mut self, job: WorkerJob) -> Option<(usize, CaptionItem, CaptionSettings)> {
        self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        if job.cancelled.load(Ordering::Relaxed) || job.events.is_closed() {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        let settings = CaptionSettings {
            max_tokens: job.chat.max_tokens,
            batch_size: 1,
            sampling: SamplingParams {
                temperature: job.chat.temperature,
                top_k: None,
                top_p: job.chat.top_p,
                seed: job.chat.seed,
            },
            long_audio: LongAudio::PerWindow,
        };
        let mut metadata = Vec::new();
        if let Some(text) = &job.chat.text {
            // The first-party templates take per-example `instruction` as the question.
            metadata.push(("instruction".to_string(), text.clone()));
        }
        let item = CaptionItem::samples(&format!("request {id}"), job.samples, metadata.clone());
        self.in_flight.insert(
            id,
            InFlight {
                chat: job.chat,
                metadata,
                events: job.events,
                cancelled: job.cancelled,
                stream: ItemStream::default(),
                started: Instant::now(),
            },
        );
        Some((id, item, settings))
    }

    /// A streamed request's growing text: what the answer would be if it ended here (cut to
    /// whole words when a post-processor may still change the last one), sent as a delta.
    fn partial(&mut self, id: usize, text: &str) {
        let Some(job) = self.in_flight.get_mut(&id) else {
            return;
        };
        if !job.chat.stream {
            return;
        }
        let shown = match self.stream_post.as_mut() {
            Some(p) => match p.process(text, &[], &job.metadata) {
                Ok(t) => match t.rfind(char::is_whitespace) {
                    Some(at) => t[..at].to_string(),
                    None => String::new(),
                },
                Err(_) => return,
            },
            None => text.to_string(),
        };
        let s = &mut job.stream;
        let mut so_far = s.done_lines.join("\n");
        if !so_far.is_empty() {
            so_far.push('\n');
        }
        so_far.push_str(&s.label);
        so_far.push_str(&shown);
        let hold = job
            .chat
            .stop
            .iter()
            .map(|x| x.chars().count())
            .max()
            .unwrap_or(0);
        if let Some(d) = s.stream.grow(&so_far, hold) {
            let _ = job.events.send(WorkerEvent::Delta(d));
        }
    }
}

impl CaptionFeed for Feed<'_> {
    fn take(
        &mut self,
        room: usize,
        wait: bool,
    ) -> Option<Vec<(usize, CaptionItem, CaptionSettings)>> {
        let mut taken = Vec::new();
        if wait {
            self.metrics.busy.store(0, Ordering::Relaxed);
            // Blocks until a job comes; every sender gone ends the worker.
            let job = self.jobs.recv().ok()?;
            taken.extend(self.admit(job));
        }
        while taken.len() < room {
            match self.jobs.try_recv() {
                Ok(job) => taken.extend(self.admit(job)),
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                // Every sender gone: no job will come again.
                Err(std::sync::mpsc::TryRecvError::Disconnected) if taken.is_empty() => {
                    return None
                }
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
            }
        }
        if !taken.is_empty() {
            self.metrics.busy.store(1, Ordering::Relaxed);
            self.metrics.observe_join(taken.len(), self.in_flight.len());
        }
        Some(taken)
    }

    fn cancelled(&self, id: usize) -> bool {
        self.in_flight
            .get(&id)
            .is_none_or(|j| j.cancelled.load(Ordering::Relaxed) || j.events.is_closed())
    }

    fn event(&mut self, event: CaptionEvent) {
        match event {
            CaptionEvent::Started {
                item,
                span,
                windows,
            } => {
                if let Some(job) = self.in_flight.get_mut(&item) {
                    job.stream.label = span
                        .filter(|_| windows > 1)
                        .map(window_label)
                        .unwrap_or_default();
                }
            }
            CaptionEvent::Partial { item, text } => self.partial(item, text),
            CaptionEvent::Finished { item, result } => {
                if let (Some(job), Ok(c)) = (self.in_flight.get_mut(&item), result) {
                    let line = format!("{}{}", job.stream.label, c.text);
                    job.stream.done_lines.push(line);
                }
            }
        }
    }

    fn done(&mut self, id: usize, outcome: ItemOutcome) {
        let Some(mut job) = self.in_flight.remove(&id) else {
            return;
        };
        self.metrics.observe_decoding(self.in_flight.len());
        if outcome
            .as_ref()
            .is_ok_and(|c| c.iter().any(|w| w.finish == Finish::Cancelled))
        {
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        let event = finish_one(outcome, &job.chat, &mut job.stream.stream, &job.events)
            .unwrap_or_else(WorkerEvent::Failed);
        if let WorkerEvent::Done { usage, .. } = &event {
            self.metrics
                .completion_tokens
                .fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
            self.metrics
                .observe_generation(job.started.elapsed().as_secs_f64());
        }
        let _ = job.events.send(event);
    }
}

/// One request's answer from its captions: window lines joined, cut at its stop strings,
/// its finish reason and usage; a streamed answer's last delta sent.
fn finish_one(
    result: ItemOutcome,
    chat: &ChatJob,
    stream: &mut StreamText,
    events: &UnboundedSender<WorkerEvent>,
) -> Result<WorkerEvent, ApiError> {
    let captions = match result {
        Ok(c) => c,
        Err(e @ CaptionError::BeyondContext { .. }) => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("the audio and max_tokens do not fit the model: {e}"),
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
