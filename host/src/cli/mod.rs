//! The `earshot` command line: one module per subcommand. Results go to stdout, logs and
//! progress to stderr.

mod audio_info;
mod cache;
mod caption;
mod common;
mod compare;
mod dataset;
mod encode;
mod eval;
pub mod exit;
mod generate;
mod import;
mod inspect;
mod mel;
mod plugin;
mod printer;
mod prompt;
mod selftest;
mod serve;
mod train;
mod values;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The environment variables every command reads, for `earshot --help`.
const ENVIRONMENT: &str = "Environment: EARSHOT_HOME (models, data and caches; default \
~/.cache/earshot); EARSHOT_SIMD=auto|avx512|avx2|portable (caps the vector instructions of \
earshot's own CPU kernels, for comparing or working around a CPU; default auto: the widest the \
CPU runs); RUST_LOG (log filter, overrides -v).";

/// What `earshot --version` prints: the version and the cargo features this binary was
/// built with (whether it can join an MPI job, run on CUDA; the MPI tests read it).
const VERSION: &str = match (cfg!(feature = "mpi"), cfg!(feature = "cuda")) {
    (true, true) => concat!(env!("CARGO_PKG_VERSION"), " (features: mpi, cuda)"),
    (true, false) => concat!(env!("CARGO_PKG_VERSION"), " (features: mpi)"),
    (false, true) => concat!(env!("CARGO_PKG_VERSION"), " (features: cuda)"),
    (false, false) => concat!(env!("CARGO_PKG_VERSION"), " (features: none)"),
};

#[derive(Debug, Parser)]
#[command(
    name = "earshot",
    version = VERSION,
    about = "Teach a frozen LLM to listen: Whisper encoder + trainable projector + frozen LLM",
    long_about = None,
    after_help = format!("{ENVIRONMENT}\n\n{}", exit::HELP),
)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Seconds between progress lines of long phases (encoding, evaluating, captioning a
    /// split) on stderr
    #[arg(long, global = true, value_name = "S", default_value_t = 10.0,
          value_parser = parse_interval)]
    progress_interval: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compute Whisper log-mel features of an audio file and write them as .npy
    Mel(mel::MelArgs),
    /// Show container, codec, sample rate, channels and duration of an audio file
    AudioInfo(audio_info::AudioInfoArgs),
    /// Run the frozen Whisper encoder on audio (or a mel .npy) and write its output as .npy
    Encode(encode::EncodeArgs),
    /// Continue a text prompt with the LLM (text only; checks the LLM path end to end)
    Generate(generate::GenerateArgs),
    /// Summarise a model file/folder and check every tensor for NaN/Inf
    Inspect(inspect::InspectArgs),
    /// Convert models from other formats to Hugging Face layout
    Import(import::ImportArgs),
    /// Work with plugins (WebAssembly components)
    Plugin(plugin::PluginArgs),
    /// Read datasets through dataset-adapter plugins
    Dataset(dataset::DatasetArgs),
    /// Print the prompt pieces a prompt-template plugin renders
    Prompt(prompt::PromptArgs),
    /// Train the projector from a TOML run config
    Train(train::TrainArgs),
    /// Caption audio files or a dataset split with a trained projector
    Caption(caption::CaptionArgs),
    /// Score captions against references (BLEU, ROUGE-L, CIDEr-D, WER/CER, attributes)
    Eval(eval::EvalArgs),
    /// Compare training runs: loss table and overlaid curves (PNG)
    Compare(compare::CompareArgs),
    /// Inspect or prune the encoder-output and plugin caches
    Cache(cache::CacheArgs),
    /// Check the models on a device with random weights at named shapes (no download)
    Selftest(selftest::SelftestArgs),
    /// Serve a trained run behind the OpenAI chat-completions API (HTTP)
    Serve(serve::ServeArgs),
}

pub fn main() -> ExitCode {
    crate::models::device::count_threads_once();
    crate::alloc::tune_for_tensors();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    printer::set_progress_interval(cli.progress_interval);
    // A bad EARSHOT_SIMD is a usage error before any work, not a silent fallback.
    match crate::models::simd::check_env() {
        Ok(level) => tracing::info!(
            "CPU kernels: {} (detected {}; {} caps it)",
            level.name(),
            crate::models::simd::detected().name(),
            crate::models::simd::ENV
        ),
        Err(err) => {
            printer::error(&err);
            return ExitCode::from(exit::USAGE);
        }
    }
    let result = match cli.command {
        Command::Mel(args) => mel::run(args),
        Command::AudioInfo(args) => audio_info::run(args),
        Command::Encode(args) => encode::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Import(args) => import::run(args),
        Command::Plugin(args) => plugin::run(args),
        Command::Dataset(args) => dataset::run(args),
        Command::Prompt(args) => prompt::run(args),
        Command::Train(args) => train::run(args),
        Command::Caption(args) => caption::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Cache(args) => cache::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Selftest(args) => selftest::run(args),
        Command::Serve(args) => serve::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): stop quietly, as other Unix tools do.
        Err(err) if exit::code_of(&err) == exit::BROKEN_PIPE => ExitCode::from(exit::BROKEN_PIPE),
        Err(err) => {
            // Errors carry text from plugins and files: escape what could drive the terminal.
            let text = format!("{err:#}");
            let safe: Vec<String> = text
                .lines()
                .map(|l| crate::text::display_text(l, 64 * 1024))
                .collect();
            printer::error(&safe.join("\n"));
            ExitCode::from(exit::code_of(&err))
        }
    }
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(v.is_finite() && (0.0..=86_400.0).contains(&v)) {
        return Err(format!("{s}: must be between 0 and 86400 seconds"));
    }
    Ok(v)
}

fn init_logging(verbose: u8) {
    // symphonia logs recoverable probe misses as errors; our own error says what matters.
    let default = match verbose {
        0 => "warn,symphonia_core=off,symphonia=off",
        1 => "info,symphonia_core=warn,symphonia=warn",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Each stage's span (encode, mel, decode loop, plugin call, checkpoint ...) is logged
    // when it closes, with its time, wherever the filter enables it (debug).
    let _ = tracing_subscriber::fmt()
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
