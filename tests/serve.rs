//! `earshot serve` from outside, as a client sees it: a server started on 127.0.0.1 with a
//! projector trained here on the tones fixture, spoken to over raw HTTP/1.1. Answers equal
//! `earshot caption`'s on the same audio and settings (greedy), streamed or not; concurrent
//! clients get their own answers; every bad request is a 4xx with an OpenAI error body; slow,
//! idle and vanishing clients do not stop the next good request; SIGTERM ends it cleanly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use earshot_tests::*;

#[path = "plugins/common/wav.rs"]
mod wav_file;
use serde_json::{json, Value};
use wav_file::{square, wav_16k_mono};

const CLIPS: [&str; 4] = ["one", "two", "three", "four"];

fn clip(name: &str) -> PathBuf {
    repo_root().join(format!("configs/data/tones/clips/{name}.wav"))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A projector trained briefly on the tones config, and the --set lines that point the
/// config at it and add the text-normalize post-processor (so the streamed path runs it).
fn trained(dir: &Path) -> (PathBuf, Vec<String>) {
    let config = repo_root().join("configs/cpu-smollm2-tones.toml");
    let run = dir.join("run");
    let post = plugin_dir("plugins").join("text_normalize.wasm");
    let sets = vec![
        format!("plugins.post-processor=\"{}\"", post.display()),
        format!("train.run-dir=\"{}\"", run.display()),
    ];
    train_run(&config, &run, 12, &sets);
    (config, sets)
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(config: &Path, sets: &[String], extra: &[&str]) -> Server {
        let mut cmd = earshot_command();
        cmd.arg("serve").arg("--config").arg(config);
        for s in sets {
            cmd.arg("--set").arg(s);
        }
        Self::launch(cmd, extra)
    }

    fn launch(mut cmd: std::process::Command, extra: &[&str]) -> Server {
        cmd.args(["--port", "0", "--model-id", "tones"]).args(extra);
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("earshot serve starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("first stdout line: {line:?}"))
            .parse()
            .unwrap();
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of a counter in `/metrics`.
fn metric_of(addr: SocketAddr, name: &str) -> f64 {
    let text = String::from_utf8(request(addr, "GET", "/metrics", b"").body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .parse()
        .unwrap()
}

/// A response: status, lower-cased headers, body (de-chunked).
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&rest[..end]).trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[end + 2..end + 2 + size]);
            rest = &rest[end + 2 + size + 2..];
        }
        body = out;
    }
    Reply {
        status,
        headers,
        body,
    }
}

/// One request on a fresh connection (`Connection: close`), read to the end.
fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    // A server that refuses early (413) may close before the body is all sent: the reply
    // is still there to read.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse_reply(&raw)
}

fn chat(addr: SocketAddr, body: &Value) -> Reply {
    request(
        addr,
        "POST",
        "/v1/chat/completions",
        body.to_string().as_bytes(),
    )
}

fn audio_body(name: &str, extra: Value) -> Value {
    let bytes = std::fs::read(clip(name)).unwrap();
    let mut v = json!({
        "model": "tones",
        "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": b64(&bytes), "format": "wav"}},
        ]}],
        "max_tokens": 24,
    });
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    v
}

/// `earshot caption` on the clips with the same settings: what the server must answer.
fn captions(config: &Path, sets: &[String], checkpoint: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "caption".into(),
        "--config".into(),
        config.display().to_string(),
        "--checkpoint".into(),
        checkpoint.display().to_string(),
        "--max-tokens".into(),
        "24".into(),
        "--jsonl".into(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s.clone());
    }
    args.extend(CLIPS.iter().map(|c| clip(c).display().to_string()));
    let out = expect_success(&earshot(&args));
    out.lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["caption"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn answers_equal_caption_streamed_or_not_and_bad_requests_are_4xx() {
    let dir = tempfile::tempdir().unwrap();
    let (config, sets) = trained(dir.path());
    let checkpoint = dir.path().join("run/projector.safetensors");
    let expected = captions(&config, &sets, &checkpoint);
    assert!(expected.iter().all(|c| !c.is_empty()), "{expected:?}");
    let server = Server::start(
        &config,
        &sets,
        &[
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--max-body-mib",
            "4",
            "--max-tokens",
            "64",
            "--header-timeout-s",
            "2",
            "--body-timeout-s",
            "2",
            "--max-audio-s",
            "40",
        ],
    );
    let addr = server.addr;

    let health = request(addr, "GET", "/health", b"");
    assert_eq!(
        (health.status, health.json()["status"].clone()),
        (200, json!("ok"))
    );
    // The web page: served from the binary, nothing loaded from elsewhere.
    let page = request(addr, "GET", "/", b"");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let html = String::from_utf8(page.body).unwrap();
    assert!(
        html.contains("/v1/chat/completions") && html.contains("input_audio"),
        "{html}"
    );
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "{html}"
    );
    let models = request(addr, "GET", "/v1/models", b"").json();
    assert_eq!(models["data"][0]["id"], "tones", "{models}");

    // Not streamed: the caption, an OpenAI completion around it.
    for (name, want) in CLIPS.iter().zip(&expected) {
        let r = chat(addr, &audio_body(name, json!({})));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "tones");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            want.as_str(),
            "{name}: {v}"
        );
        let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
        assert!(["stop", "length"].contains(&finish), "{v}");
        let usage = &v["usage"];
        assert!(usage["prompt_tokens"].as_u64().unwrap() > 16, "{v}");
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(
                usage["prompt_tokens"].as_u64().unwrap()
                    + usage["completion_tokens"].as_u64().unwrap()
            )
        );
    }

    // Streamed: the deltas add up to the same answer; one id throughout; usage; [DONE].
    let r = chat(
        addr,
        &audio_body(
            CLIPS[0],
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let events = r.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].clone();
    assert!(chunks
        .iter()
        .all(|c| c["id"] == id && c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, expected[0]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(
        usage["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{usage}"
    );
    assert!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"].is_string());

    // A stop string cuts the answer, and the finish reason says stop.
    let words: Vec<&str> = expected[1].split(' ').collect();
    if words.len() > 1 {
        let r = chat(addr, &audio_body(CLIPS[1], json!({"stop": words[1]}))).json();
        let got = r["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(
            got,
            &expected[1][..expected[1].find(words[1]).unwrap()],
            "{r}"
        );
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
    }

    // Audio over 30 s: answered window by window, one line each, never cut; over the
    // server's --max-audio-s: refused.
    let long = |seconds: u32| {
        let samples = square(16_000 * seconds, 40);
        json!({"messages": [{"role": "user", "content": [{"type": "input_audio",
            "input_audio": {"data": b64(&wav_16k_mono(&samples, &[])), "format": "wav"}}]}],
            "max_tokens": 8})
    };
    let r = chat(addr, &long(35));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let text = r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text:?}");
    assert!(
        lines[0].starts_with("[0.0-30.0 s] ") && lines[1].starts_with("[30.0-35.0 s] "),
        "{text:?}"
    );
    let r = chat(addr, &long(45));
    assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
    let e = r.json();
    assert_eq!(e["error"]["code"], "audio_too_long", "{e}");

    // Bad requests: a 4xx with an OpenAI error body, never a 5xx or a hang.
    let wav = std::fs::read(clip("one")).unwrap();
    let part = |data: String, format: &str| json!({"type": "input_audio", "input_audio": {"data": data, "format": format}});
    let with = |parts: Vec<Value>| json!({"messages": [{"role": "user", "content": parts}]});
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{\"messages\": [".to_vec(), 400, "not valid JSON"),
        (
            with(vec![part("%%%".into(), "wav")])
                .to_string()
                .into_bytes(),
            400,
            "not valid base64",
        ),
        (
            with(vec![part(
                b64(b"this is not audio at all, just text"),
                "wav",
            )])
            .to_string()
            .into_bytes(),
            400,
            "not audio in a format earshot reads",
        ),
        (
            with(vec![part(b64(&wav), "exe")]).to_string().into_bytes(),
            400,
            "unsupported audio format",
        ),
        (
            with(vec![part(b64(&wav), "wav"); 9])
                .to_string()
                .into_bytes(),
            400,
            "more than 8 audio parts",
        ),
        (
            json!({"messages": [{"role": "user", "content": "hello"}]})
                .to_string()
                .into_bytes(),
            400,
            "no audio",
        ),
        (
            json!({"model": "gpt-4o", "messages": []})
                .to_string()
                .into_bytes(),
            404,
            "does not exist",
        ),
        (
            audio_body("one", json!({"max_tokens": 65}))
                .to_string()
                .into_bytes(),
            400,
            "over this server's limit of 64",
        ),
    ];
    for (body, status, msg) in cases {
        let r = request(addr, "POST", "/v1/chat/completions", &body);
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
        let e = r.json();
        assert!(
            e["error"]["message"].as_str().unwrap().contains(msg),
            "{msg:?}: {e}"
        );
        assert!(e["error"]["type"].is_string(), "{e}");
    }
    // Not a transcription run (data.text-targets is false): no transcriptions endpoint.
    let r = request(addr, "POST", "/v1/audio/transcriptions", b"");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not a transcription model"));
    let r = request(addr, "GET", "/v1/embeddings", b"");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no route"));

    // A body over the limit, declared: refused before it is sent.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 1073741824\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let r = parse_reply(&raw);
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    // ... and one that streams more than the limit without declaring it.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    let chunk = vec![b'a'; 256 * 1024];
    for _ in 0..24 {
        if write!(s, "{:x}\r\n", chunk.len()).is_err()
            || s.write_all(&chunk).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    assert_eq!(parse_reply(&raw).status, 413);

    // A slowloris client (headers never finished), 100 idle connections and a client that
    // hangs up mid-stream: the next good request is still answered, correctly (1,000 idle
    // connections: see the concurrency test, whose server waits longer for headers).
    let mut slow = TcpStream::connect(addr).unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    {
        let mut s = TcpStream::connect(addr).unwrap();
        let body = audio_body("two", json!({"stream": true})).to_string();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut first = [0u8; 64];
        let _ = s.read(&mut first);
    }
    // A slow body: the headers, then nothing; answered 408 after --body-timeout-s.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{{").unwrap();
    let t = Instant::now();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    assert_eq!(parse_reply(&raw).status, 408);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let r = chat(addr, &audio_body("three", json!({})));
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        expected[2].as_str()
    );
    // The slowloris connection was closed by the header timeout.
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    let closed = slow.read_to_end(&mut buf);
    assert!(closed.is_ok(), "{closed:?}");
    drop(idle);

    let metrics = String::from_utf8(request(addr, "GET", "/metrics", b"").body).unwrap();
    assert!(
        metrics.contains("earshot_requests_total{status=\"4xx\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("earshot_request_seconds_bucket"),
        "{metrics}"
    );
}

/// Many clients at once (32 x 4 requests): every answer is the one its request gets alone
/// (none lost or swapped; sampled answers, so that they differ), greedy requests arriving together decode
/// together with the answers they get alone, a request sent while another decodes joins its
/// decode loop and is answered first; with a
/// queue of one, a flood gets 429 with Retry-After for what does not fit, never an error;
/// SIGTERM lets the request in flight finish and the server exit 0.
#[test]
fn concurrent_clients_get_their_own_answers_and_a_full_queue_is_429() {
    let dir = tempfile::tempdir().unwrap();
    let (config, sets) = trained(dir.path());
    let checkpoint = dir.path().join("run/projector.safetensors");
    let expected = captions(&config, &sets, &checkpoint);
    let ck = checkpoint.to_str().unwrap().to_string();
    let server = Server::start(&config, &sets, &["--checkpoint", &ck]);
    let addr = server.addr;
    // Sixteen requests that each have their own answer: clip k % 4, sampled with seed k.
    let body = |k: usize, stream: bool| {
        audio_body(
            CLIPS[k % CLIPS.len()],
            json!({"stream": stream, "temperature": 1.0, "seed": k}),
        )
    };
    let text_of = |r: &Reply, stream: bool| -> String {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        if stream {
            r.events()
                .iter()
                .filter(|e| *e != "[DONE]")
                .filter_map(|e| {
                    serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_string)
                })
                .collect()
        } else {
            r.json()["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let alone: Vec<String> = (0..16)
        .map(|k| text_of(&chat(addr, &body(k, false)), false))
        .collect();
    let distinct: std::collections::BTreeSet<&String> = alone.iter().collect();
    assert!(
        distinct.len() >= 4,
        "too few distinct answers to see a mix-up: {alone:?}"
    );
    // 32 clients x 4 requests, each asking one of the 16 (streamed or not): the queue
    // (64) holds them all, so none is refused, and at most 8 decode together.
    let threads: Vec<_> = (0..32)
        .map(|t| {
            std::thread::spawn(move || {
                (0..4)
                    .map(|j| {
                        let k = (t * 4 + j) % 16;
                        let stream = (t + j) % 2 == 0;
                        (k, text_of(&chat(addr, &body(k, stream)), stream))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut answered = 0;
    for t in threads {
        for (k, text) in t.join().unwrap() {
            assert_eq!(text, alone[k], "request {k}");
            answered += 1;
        }
    }
    assert_eq!(answered, 128);
    // Greedy requests arriving together decode together, and still get their own answers.
    let metric = |name: &str| metric_of(addr, name);
    let greedy: Vec<_> = (0..12)
        .map(|k| {
            std::thread::spawn(move || {
                let r = chat(
                    addr,
                    &audio_body(CLIPS[k % CLIPS.len()], json!({"stream": k % 3 == 0})),
                );
                (k, text_of(&r, k % 3 == 0))
            })
        })
        .collect();
    for t in greedy {
        let (k, text) = t.join().unwrap();
        assert_eq!(text, expected[k % CLIPS.len()], "greedy request {k}");
    }
    assert!(
        metric("earshot_decoding_requests_peak") >= 2.0,
        "12 requests at once never decoded together"
    );
    assert_eq!(metric("earshot_decoding_requests"), 0.0);
    // 1,000 connections opened and left idle (the header timeout is 10 s here): all held
    // open at little cost in memory, and the next good request is answered correctly.
    let pid = server.child.id();
    let memory_kib = |field: &str| -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let rss_before = memory_kib("VmRSS:");
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let waited = Instant::now();
    while metric("earshot_open_connections") < 1000.0 {
        assert!(
            waited.elapsed() < Duration::from_secs(8),
            "the server never held 1,000 idle connections open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (rss_idle, peak) = (memory_kib("VmRSS:"), memory_kib("VmHWM:"));
    eprintln!(
        "server memory: {rss_before} KiB before 1,000 idle connections, {rss_idle} KiB with \
         them open (peak so far {peak} KiB)"
    );
    assert!(
        rss_idle.saturating_sub(rss_before) < 64 * 1024,
        "1,000 idle connections took {} KiB",
        rss_idle - rss_before
    );
    let r = chat(addr, &audio_body("three", json!({})));
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        expected[2].as_str()
    );
    drop(idle);
    // Continuous batching: a short request sent while a long one streams joins its decode
    // loop at once and is answered (with its own greedy answer) long before the long one
    // ends, instead of waiting for it.
    let long = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Write a very long story about this sound, with many chapters."},
            {"type": "input_audio", "input_audio": {"data": b64(&std::fs::read(clip("two")).unwrap()), "format": "wav"}}]}],
            "max_tokens": 200, "stream": true, "temperature": 1.0, "seed": 7,
            "stream_options": {"include_usage": true}}).to_string();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut first_delta = None;
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if first_delta.is_none() && String::from_utf8_lossy(&seen).contains("\"content\":\"") {
                first_delta = Some(Instant::now());
            }
        }
        (
            first_delta,
            Instant::now(),
            String::from_utf8_lossy(&seen).to_string(),
        )
    });
    // Once the long answer is streaming (its first delta seen by the server's metrics).
    let waited = Instant::now();
    while metric("earshot_decoding_requests") < 1.0 {
        assert!(
            waited.elapsed() < Duration::from_secs(60),
            "the long request never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let joins = metric("earshot_joins_total");
    let short = chat(addr, &audio_body("one", json!({})));
    let short_done = Instant::now();
    assert_eq!(
        short.json()["choices"][0]["message"]["content"],
        expected[0].as_str(),
        "the request that joined a running decode loop"
    );
    assert_eq!(metric("earshot_joins_total"), joins + 1.0);
    let (first_delta, long_done, long_text) = long.join().unwrap();
    assert!(first_delta.is_some_and(|t| t < short_done), "{long_text}");
    let usage: Value = parse_reply(long_text.as_bytes())
        .events()
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|v| v["usage"].is_object())
        .unwrap_or_else(|| panic!("no usage chunk: {long_text}"));
    let long_tokens = usage["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        long_done > short_done && long_tokens > 100,
        "the long request ({long_tokens} tokens) was not still decoding when the short one was answered"
    );
    drop(server);

    let mut server = Server::start(&config, &sets, &["--checkpoint", &ck, "--queue", "1"]);
    let addr = server.addr;
    let flood: Vec<_> = (0..10)
        .map(|_| std::thread::spawn(move || chat(addr, &audio_body("one", json!({})))))
        .collect();
    let replies: Vec<Reply> = flood.into_iter().map(|t| t.join().unwrap()).collect();
    let full: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!(
        !full.is_empty(),
        "no 429 in a flood of 10 with a queue of 1"
    );
    for r in &replies {
        match r.status {
            200 => assert_eq!(
                r.json()["choices"][0]["message"]["content"],
                expected[0].as_str()
            ),
            429 => {
                assert_eq!(r.header("retry-after"), Some("1"));
                assert_eq!(r.json()["error"]["type"], "rate_limit_error");
            }
            s => panic!("status {s}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    // A client that hangs up mid-stream: its decoding stops at the next step (counted),
    // and the next request is answered at once, correctly.
    let before = metric_of(addr, "earshot_cancelled_total");
    {
        let mut s = TcpStream::connect(addr).unwrap();
        let body = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Write a very long story about this sound, with many chapters."},
            {"type": "input_audio", "input_audio": {"data": b64(&std::fs::read(clip("two")).unwrap()), "format": "wav"}}]}],
            "max_tokens": 256, "stream": true, "temperature": 1.0, "seed": 7}).to_string();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Until the first content delta, then hang up.
        while !String::from_utf8_lossy(&seen).contains("\"content\":\"")
            || String::from_utf8_lossy(&seen)
                .matches("\"content\":")
                .count()
                < 2
        {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    }
    let r = chat(addr, &audio_body("one", json!({})));
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        expected[0].as_str()
    );
    assert_eq!(metric_of(addr, "earshot_cancelled_total"), before + 1.0);

    // SIGTERM with a request in flight: it is answered, then the server exits 0.
    let pending = std::thread::spawn(move || chat(addr, &audio_body("two", json!({}))));
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let r = pending.join().unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// The official `openai` Python client (pinned in tests/python/openai-requirements.txt,
/// installed into a throwaway venv under target/test-home): models, a chat answer equal to
/// `earshot caption`'s, the same answer streamed, and a refusal it raises as BadRequestError.
#[test]
fn the_openai_python_client_gets_the_caption() {
    let venv = test_home().join("openai-venv");
    let python = venv.join("bin/python");
    let requirements = repo_root().join("tests/python/openai-requirements.txt");
    let stamp = venv.join("requirements.txt");
    if std::fs::read(&stamp).ok() != std::fs::read(&requirements).ok() {
        let _ = std::fs::remove_dir_all(&venv);
        let made = std::process::Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 runs");
        assert!(made.success(), "python3 -m venv failed");
        let installed = std::process::Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "-r"])
            .arg(&requirements)
            .status()
            .unwrap();
        assert!(
            installed.success(),
            "pip install -r {} failed (this test needs PyPI)",
            requirements.display()
        );
        std::fs::copy(&requirements, &stamp).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (config, sets) = trained(dir.path());
    let checkpoint = dir.path().join("run/projector.safetensors");
    let expected = captions(&config, &sets, &checkpoint);
    let ck = checkpoint.to_str().unwrap().to_string();
    // Transcripts as targets: /v1/audio/transcriptions answers too.
    let mut sets = sets;
    sets.push("data.text-targets=true".into());
    let server = Server::start(&config, &sets, &["--checkpoint", &ck]);
    let out = std::process::Command::new(&python)
        .arg(repo_root().join("tests/python/openai_client.py"))
        .arg(format!("http://{}", server.addr))
        .arg(clip(CLIPS[0]))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["models"], json!(["tones"]));
    assert_eq!(v["text"], expected[0].as_str(), "{v}");
    assert_eq!(v["stream_text"], expected[0].as_str(), "{v}");
    assert_eq!(v["stream_ids"], 1, "{v}");
    assert_eq!(v["stream_usage"], v["usage"][2], "{v}");
    assert_eq!(v["refused"][0], 400, "{v}");
    assert!(
        v["refused"][1].as_str().unwrap().contains("no audio"),
        "{v}"
    );
    assert_eq!(v["transcript"], expected[0].as_str(), "{v}");
    assert_eq!(v["verbose"][0], expected[0].as_str(), "{v}");
    assert!(
        (v["verbose"][1].as_f64().unwrap() - 1.0).abs() < 0.01,
        "{v}"
    );
    assert_eq!(v["verbose"][2], json!([expected[0]]), "{v}");
    assert_eq!(v["plain"], format!("{}\n", expected[0]), "{v}");
}

/// The web page in headless Chromium, served by `earshot serve RUN_DIR`: its script runs under
/// the page's own content security policy and fills in the model the server lists (from
/// `/v1/models`).
#[test]
fn the_web_page_runs_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    trained(dir.path());
    // Served from the run folder alone (its config copy and checkpoint), read from a folder
    // other than the one it was trained from.
    let moved_cwd = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut cmd = earshot_command();
    cmd.current_dir(moved_cwd.path()).arg("serve").arg(&run);
    let server = Server::launch(cmd, &[]);
    let dom = headless_chromium_url(
        &format!("http://{}/", server.addr),
        &["--virtual-time-budget=10000", "--dump-dom"],
    );
    assert!(dom.contains(r#"<b id="model">tones</b>"#), "{dom}");
    assert!(dom.contains(r#"id="ask" type="button" disabled"#), "{dom}");
}
