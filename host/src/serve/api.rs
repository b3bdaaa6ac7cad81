//! The OpenAI-shaped part of `earshot serve`: request bodies parsed and checked into
//! [`ChatJob`]s, errors as OpenAI error bodies, and the response and stream-chunk shapes.
//! Everything here is pure (no models), so every refusal is unit-tested; every byte a client
//! sends is hostile: each field is bounded, and an error names the field (`param`) that broke
//! the rule, never echoing more than a short, terminal-safe excerpt of what was sent.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};

/// What a request may ask for; the defaults follow OpenAI's and vLLM's (25 MiB bodies).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Seconds of audio per request (all parts together).
    pub max_audio_s: f64,
    pub max_audio_parts: usize,
    /// Characters of text a request may send (the prompt template sees it whole).
    pub max_text_chars: usize,
    /// The largest `max_tokens` granted (also the default).
    pub max_tokens: usize,
    /// Requests waiting for the model before a 429.
    pub queue: usize,
    /// From the end of the body to the end of the answer.
    pub deadline: Duration,
    /// Reading a request's headers (a slowloris client is cut off after this).
    pub header_timeout: Duration,
    /// Reading a request's body.
    pub body_timeout: Duration,
    /// Open connections; more are closed at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 25 << 20,
            max_audio_s: 600.0,
            max_audio_parts: 8,
            max_text_chars: 16_384,
            max_tokens: 256,
            queue: 64,
            deadline: Duration::from_secs(300),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            max_connections: 512,
        }
    }
}

/// An OpenAI error body with its HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before trying again (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// A 400 about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
            retry_after: None,
        }
    }

    pub fn status(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, s.into());
        }
        response
    }
}

/// At most `max` characters of client text for an error message, control characters
/// escaped, so that an error never carries a megabyte or a terminal escape back.
pub fn excerpt(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

/// An audio part, still encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioPart {
    /// Where it was in the request (`messages[1].content[0]`), for errors.
    pub param: String,
    pub bytes: Vec<u8>,
    pub format: String,
}

/// Why generation ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A checked chat request: what the worker needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatJob {
    /// The user's text (the prompt template's `instruction`); None: the run's own.
    pub text: Option<String>,
    pub audio: Vec<AudioPart>,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub seed: u64,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Audio formats a part may name (what the decoder reads).
pub const AUDIO_FORMATS: [&str; 7] = ["wav", "mp3", "flac", "ogg", "oga", "opus", "m4a"];

const MAX_STOPS: usize = 4;
const MAX_STOP_CHARS: usize = 256;

/// Parses and checks a chat-completions body against `limits`; `model` is the served id.
pub fn parse_chat(body: &[u8], limits: &Limits, model: &str) -> Result<ChatJob, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid("body", format!("the body is not valid JSON: {e}"))
            .with_code("invalid_json")
    })?;
    let obj = v
        .as_object()
        .ok_or_else(|| ApiError::invalid("body", "the body must be a JSON object"))?;
    check_model(obj, model)?;
    refuse_unsupported(obj)?;
    let max_tokens = match (obj.get("max_completion_tokens"), obj.get("max_tokens")) {
        (Some(v), _) if !v.is_null() => count(v, "max_completion_tokens", limits.max_tokens)?,
        (_, Some(v)) if !v.is_null() => count(v, "max_tokens", limits.max_tokens)?,
        _ => limits.max_tokens,
    };
    let (temperature, top_p, seed) = sampling(obj)?;
    let stop = stop_strings(obj)?;
    let stream = match obj.get("stream").filter(|s| !s.is_null()) {
        None => false,
        Some(s) => s
            .as_bool()
            .ok_or_else(|| ApiError::invalid("stream", "stream must be true or false"))?,
    };
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let (text, audio) = parse_messages(obj.get("messages"), limits)?;
    Ok(ChatJob {
        text,
        audio,
        max_tokens,
        temperature,
        top_p,
        seed,
        stop,
        stream,
        include_usage,
    })
}

type Object = serde_json::Map<String, Value>;

/// A request naming another model than the one served is a 404, as OpenAI answers it.
fn check_model(obj: &Object, model: &str) -> Result<(), ApiError> {
    let Some(m) = obj.get("model") else {
        return Ok(());
    };
    let m = m
        .as_str()
        .ok_or_else(|| ApiError::invalid("model", "model must be a string"))?;
    if m == model {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!(
            "the model '{}' does not exist; this server serves '{model}'",
            excerpt(m, 80)
        ),
        kind: "invalid_request_error",
        param: Some("model".into()),
        code: Some("model_not_found"),
        retry_after: None,
    })
}

/// Options that change what is asked and cannot be honoured are refused, not ignored.
fn refuse_unsupported(obj: &Object) -> Result<(), ApiError> {
    match obj.get("n") {
        None | Some(Value::Null) => {}
        Some(n) if n.as_u64() == Some(1) => {}
        Some(_) => return Err(ApiError::invalid("n", "only n = 1 is supported")),
    }
    for key in ["tools", "functions", "tool_choice", "function_call"] {
        if obj.get(key).is_some_and(|t| !t.is_null()) {
            return Err(ApiError::invalid(key, format!("{key} is not supported")));
        }
    }
    if obj.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::invalid("logprobs", "logprobs are not supported"));
    }
    if let Some(rf) = obj.get("response_format").filter(|r| !r.is_null()) {
        if rf.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid(
                "response_format",
                "only response_format {\"type\": \"text\"} is supported",
            ));
        }
    }
    Ok(())
}

/// `temperature` (default 0: greedy), `top_p` (1: none) and `seed` (default 0).
fn sampling(obj: &Object) -> Result<(f32, Option<f32>, u64), ApiError> {
    let temperature = match obj.get("temperature").filter(|t| !t.is_null()) {
        None => 0.0,
        Some(t) => {
            let t = t
                .as_f64()
                .filter(|t| (0.0..=2.0).contains(t))
                .ok_or_else(|| {
                    ApiError::invalid("temperature", "temperature must be a number in [0, 2]")
                })?;
            t as f32
        }
    };
    let top_p = match obj.get("top_p").filter(|t| !t.is_null()) {
        None => None,
        Some(p) => {
            let p = p
                .as_f64()
                .filter(|p| *p > 0.0 && *p <= 1.0)
                .ok_or_else(|| ApiError::invalid("top_p", "top_p must be a number in (0, 1]"))?;
            (p < 1.0).then_some(p as f32)
        }
    };
    let seed = match obj.get("seed").filter(|s| !s.is_null()) {
        None => 0,
        Some(s) => s
            .as_i64()
            .map(|s| s as u64)
            .ok_or_else(|| ApiError::invalid("seed", "seed must be an integer"))?,
    };
    Ok((temperature, top_p, seed))
}

/// `stop`: a string or a list of them, bounded in number and length.
fn stop_strings(obj: &Object) -> Result<Vec<String>, ApiError> {
    let stop: Vec<String> = match obj.get("stop").filter(|s| !s.is_null()) {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::invalid("stop", "stop must be strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "stop must be a string or a list of strings",
            ))
        }
    };
    if stop.len() > MAX_STOPS
        || stop
            .iter()
            .any(|s| s.is_empty() || s.chars().count() > MAX_STOP_CHARS)
    {
        return Err(ApiError::invalid(
            "stop",
            format!("stop: at most {MAX_STOPS} non-empty strings of at most {MAX_STOP_CHARS} characters"),
        ));
    }
    Ok(stop)
}

/// A token count in 1..=cap.
fn count(v: &Value, param: &str, cap: usize) -> Result<usize, ApiError> {
    match v.as_u64() {
        Some(n) if n >= 1 && n <= cap as u64 => Ok(n as usize),
        Some(n) if n > cap as u64 => Err(ApiError::invalid(
            param,
            format!("{param} = {n} is over this server's limit of {cap}"),
        )),
        _ => Err(ApiError::invalid(
            param,
            format!("{param} must be an integer >= 1"),
        )),
    }
}

/// The user's text and audio: any number of system or developer messages (the run's prompt
/// template supplies the system text, so theirs is not used), then one user message.
fn parse_messages(
    messages: Option<&Value>,
    limits: &Limits,
) -> Result<(Option<String>, Vec<AudioPart>), ApiError> {
    let list = messages
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::invalid("messages", "messages must be a non-empty list"))?;
    if list.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must be a non-empty list",
        ));
    }
    let mut user = None;
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid(format!("messages[{i}].role"), "every message needs a role")
        })?;
        match role {
            "system" | "developer" => {}
            "user" if user.is_none() => user = Some((i, m)),
            "user" | "assistant" | "tool" => {
                return Err(ApiError::invalid(
                    format!("messages[{i}]"),
                    "one user message is answered: earlier turns are not supported",
                ))
            }
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("unknown role '{}'", excerpt(other, 40)),
                ))
            }
        }
    }
    let (i, m) = user.ok_or_else(|| ApiError::invalid("messages", "no user message"))?;
    let mut texts = Vec::new();
    let mut audio = Vec::new();
    match m.get("content") {
        Some(Value::String(s)) => texts.push(s.clone()),
        Some(Value::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                let param = format!("messages[{i}].content[{j}]");
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
                match kind {
                    "text" => texts.push(
                        part.get("text")
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                ApiError::invalid(&param, "a text part needs a string 'text'")
                            })?
                            .to_string(),
                    ),
                    "input_audio" => {
                        too_many_parts(audio.len(), limits, &param)?;
                        let a = part.get("input_audio").ok_or_else(|| {
                            ApiError::invalid(&param, "an input_audio part needs 'input_audio'")
                        })?;
                        let data = a.get("data").and_then(Value::as_str).ok_or_else(|| {
                            ApiError::invalid(
                                format!("{param}.input_audio.data"),
                                "input_audio.data must be a base64 string",
                            )
                        })?;
                        let format = a.get("format").and_then(Value::as_str).unwrap_or("wav");
                        audio.push(audio_part(&param, data, Some(format))?);
                    }
                    "audio_url" => {
                        too_many_parts(audio.len(), limits, &param)?;
                        let url = part
                            .get("audio_url")
                            .and_then(|u| u.get("url"))
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                ApiError::invalid(&param, "an audio_url part needs 'audio_url.url'")
                            })?;
                        if !url.starts_with("data:") {
                            return Err(ApiError::invalid(
                                format!("{param}.audio_url.url"),
                                "only data: URLs are accepted (this server fetches nothing)",
                            ));
                        }
                        audio.push(audio_part(&param, url, None)?);
                    }
                    other => {
                        return Err(ApiError::invalid(
                            format!("{param}.type"),
                            format!(
                                "unsupported content part type '{}' (text, input_audio, audio_url)",
                                excerpt(other, 40)
                            ),
                        ))
                    }
                }
            }
        }
        _ => {
            return Err(ApiError::invalid(
                format!("messages[{i}].content"),
                "content must be a string or a list of parts",
            ))
        }
    }
    if audio.is_empty() {
        return Err(ApiError::invalid(
            format!("messages[{i}].content"),
            "no audio: this model answers about audio; send an input_audio part",
        ));
    }
    let text = texts.join("\n");
    if text.chars().count() > limits.max_text_chars {
        return Err(ApiError::invalid(
            format!("messages[{i}].content"),
            format!("more than {} characters of text", limits.max_text_chars),
        ));
    }
    let text = text.trim();
    Ok(((!text.is_empty()).then(|| text.to_string()), audio))
}

/// Refuses a message's next audio part when it already has the most allowed.
fn too_many_parts(parts: usize, limits: &Limits, param: &str) -> Result<(), ApiError> {
    if parts >= limits.max_audio_parts {
        return Err(ApiError::invalid(
            param,
            format!(
                "more than {} audio parts in one message",
                limits.max_audio_parts
            ),
        ));
    }
    Ok(())
}

/// Decodes an audio part's base64 (a `data:[mime];base64,` prefix is accepted).
fn audio_part(param: &str, data: &str, format: Option<&str>) -> Result<AudioPart, ApiError> {
    let (payload, mime) = match data.strip_prefix("data:") {
        Some(rest) => {
            let (head, payload) = rest.split_once(',').ok_or_else(|| {
                ApiError::invalid(param, "a data: URL needs a ',' before its payload")
            })?;
            let mime = head.strip_suffix(";base64").ok_or_else(|| {
                ApiError::invalid(
                    param,
                    "a data: URL must be base64 (data:audio/wav;base64,...)",
                )
            })?;
            (payload, Some(mime.to_string()))
        }
        None => (data, None),
    };
    let format = match (format, mime.as_deref()) {
        (Some(f), _) => f.to_ascii_lowercase(),
        (None, Some(m)) => m
            .rsplit('/')
            .next()
            .unwrap_or("")
            .trim_start_matches("x-")
            .replace("mpeg", "mp3")
            .replace("vorbis", "ogg"),
        (None, None) => "wav".into(),
    };
    if !AUDIO_FORMATS.contains(&format.as_str()) {
        return Err(ApiError::invalid(
            format!("{param}.input_audio.format"),
            format!(
                "unsupported audio format '{}' (one of {})",
                excerpt(&format, 40),
                AUDIO_FORMATS.join(", ")
            ),
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| {
            ApiError::invalid(
                format!("{param}.input_audio.data"),
                format!("the audio data is not valid base64: {e}"),
            )
        })?;
    if bytes.is_empty() {
        return Err(ApiError::invalid(
            format!("{param}.input_audio.data"),
            "the audio data is empty",
        ));
    }
    Ok(AudioPart {
        param: param.to_string(),
        bytes,
        format,
    })
}

/// The text up to the first of `stops`, and whether one was found.
pub fn cut_at_stops(text: &str, stops: &[String]) -> (String, bool) {
    match stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        Some(at) => (text[..at].to_string(), true),
        None => (text.to_string(), false),
    }
}

/// Turns a growing text into stream deltas that never need taking back: a delta is sent
/// only when the text extends what was sent, and the last `hold` characters (a stop string
/// or a post-processor's change may still cut or alter them) wait for the next text.
#[derive(Debug, Default)]
pub struct StreamText {
    sent: String,
}

impl StreamText {
    /// The delta for `text` so far, keeping `hold` characters back.
    pub fn grow(&mut self, text: &str, hold: usize) -> Option<String> {
        let keep = text.chars().count().saturating_sub(hold);
        let upto: String = text.chars().take(keep).collect();
        let delta = upto.strip_prefix(self.sent.as_str())?;
        if delta.is_empty() {
            return None;
        }
        let delta = delta.to_string();
        self.sent = upto;
        Some(delta)
    }

    /// The delta that completes `final_text`; Err(sent) when what was sent is not a prefix of
    /// it (the caller logs it: the streamed answer then differs from the final one).
    pub fn finish(&mut self, final_text: &str) -> Result<String, String> {
        match final_text.strip_prefix(self.sent.as_str()) {
            Some(rest) => {
                self.sent = final_text.to_string();
                Ok(rest.to_string())
            }
            None => Err(self.sent.clone()),
        }
    }
}

/// `chat.completion` for a finished answer.
pub fn completion_body(
    id: &str,
    created: u64,
    model: &str,
    text: &str,
    finish: FinishReason,
    usage: Usage,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": null,
            "finish_reason": finish.as_str(),
        }],
        "usage": usage.json(),
    })
}

/// Token counts of one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        })
    }
}

/// One `chat.completion.chunk`.
pub fn chunk_body(
    id: &str,
    created: u64,
    model: &str,
    delta: Value,
    finish: Option<FinishReason>,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "delta": delta,
            "logprobs": null,
            "finish_reason": finish.map(FinishReason::as_str),
        }],
    })
}

/// The usage chunk of `stream_options.include_usage`: no choices.
pub fn usage_chunk(id: &str, created: u64, model: &str, usage: Usage) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage.json(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav_b64() -> String {
        base64::engine::general_purpose::STANDARD.encode(b"RIFF....WAVE")
    }

    fn body(content: Value) -> Vec<u8> {
        json!({"model": "m", "messages": [{"role": "user", "content": content}]})
            .to_string()
            .into_bytes()
    }

    fn audio(data: &str, format: &str) -> Value {
        json!({"type": "input_audio", "input_audio": {"data": data, "format": format}})
    }

    fn parse(b: &[u8]) -> Result<ChatJob, ApiError> {
        parse_chat(b, &Limits::default(), "m")
    }

    fn param(e: ApiError) -> String {
        e.param.unwrap_or_default()
    }

    #[test]
    fn a_plain_request_with_text_and_audio() {
        let job = parse(&body(json!([
            {"type": "text", "text": "  What is this?  "},
            audio(&wav_b64(), "wav"),
        ])))
        .unwrap();
        assert_eq!(job.text.as_deref(), Some("What is this?"));
        assert_eq!(job.audio.len(), 1);
        assert_eq!(job.audio[0].bytes, b"RIFF....WAVE");
        assert_eq!(job.audio[0].param, "messages[0].content[1]");
        assert_eq!(job.max_tokens, Limits::default().max_tokens);
        assert_eq!((job.temperature, job.top_p, job.seed), (0.0, None, 0));
        assert!(!job.stream);
    }

    #[test]
    fn data_urls_several_parts_and_options() {
        let url = format!("data:audio/mpeg;base64,{}", wav_b64());
        let b = json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [
                    audio(&format!("data:audio/wav;base64,{}", wav_b64()), "wav"),
                    {"type": "audio_url", "audio_url": {"url": url}},
                ]},
            ],
            "max_completion_tokens": 7, "max_tokens": 9, "temperature": 0.5, "top_p": 0.9,
            "seed": 3, "stop": ["\n", "."], "stream": true, "stream_options": {"include_usage": true},
            "n": 1, "user": "ignored"
        });
        let job = parse(b.to_string().as_bytes()).unwrap();
        assert_eq!(job.text, None);
        assert_eq!(job.audio.len(), 2);
        assert_eq!(job.audio[1].format, "mp3");
        assert_eq!(job.max_tokens, 7);
        assert_eq!((job.temperature, job.top_p, job.seed), (0.5, Some(0.9), 3));
        assert_eq!(job.stop, ["\n", "."]);
        assert!(job.stream && job.include_usage);
    }

    #[test]
    fn every_bad_field_is_a_400_naming_it() {
        let ok_audio = audio(&wav_b64(), "wav");
        let cases: Vec<(Vec<u8>, &str, &str)> = vec![
            (b"{not json".to_vec(), "body", "not valid JSON"),
            (b"[1]".to_vec(), "body", "JSON object"),
            (json!({"messages": []}).to_string().into_bytes(), "messages", "non-empty"),
            (body(json!("only text")), "messages[0].content", "no audio"),
            (body(json!([audio("@@@", "wav")])), "messages[0].content[0].input_audio.data", "not valid base64"),
            (body(json!([audio("", "wav")])), "messages[0].content[0].input_audio.data", "empty"),
            (body(json!([audio(&wav_b64(), "exe")])), "messages[0].content[0].input_audio.format", "unsupported audio format 'exe'"),
            (body(json!([{"type": "image_url", "image_url": {}}])), "messages[0].content[0].type", "unsupported content part type 'image_url'"),
            (body(json!([{"type": "audio_url", "audio_url": {"url": "http://169.254.169.254/"}}])), "messages[0].content[0].audio_url.url", "only data: URLs"),
            (body(json!(42)), "messages[0].content", "string or a list"),
            (json!({"messages": [{"role": "user", "content": [ok_audio]}], "n": 2}).to_string().into_bytes(), "n", "n = 1"),
            (json!({"messages": [{"role": "user", "content": [ok_audio]}], "max_tokens": 0}).to_string().into_bytes(), "max_tokens", ">= 1"),
            (json!({"messages": [{"role": "user", "content": [ok_audio]}], "max_tokens": 100000}).to_string().into_bytes(), "max_tokens", "over this server's limit"),
            (json!({"messages": [{"role": "user", "content": [ok_audio]}], "temperature": 9}).to_string().into_bytes(), "temperature", "[0, 2]"),
            (json!({"messages": [{"role": "user", "content": [ok_audio]}], "top_p": 0}).to_string().into_bytes(), "top_p", "(0, 1]"),
            (json!({"messages": [{"role": "user", "content": [ok_audio]}], "stop": ["a","b","c","d","e"]}).to_string().into_bytes(), "stop", "at most 4"),
            (json!({"messages": [{"role": "user", "content": [ok_audio]}], "tools": [{}]}).to_string().into_bytes(), "tools", "not supported"),
            (json!({"messages": [{"role": "user", "content": [ok_audio]}, {"role": "assistant", "content": "x"}]}).to_string().into_bytes(), "messages[1]", "earlier turns"),
            (json!({"messages": [{"role": "wizard", "content": "x"}]}).to_string().into_bytes(), "messages[0].role", "unknown role 'wizard'"),
            (json!({"messages": [{"role": "user", "content": [ok_audio]}], "stream": "yes"}).to_string().into_bytes(), "stream", "true or false"),
        ];
        for (b, p, msg) in cases {
            let e = parse(&b).expect_err(&String::from_utf8_lossy(&b));
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{e:?}");
            assert!(e.message.contains(msg), "{msg:?} not in {e:?}");
            assert_eq!(param(e), p);
        }
        let e = parse(
            &json!({"model": "other\u{1b}[31m", "messages": []})
                .to_string()
                .into_bytes(),
        )
        .unwrap_err();
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert!(e.message.contains("other\\u{1b}[31m"), "{}", e.message);
    }

    #[test]
    fn parts_and_text_are_bounded() {
        let limits = Limits {
            max_audio_parts: 2,
            max_text_chars: 10,
            ..Limits::default()
        };
        let a = audio(&wav_b64(), "wav");
        let e = parse_chat(&body(json!([a, a, a])), &limits, "m").unwrap_err();
        assert_eq!(param(e.clone()), "messages[0].content[2]");
        assert!(e.message.contains("more than 2 audio parts"));
        let e = parse_chat(
            &body(json!([{"type": "text", "text": "x".repeat(11)}, a])),
            &limits,
            "m",
        )
        .unwrap_err();
        assert!(e.message.contains("more than 10 characters"), "{e:?}");
    }

    #[test]
    fn stops_cut_and_stream_deltas_are_never_taken_back() {
        assert_eq!(
            cut_at_stops("a cat. a dog", &[".".into(), "dog".into()]),
            ("a cat".into(), true)
        );
        assert_eq!(cut_at_stops("a cat", &[]), ("a cat".into(), false));
        let mut s = StreamText::default();
        assert_eq!(s.grow("hel", 2), Some("h".into()));
        assert_eq!(s.grow("hello", 2), Some("el".into()));
        assert_eq!(s.grow("hello", 2), None);
        // A text that no longer extends what was sent sends nothing until it does again.
        assert_eq!(s.grow("jello there", 2), None);
        assert_eq!(s.finish("hello there"), Ok("lo there".into()));
        let mut s = StreamText::default();
        s.grow("abcdef", 0);
        assert_eq!(s.finish("abx"), Err("abcdef".into()));
    }

    #[test]
    fn error_bodies_are_openai_shaped() {
        let e = ApiError::invalid("x", "bad").with_code("c");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": "c"}})
        );
        assert_eq!(excerpt("abc\u{7}def", 4), "abc\\u{7}…");
    }
}
