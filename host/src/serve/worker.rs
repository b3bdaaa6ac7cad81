//! The one thread that owns the models: it takes checked requests from a bounded queue and
//! answers each through [`Captioner`] (the same path as `earshot caption`), sending the
//! answer, or its growing text when streamed, back to the request's handler.

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

impl Worker {
    /// Answers jobs until every sender is gone.
    pub fn run(mut self, jobs: std::sync::mpsc::Receiver<WorkerJob>) {
        while let Ok(job) = jobs.recv() {
            self.metrics.queued.fetch_sub(1, Ordering::Relaxed);
            if job.cancelled.load(Ordering::Relaxed) || job.events.is_closed() {
                continue;
            }
            self.metrics.busy.store(1, Ordering::Relaxed);
            let started = Instant::now();
            let events = job.events.clone();
            let answer =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.answer(job)));
            let event = match answer {
                Ok(Ok(done)) => done,
                Ok(Err(e)) => WorkerEvent::Failed(e),
                Err(_) => WorkerEvent::Failed(ApiError::status(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "the model failed on this request (a bug: please report it)",
                )),
            };
            if let WorkerEvent::Done { usage, .. } = &event {
                self.metrics
                    .completion_tokens
                    .fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
                self.metrics
                    .observe_generation(started.elapsed().as_secs_f64());
            }
            let _ = events.send(event);
            self.metrics.busy.store(0, Ordering::Relaxed);
        }
    }

    fn answer(&mut self, job: WorkerJob) -> Result<WorkerEvent, ApiError> {
        let chat = &job.chat;
        let mut metadata = Vec::new();
        if let Some(text) = &chat.text {
            // The first-party templates take per-example `instruction` as the question.
            metadata.push(("instruction".to_string(), text.clone()));
        }
        let item = CaptionItem::samples("request", job.samples, metadata.clone());
        let settings = CaptionSettings {
            max_tokens: chat.max_tokens,
            batch_size: 1,
            sampling: SamplingParams {
                temperature: chat.temperature,
                top_k: None,
                top_p: chat.top_p,
                seed: chat.seed,
            },
            long_audio: LongAudio::PerWindow,
        };
        let hold = chat
            .stop
            .iter()
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0);
        let mut stream = StreamText::default();
        let mut done_lines: Vec<String> = Vec::new();
        let mut label = String::new();
        let mut several = false;
        let post = &mut self.stream_post;
        let events = &job.events;
        let streamed = chat.stream;
        let results = self
            .captioner
            .caption(&[item], &settings, streamed, &mut |event| {
                if !streamed {
                    return;
                }
                match event {
                    CaptionEvent::Started { span, windows, .. } => {
                        several = windows > 1;
                        label = span
                            .filter(|_| several)
                            .map(window_label)
                            .unwrap_or_default();
                    }
                    CaptionEvent::Partial { text, .. } => {
                        // What the answer would be if it ended here, cut to whole words when a
                        // post-processor may still change the last one.
                        let shown = match post.as_mut() {
                            Some(p) => match p.process(text, &[], &metadata) {
                                Ok(t) => match t.rfind(char::is_whitespace) {
                                    Some(at) => t[..at].to_string(),
                                    None => String::new(),
                                },
                                Err(_) => return,
                            },
                            None => text.to_string(),
                        };
                        let mut so_far = done_lines.join("\n");
                        if !so_far.is_empty() {
                            so_far.push('\n');
                        }
                        so_far.push_str(&label);
                        so_far.push_str(&shown);
                        if let Some(d) = stream.grow(&so_far, hold) {
                            let _ = events.send(WorkerEvent::Delta(d));
                        }
                    }
                    CaptionEvent::Finished { result, .. } => {
                        if let Ok(c) = result {
                            done_lines.push(format!("{label}{}", c.text));
                        }
                    }
                }
            })
            .map_err(|e| {
                ApiError::status(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    format!("captioning failed: {e:#}"),
                )
            })?;
        let captions: Vec<WindowCaption> = match results.into_iter().next() {
            Some(Ok(c)) => c,
            Some(Err(msg)) if msg.contains("exceed the LLM's context") => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!("the audio and max_tokens do not fit the model: {msg}"),
                ))
            }
            Some(Err(msg)) => {
                return Err(ApiError::status(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    format!("the request could not be answered: {msg}"),
                ))
            }
            None => Vec::new(),
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
        if streamed {
            match stream.finish(&text) {
                Ok(rest) if !rest.is_empty() => {
                    let _ = job.events.send(WorkerEvent::Delta(rest));
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
}
