//! `earshot serve`: a trained run behind the OpenAI chat-completions API.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

use crate::config::RunConfig;
use crate::serve::api::Limits;
use crate::serve::{run as serve, ServeOptions};

#[derive(Debug, Args)]
#[command(
    after_help = "Loads the run once (its config, checkpoint and plugins) and answers \
POST /v1/chat/completions as OpenAI's API does: one user message whose content holds text parts \
(the question, given to the run's prompt template as its instruction; none: the run's own \
instruction) and input_audio parts ({\"data\": base64, \"format\": \"wav\"|\"mp3\"|\"flac\"|\"ogg\"}; \
a data: URL prefix is accepted; several parts are joined in order). Options: max_tokens or \
max_completion_tokens, temperature, top_p, seed, stop, stream (server-sent chunks; \
stream_options.include_usage). Audio over 30 s is answered window by window as `earshot caption` \
does, never cut. Also GET /v1/models, /health and /metrics (Prometheus text). The answers go \
through the run's post-processor, as captions do. Requests decode together (continuous \
batching): one that arrives while others decode joins their decode loop at the next step, \
whatever its sampling settings, and leaves it when done (at most --max-batch at once; the rest \
wait in the queue). A full queue answers 429 with Retry-After. Every bad request is a 4xx with \
an OpenAI error body naming the field.\n\n\
The first line on stdout is the address served (`listening on http://HOST:PORT`; --port 0 \
picks a free port). SIGINT or SIGTERM stops accepting and lets requests in flight finish.\n\n\
Example (serves for 20 s, then stops as on Ctrl-C):\n  timeout --preserve-status -s INT 20 \\\n    earshot serve runs/try --port 0"
)]
pub struct ServeArgs {
    /// A trained run folder: its own copy of the config (config.toml) and its best/
    /// checkpoint, else its final projector
    #[arg(
        value_name = "RUN_DIR",
        required_unless_present = "config",
        conflicts_with = "config"
    )]
    pub run: Option<PathBuf>,
    /// Run config (TOML) of the trained run (instead of RUN_DIR)
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Checkpoint to serve (a file, a step folder, best/ or a run folder; default: the
    /// run's best/, else its final projector)
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// A PEFT LoRA adapter folder to put on the LLM (as `caption --adapter`)
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// With a multi-task config ([[task]]): the task whose prompt and post-processor answer
    #[arg(long, value_name = "NAME")]
    pub task: Option<String>,
    /// Override a config value (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port to listen on (0: any free port)
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model id /v1/models lists and requests name (default: the run folder's name)
    #[arg(long, value_name = "ID")]
    pub model_id: Option<String>,
    /// Largest request body, in MiB
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub max_body_mib: u64,
    /// Most seconds of audio per request (all parts together)
    #[arg(long, default_value_t = 600.0)]
    pub max_audio_s: f64,
    /// Most audio parts per message
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub max_audio_parts: u64,
    /// Largest max_tokens granted (and the default)
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=8192))]
    pub max_tokens: u64,
    /// Requests that may wait for the model before 429
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=100000))]
    pub queue: u64,
    /// Seconds from a request's body to its answer before 504
    #[arg(long, default_value_t = 300.0)]
    pub deadline_s: f64,
    /// Seconds a client may take to send a request's headers (slow clients are cut off)
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout_s: f64,
    /// Seconds a client may take to send a request's body
    #[arg(long, default_value_t = 60.0)]
    pub body_timeout_s: f64,
    /// Requests decoding together, at most (continuous batching: a request joins the
    /// running decode loop at the next step when there is room; up to 16, so that each
    /// answer is exactly the one it gets alone)
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub max_batch: u64,
    /// Open connections; more are closed at once
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1000000))]
    pub max_connections: u64,
}

fn seconds(name: &str, s: f64) -> Result<Duration> {
    anyhow::ensure!(
        s.is_finite() && s > 0.0 && s <= 86_400.0,
        "{name} must be a number of seconds in (0, 86400], got {s}"
    );
    Ok(Duration::from_secs_f64(s))
}

pub fn run(args: ServeArgs) -> Result<()> {
    anyhow::ensure!(
        args.max_audio_s.is_finite() && args.max_audio_s > 0.0,
        "--max-audio-s must be a positive number of seconds, got {}",
        args.max_audio_s
    );
    let config = match (&args.run, &args.config) {
        (Some(run), _) => {
            let copy = run.join("config.toml");
            anyhow::ensure!(
                copy.is_file(),
                "{}: not a trained run folder (it has no config.toml); give the folder \
                 `earshot train` wrote, or --config",
                run.display()
            );
            let config = RunConfig::load(&copy, &args.set).with_context(|| {
                format!(
                    "{}: the run's config copy does not load (a run trained before copies \
                     held absolute paths may name files relative to where it was trained: \
                     give --config and --checkpoint instead)",
                    copy.display()
                )
            })?;
            // The folder given is the run, wherever it was moved.
            RunConfig {
                train: crate::config::TrainConfig {
                    run_dir: run.clone(),
                    ..config.train
                },
                ..config
            }
        }
        (None, Some(path)) => RunConfig::load(path, &args.set)?,
        (None, None) => anyhow::bail!("give a run folder (RUN_DIR) or --config"),
    };
    let config = config.for_task(args.task.as_deref())?;
    let checkpoint = match &args.checkpoint {
        Some(p) => Some(p.clone()),
        None => {
            let run = &config.train.run_dir;
            let best = run.join("best");
            let last = run.join("projector.safetensors");
            if best.exists() {
                Some(best)
            } else if last.exists() {
                Some(last)
            } else {
                anyhow::bail!(
                    "{}: no best/ or projector.safetensors: train the run first, or give --checkpoint",
                    run.display()
                );
            }
        }
    };
    let model_id = args.model_id.clone().unwrap_or_else(|| {
        config
            .train
            .run_dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "earshot".into())
    });
    let limits = Limits {
        max_body_bytes: (args.max_body_mib as usize) << 20,
        max_audio_s: args.max_audio_s.min(config.data.max_audio_s),
        max_audio_parts: args.max_audio_parts as usize,
        max_tokens: args.max_tokens as usize,
        queue: args.queue as usize,
        deadline: seconds("--deadline-s", args.deadline_s)?,
        header_timeout: seconds("--header-timeout-s", args.header_timeout_s)?,
        body_timeout: seconds("--body-timeout-s", args.body_timeout_s)?,
        max_connections: args.max_connections as usize,
        ..Limits::default()
    };
    serve(ServeOptions {
        config,
        checkpoint,
        adapter: args.adapter,
        model_id,
        addr: SocketAddr::new(args.host, args.port),
        limits,
        max_batch: args.max_batch as usize,
        shutdown_grace: Duration::from_secs(30),
    })
}
