//! `earshot serve`: one trained run behind the OpenAI chat-completions API.
//!
//! Connections are driven by hyper's HTTP/1 server directly (header read timeout, a cap on
//! open connections, graceful shutdown), requests routed by axum. A handler reads the body
//! (size-capped, time-limited), checks it ([`api::parse_chat`]), decodes its audio on the
//! blocking pool, and hands a job to the one worker thread that owns the models through a
//! bounded queue (full: 429 with Retry-After). Answers come back as one JSON body or as
//! server-sent `chat.completion.chunk` events. Every refusal is a 4xx with an OpenAI error
//! body; nothing a client sends can crash the process or hold it forever.

pub mod api;
pub mod metrics;
pub mod worker;

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream;
use serde_json::json;

use crate::caption::Captioner;
use crate::config::RunConfig;
use crate::plugins::{PluginHost, PostProcessor};
use api::{ApiError, ChatJob, Limits};
use metrics::Metrics;
use worker::{Worker, WorkerEvent, WorkerJob};

/// What `earshot serve` was asked to serve, and how.
pub struct ServeOptions {
    pub config: RunConfig,
    pub checkpoint: Option<PathBuf>,
    pub adapter: Option<PathBuf>,
    /// The id `/v1/models` lists and requests may name.
    pub model_id: String,
    pub addr: SocketAddr,
    pub limits: Limits,
    /// Requests answered together in one decode loop, at most.
    pub max_batch: usize,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
}

struct AppState {
    jobs: std::sync::mpsc::SyncSender<WorkerJob>,
    limits: Limits,
    model_id: String,
    created: u64,
    metrics: Arc<Metrics>,
    next_id: AtomicU64,
    /// Whether the run's targets are transcripts (`/v1/audio/transcriptions` answers).
    transcription: bool,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Loads the run and serves it until SIGINT or SIGTERM.
pub fn run(options: ServeOptions) -> anyhow::Result<()> {
    let ServeOptions {
        config,
        checkpoint,
        adapter,
        model_id,
        addr,
        limits,
        max_batch,
        shutdown_grace,
    } = options;
    anyhow::ensure!(limits.queue >= 1, "--queue must be at least 1");
    anyhow::ensure!(
        limits.max_connections >= 1,
        "--max-connections must be at least 1"
    );
    let stream_post = match &config.plugins.post_processor {
        Some(p) => {
            let host = PluginHost::new(config.plugins.sandbox, PluginHost::default_cache_dir());
            Some(PostProcessor::load(&host, p)?)
        }
        None => None,
    };
    let transcription = config.data.text_targets;
    let mut captioner = Captioner::load(config, checkpoint.as_deref(), false)?;
    if let Some(dir) = &adapter {
        captioner.use_peft_adapter(dir)?;
    }
    let metrics = Arc::new(Metrics::default());
    let (jobs, queue) = std::sync::mpsc::sync_channel::<WorkerJob>(limits.queue);
    let worker = Worker {
        captioner,
        stream_post,
        metrics: metrics.clone(),
    };
    let worker = std::thread::Builder::new()
        .name("earshot-model".into())
        .spawn(move || worker.run(queue, max_batch))?;
    let state = Arc::new(AppState {
        jobs,
        limits,
        model_id,
        created: unix_now(),
        metrics,
        next_id: AtomicU64::new(0),
        transcription,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("earshot-http")
        .build()?;
    runtime.block_on(serve(state, addr, shutdown_grace))?;
    drop(runtime);
    // The state (and with it the queue's sender) is gone: the worker ends after its job.
    let _ = worker.join();
    Ok(())
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics_text))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/audio/transcriptions", post(transcriptions))
        .fallback(not_found)
        .with_state(state)
}

/// Accepts connections until a shutdown signal, then lets the open ones finish (up to
/// `grace`).
async fn serve(state: Arc<AppState>, addr: SocketAddr, grace: Duration) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    // The address is the one result: a script (or a test) started with --port 0 reads it.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{local}")?;
    stdout.flush()?;
    drop(stdout);
    tracing::info!("serving {} on http://{local}", state.model_id);
    let app = router(state.clone());
    let limits = state.limits.clone();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let (socket, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, keep serving.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            state
                .metrics
                .refused_connections
                .fetch_add(1, Ordering::Relaxed);
            drop(socket);
            continue;
        };
        let _ = socket.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut shutdown_rx = shutdown_rx.clone();
        let header_timeout = limits.header_timeout;
        let metrics = state.metrics.clone();
        connections.spawn(async move {
            metrics.open_connections.fetch_add(1, Ordering::Relaxed);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(64 * 1024);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(socket), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown_rx.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            metrics.open_connections.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
    tracing::info!(
        "shutting down: {} connection(s) open, waiting up to {:.0} s",
        connections.len(),
        grace.as_secs_f64()
    );
    drop(listener);
    let _ = shutdown_tx.send(true);
    let _ = tokio::time::timeout(grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    connections.abort_all();
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

/// The web page: drop or record audio, ask, watch the answer stream in. Served from the
/// binary; it loads nothing from elsewhere.
async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; media-src 'self' blob:",
            ),
        ],
        include_str!("page.html"),
    )
        .into_response()
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": state.model_id,
            "object": "model",
            "created": state.created,
            "owned_by": "earshot",
        }],
    }))
    .into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn not_found(request: Request) -> Response {
    ApiError::status(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "no route {} {} (try POST /v1/chat/completions, GET /v1/models, /health, /metrics)",
            request.method(),
            api::excerpt(request.uri().path(), 100)
        ),
    )
    .into_response()
}

/// The body, at most `limit` bytes, read within `timeout`.
async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is over this server's limit of {limit} bytes"),
        )
    };
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::status(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {:.0} s",
                timeout.as_secs_f64()
            ),
        )),
        Ok(Err(e)) => {
            let limited = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if limited {
                Err(too_large())
            } else {
                Err(ApiError::invalid(
                    "body",
                    format!("reading the body failed: {e}"),
                ))
            }
        }
        Ok(Ok(bytes)) => Ok(bytes.to_vec()),
    }
}

/// Every audio part decoded to 16 kHz mono and joined, at most `max_s` seconds in all.
fn decode_audio(job: &ChatJob, max_s: f64) -> Result<Vec<f32>, ApiError> {
    let mut all = Vec::new();
    for part in &job.audio {
        let left = max_s - all.len() as f64 / crate::audio::SAMPLE_RATE as f64;
        let shown = PathBuf::from(format!("{} ({})", part.param, part.format));
        let decoded = crate::audio::decode_file_mono(
            part.bytes.clone(),
            &shown,
            crate::audio::Segment::whole(),
            Some(left.max(0.0)),
        )
        .map_err(|e| audio_error(&part.param, max_s, e))?;
        let samples = crate::audio::to_16k(&shown, decoded)
            .map_err(|e| audio_error(&part.param, max_s, e))?;
        all.extend(samples);
    }
    if all.is_empty() {
        return Err(ApiError::invalid("messages", "the audio holds no samples"));
    }
    Ok(all)
}

fn audio_error(param: &str, max_s: f64, e: crate::audio::AudioError) -> ApiError {
    let msg = e.to_string();
    if matches!(e, crate::audio::AudioError::TooLong { .. }) {
        ApiError::invalid(
            param,
            format!("the audio is longer than this server's limit of {max_s} s in all"),
        )
        .with_code("audio_too_long")
    } else {
        ApiError::invalid(
            param,
            format!(
                "not audio in a format earshot reads: {}",
                api::excerpt(&msg, 300)
            ),
        )
        .with_code("invalid_audio")
    }
}

async fn chat(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let response = chat_response(&state, request)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    state.metrics.count_status(response.status().as_u16());
    response
}

/// A declared body length over the limit is refused before a byte of the body is read.
fn check_declared_length(request: &Request, limit: usize) -> Result<(), ApiError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > limit as u64 => Err(ApiError::status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body ({len} bytes) is over this server's limit of {limit} bytes"),
        )),
        _ => Ok(()),
    }
}

fn internal(message: &str) -> ApiError {
    ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
}

/// Decodes a checked job's audio on the blocking pool (CPU work on untrusted bytes, kept off
/// the threads that drive connections).
async fn with_samples(job: ChatJob, max_s: f64) -> Result<(ChatJob, Vec<f32>), ApiError> {
    tokio::task::spawn_blocking(move || {
        let samples = decode_audio(&job, max_s)?;
        Ok::<_, ApiError>((job, samples))
    })
    .await
    .map_err(|_| internal("decoding the request failed"))?
}

/// A queued job: its events, and the guard that cancels it when dropped.
struct Queued {
    events: tokio::sync::mpsc::UnboundedReceiver<WorkerEvent>,
    guard: CancelOnDrop,
    id: String,
    created: u64,
}

/// Puts a job on the worker's queue; 429 with Retry-After when the queue is full.
fn enqueue(state: &AppState, chat: ChatJob, samples: Vec<f32>) -> Result<Queued, ApiError> {
    let audio_ms = (samples.len() as f64 / crate::audio::SAMPLE_RATE as f64 * 1e3) as u64;
    let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
    let cancelled = Arc::new(AtomicBool::new(false));
    let work = WorkerJob {
        chat,
        samples,
        events: events_tx,
        cancelled: cancelled.clone(),
    };
    state.metrics.queued.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = state.jobs.try_send(work) {
        state.metrics.queued.fetch_sub(1, Ordering::Relaxed);
        return Err(match e {
            std::sync::mpsc::TrySendError::Full(_) => ApiError {
                retry_after: Some(1),
                ..ApiError::status(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    format!(
                        "the queue is full ({} requests waiting); try again shortly",
                        state.limits.queue
                    ),
                )
            },
            std::sync::mpsc::TrySendError::Disconnected(_) => ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the model is shutting down",
            ),
        });
    }
    state
        .metrics
        .audio_seconds_ms
        .fetch_add(audio_ms, Ordering::Relaxed);
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    Ok(Queued {
        events,
        guard: CancelOnDrop(cancelled),
        id: format!("chatcmpl-{:x}{n:06x}", state.created),
        created: unix_now(),
    })
}

/// The finished answer of a queued job, within the deadline.
async fn answer(state: &AppState, queued: &mut Queued) -> Result<WorkerEvent, ApiError> {
    let deadline = state.limits.deadline;
    let answer = tokio::time::timeout(deadline, async {
        loop {
            match queued.events.recv().await {
                Some(WorkerEvent::Delta(_)) => continue,
                other => return other,
            }
        }
    })
    .await;
    match answer {
        Err(_) => Err(ApiError::status(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            format!(
                "no answer within this server's deadline of {:.0} s",
                deadline.as_secs_f64()
            ),
        )),
        Ok(None) => Err(ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the request was dropped (the server is shutting down)",
        )),
        Ok(Some(WorkerEvent::Failed(e))) => Err(e),
        Ok(Some(done)) => Ok(done),
    }
}

async fn chat_response(state: &Arc<AppState>, request: Request) -> Result<Response, ApiError> {
    let limits = &state.limits;
    check_declared_length(&request, limits.max_body_bytes)?;
    let body = read_body(
        request.into_body(),
        limits.max_body_bytes,
        limits.body_timeout,
    )
    .await?;
    let started = Instant::now();
    let model_id = state.model_id.clone();
    let parse_limits = limits.clone();
    let job = tokio::task::spawn_blocking(move || api::parse_chat(&body, &parse_limits, &model_id))
        .await
        .map_err(|_| internal("parsing the request failed"))??;
    let (job, samples) = with_samples(job, limits.max_audio_s).await?;
    let stream = job.stream;
    let include_usage = job.include_usage;
    let mut queued = enqueue(state, job, samples)?;
    if stream {
        return Ok(stream_response(
            state.clone(),
            queued,
            include_usage,
            started,
        ));
    }
    let done = answer(state, &mut queued).await;
    state
        .metrics
        .latency
        .observe(started.elapsed().as_secs_f64());
    match done? {
        WorkerEvent::Done {
            text,
            finish,
            usage,
            ..
        } => Ok(axum::Json(api::completion_body(
            &queued.id,
            queued.created,
            &state.model_id,
            &text,
            finish,
            usage,
        ))
        .into_response()),
        _ => Err(internal("the model sent no answer")),
    }
}

async fn transcriptions(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let response = transcription_response(&state, request)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    state.metrics.count_status(response.status().as_u16());
    response
}

/// What `/v1/audio/transcriptions` answers with.
#[derive(Clone, Copy, PartialEq)]
enum TranscriptFormat {
    Json,
    Text,
    VerboseJson,
}

/// The fields of a transcription form: the file (required), the answer's format and the
/// temperature; `model` must name the served model; language, prompt and unknown fields
/// are read and not used.
async fn read_transcription_form(
    form: &mut axum::extract::Multipart,
    model_id: &str,
) -> Result<(api::AudioPart, TranscriptFormat, f32), ApiError> {
    let (mut file, mut format, mut temperature) = (None, TranscriptFormat::Json, 0.0f32);
    let bad = |param: &str, e: axum::extract::multipart::MultipartError| {
        ApiError::invalid(param, format!("reading the form failed: {}", e.body_text()))
    };
    while let Some(field) = form.next_field().await.map_err(|e| bad("body", e))? {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "file" => {
                let ext = field
                    .file_name()
                    .and_then(|f| f.rsplit_once('.'))
                    .map(|(_, e)| e.to_ascii_lowercase())
                    .unwrap_or_else(|| "wav".into());
                let bytes = field.bytes().await.map_err(|e| bad("file", e))?;
                if !api::AUDIO_FORMATS.contains(&ext.as_str()) {
                    return Err(ApiError::invalid(
                        "file",
                        format!(
                            "unsupported audio format '{}' (one of {})",
                            api::excerpt(&ext, 20),
                            api::AUDIO_FORMATS.join(", ")
                        ),
                    ));
                }
                file = Some(api::AudioPart {
                    param: "file".into(),
                    bytes: bytes.to_vec(),
                    format: ext,
                });
            }
            "model" | "response_format" | "temperature" | "language" | "prompt" => {
                let value = field.text().await.map_err(|e| bad(&name, e))?;
                match name.as_str() {
                    "model" if value != model_id => {
                        return Err(ApiError {
                            status: StatusCode::NOT_FOUND,
                            code: Some("model_not_found"),
                            ..ApiError::invalid(
                                "model",
                                format!(
                                    "the model '{}' does not exist; this server serves '{}'",
                                    api::excerpt(&value, 80),
                                    model_id
                                ),
                            )
                        })
                    }
                    "response_format" => {
                        format = match value.as_str() {
                            "json" => TranscriptFormat::Json,
                            "text" => TranscriptFormat::Text,
                            "verbose_json" => TranscriptFormat::VerboseJson,
                            other => {
                                return Err(ApiError::invalid(
                                    "response_format",
                                    format!(
                                    "unsupported response_format '{}' (json, text, verbose_json)",
                                    api::excerpt(other, 20)
                                ),
                                ))
                            }
                        }
                    }
                    "temperature" => {
                        temperature = value
                            .trim()
                            .parse::<f32>()
                            .ok()
                            .filter(|t| (0.0..=1.0).contains(t))
                            .ok_or_else(|| {
                                ApiError::invalid(
                                    "temperature",
                                    "temperature must be a number in [0, 1]",
                                )
                            })?
                    }
                    _ => {}
                }
            }
            // Other fields (timestamp_granularities[], ...) are read and ignored.
            _ => {
                let _ = field.bytes().await.map_err(|e| bad(&name, e))?;
            }
        }
    }
    let file = file.ok_or_else(|| ApiError::invalid("file", "the form has no 'file' field"))?;
    Ok((file, format, temperature))
}

/// `POST /v1/audio/transcriptions` (multipart form: file, model, response_format,
/// temperature; language and prompt are accepted and not used): the run's own task on the
/// file, for runs whose targets are transcripts (`data.text-targets = true`).
async fn transcription_response(
    state: &Arc<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    use axum::extract::FromRequest;
    if !state.transcription {
        return Err(ApiError::status(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "this run is not a transcription model (its config's data.text-targets is false): use /v1/chat/completions",
        ));
    }
    let limits = &state.limits;
    check_declared_length(&request, limits.max_body_bytes)?;
    let (parts, body) = request.into_parts();
    let body = read_body(body, limits.max_body_bytes, limits.body_timeout).await?;
    let started = Instant::now();
    let request = Request::from_parts(parts, Body::from(body));
    let mut form = axum::extract::Multipart::from_request(request, &())
        .await
        .map_err(|e| {
            ApiError::invalid(
                "body",
                format!("not a multipart/form-data body: {}", e.body_text()),
            )
        })?;
    let (file, format, temperature) = read_transcription_form(&mut form, &state.model_id).await?;
    if file.bytes.is_empty() {
        return Err(ApiError::invalid("file", "the file is empty"));
    }
    let job = ChatJob {
        text: None,
        audio: vec![file],
        max_tokens: limits.max_tokens,
        temperature,
        top_p: None,
        seed: 0,
        stop: Vec::new(),
        stream: false,
        include_usage: false,
    };
    let (job, samples) = with_samples(job, limits.max_audio_s).await?;
    let duration = samples.len() as f64 / crate::audio::SAMPLE_RATE as f64;
    let mut queued = enqueue(state, job, samples)?;
    let done = answer(state, &mut queued).await;
    state
        .metrics
        .latency
        .observe(started.elapsed().as_secs_f64());
    let WorkerEvent::Done { segments, .. } = done? else {
        return Err(internal("the model sent no answer"));
    };
    let text = segments
        .iter()
        .map(|(_, t)| t.as_str())
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    Ok(match format {
        TranscriptFormat::Text => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{text}\n"),
        )
            .into_response(),
        TranscriptFormat::Json => axum::Json(json!({"text": text})).into_response(),
        TranscriptFormat::VerboseJson => {
            let segments: Vec<serde_json::Value> = segments
                .iter()
                .enumerate()
                .map(|(i, (span, t))| {
                    let (start, end) = span.unwrap_or((0.0, duration));
                    json!({"id": i, "start": start, "end": end, "text": t})
                })
                .collect();
            axum::Json(json!({
                "task": "transcribe",
                "duration": duration,
                "text": text,
                "segments": segments,
            }))
            .into_response()
        }
    })
}

/// Marks a job cancelled when its handler (or its stream) is dropped: a client that hangs
/// up before the worker reaches its job costs no model time.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The answer as server-sent events: a first chunk with the role, content deltas, a last
/// chunk with the finish reason, the usage chunk when asked, then `[DONE]`.
fn stream_response(
    state: Arc<AppState>,
    queued: Queued,
    include_usage: bool,
    started: Instant,
) -> Response {
    let Queued {
        events,
        guard,
        id,
        created,
    } = queued;
    struct Streaming {
        state: Arc<AppState>,
        id: String,
        created: u64,
        events: tokio::sync::mpsc::UnboundedReceiver<WorkerEvent>,
        include_usage: bool,
        started: Instant,
        first: bool,
        sent_text: bool,
        pending: std::collections::VecDeque<Event>,
        done: bool,
        deadline: tokio::time::Instant,
        _guard: CancelOnDrop,
    }
    let deadline = tokio::time::Instant::now() + state.limits.deadline;
    let s = Streaming {
        state,
        id,
        created,
        events,
        include_usage,
        started,
        first: true,
        sent_text: false,
        pending: Default::default(),
        done: false,
        deadline,
        _guard: guard,
    };
    let events = stream::unfold(s, |mut s| async move {
        loop {
            if let Some(e) = s.pending.pop_front() {
                return Some((Ok::<Event, Infallible>(e), s));
            }
            if s.done {
                return None;
            }
            let chunk = |s: &Streaming, delta: serde_json::Value, finish| {
                Event::default().data(
                    api::chunk_body(&s.id, s.created, &s.state.model_id, delta, finish).to_string(),
                )
            };
            if s.first {
                s.first = false;
                let e = chunk(&s, json!({"role": "assistant", "content": ""}), None);
                s.pending.push_back(e);
                continue;
            }
            let next = tokio::time::timeout_at(s.deadline, s.events.recv()).await;
            match next {
                Ok(Some(WorkerEvent::Delta(d))) => {
                    if !s.sent_text {
                        s.sent_text = true;
                        s.state
                            .metrics
                            .first_token
                            .observe(s.started.elapsed().as_secs_f64());
                    }
                    let e = chunk(&s, json!({"content": d}), None);
                    s.pending.push_back(e);
                }
                Ok(Some(WorkerEvent::Done { finish, usage, .. })) => {
                    let e = chunk(&s, json!({}), Some(finish));
                    s.pending.push_back(e);
                    if s.include_usage {
                        let u = api::usage_chunk(&s.id, s.created, &s.state.model_id, usage);
                        s.pending.push_back(Event::default().data(u.to_string()));
                    }
                    s.pending.push_back(Event::default().data("[DONE]"));
                    s.state
                        .metrics
                        .latency
                        .observe(s.started.elapsed().as_secs_f64());
                    s.done = true;
                }
                Ok(Some(WorkerEvent::Failed(e))) => {
                    // Headers are sent: the error goes in the stream, as OpenAI's does.
                    s.pending
                        .push_back(Event::default().data(e.body().to_string()));
                    s.pending.push_back(Event::default().data("[DONE]"));
                    s.done = true;
                }
                Ok(None) => {
                    let e = ApiError::status(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "the request was dropped (the server is shutting down)",
                    );
                    s.pending
                        .push_back(Event::default().data(e.body().to_string()));
                    s.done = true;
                }
                Err(_) => {
                    let e = ApiError::status(
                        StatusCode::GATEWAY_TIMEOUT,
                        "timeout_error",
                        "no answer within this server's deadline",
                    );
                    s.pending
                        .push_back(Event::default().data(e.body().to_string()));
                    s.done = true;
                }
            }
        }
    });
    Sse::new(events).into_response()
}
