use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use crate::caption::{
    CaptionEvent, CaptionItem, CaptionSettings, Captioner, ItemResult, ItemSource, LongAudio, Span,
};
use crate::config::RunConfig;
use crate::dist::World;
use crate::plugins::PAGE_SIZE;
use crate::text::{display_text, terminal_safe_json};

use super::common::SamplingArgs;
use super::printer::{self, PhaseProgress};

#[derive(Debug, Args)]
#[command(
    after_help = "Without --checkpoint the projector is freshly initialised and the \
captions are gibberish (a warning says so). One file: the caption on stdout, streamed as it is \
generated when stdout is a terminal. Several files, --split or --jsonl: one JSON object per \
line {id, audio, caption, references, tokens, seconds} (plus start_s/end_s per window). A file \
that fails gets an error line; the others are still captioned and the exit status is 1. \
Encoder outputs are cached under $EARSHOT_HOME/cache/encoder (shared with training).\n\nExample:\n  earshot caption --config configs/cpu-smollm2-tones.toml --checkpoint runs/try \\\n    configs/data/tones/clips/one.wav"
)]
pub struct CaptionArgs {
    /// Run config (models, plugins, projector settings)
    #[arg(long)]
    pub config: PathBuf,
    /// Trained projector: projector.safetensors, a checkpoint folder (step-N), a folder of
    /// checkpoints (best, checkpoints: the newest) or a run folder (its final projector).
    /// A checkpoint's manifest is checked against the config's models
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// LoRA adapter folder in PEFT's layout (adapter_config.json + adapter_model.safetensors,
    /// as Python's peft writes it, or a LoRA run's adapter/): put on the LLM in place of the
    /// adapters of the config's [lora] and the checkpoint
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Fold the LoRA adapters into the LLM's weights first (W + s B A): the same outputs to
    /// rounding without the adapters' extra products. For f32/bf16 bases; on a GGUF base the
    /// merged projections lose their packed blocks and decode from f32 matrices
    #[arg(long)]
    pub merge: bool,
    /// Caption with a checkpoint made for other models / mel settings / template
    #[arg(long, requires = "checkpoint")]
    pub allow_mismatch: bool,
    /// Audio files to caption
    pub audio: Vec<PathBuf>,
    /// Caption a split of the config's dataset instead of files
    #[arg(long, conflicts_with = "audio")]
    pub split: Option<String>,
    /// JSON lines even for a single file
    #[arg(long)]
    pub jsonl: bool,
    /// Maximum new tokens per caption
    #[arg(
        long,
        default_value_t = 60,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_tokens: usize,
    /// Captions decoded together in one batch (clips that finish early drop out)
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub batch_size: u64,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Audio longer than 30 s
    #[arg(long, value_enum, default_value_t = LongAudio::PerWindow)]
    pub long_audio: LongAudio,
    /// Override a config value (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// A multi-task config's task ([[task]] name) whose prompt, post-processor and dataset
    /// to use; default: the config file's own task
    #[arg(long, value_name = "NAME")]
    pub task: Option<String>,
}

impl CaptionArgs {
    fn settings(&self) -> CaptionSettings {
        CaptionSettings {
            max_tokens: self.max_tokens,
            batch_size: self.batch_size as usize,
            sampling: self.sampling.params(),
            long_audio: self.long_audio,
        }
    }
}

/// How results are written: JSON lines, or plain captions (streamed on a terminal).
struct Output {
    jsonl: bool,
    stream: bool,
}

pub fn run(args: CaptionArgs) -> Result<()> {
    super::common::on_this_rank(|world| caption_on_rank(&args, world))
}

/// Captions the inputs, or under `mpirun -np N` this rank's share of them: the inputs are
/// read in chunks of --batch-size on every rank, each round of N chunks gives chunk r to
/// rank r, and rank 0 writes every rank's results in input order. Each chunk is the batch a
/// single process would caption, so the captions are the same.
fn caption_on_rank(args: &CaptionArgs, world: &World) -> Result<()> {
    let cfg = RunConfig::load(&args.config, &args.set)?.for_task(args.task.as_deref())?;
    let settings = args.settings();
    crate::sampler::Sampler::new(settings.sampling)?;
    if args.split.is_none() && args.audio.is_empty() {
        bail!("give audio files to caption, or --split NAME");
    }
    let mut captioner = super::common::load_captioner(
        cfg,
        args.checkpoint.as_deref(),
        args.allow_mismatch,
        args.adapter.as_deref(),
        args.merge,
    )?;
    let mut adapter = match &args.split {
        Some(split) => Some(captioner.open_dataset(split)?),
        None => None,
    };
    let root = captioner.config.data.root.clone();
    let mut items = match (&mut adapter, &args.split) {
        (Some(ds), Some(split)) => ItemSource::Split {
            pages: ds.pages(split, PAGE_SIZE),
            root,
        },
        _ => ItemSource::Files(args.audio.clone().into_iter()),
    };
    let jsonl = args.jsonl || args.split.is_some() || args.audio.len() > 1;
    let output = Output {
        jsonl,
        // Several ranks: rank 0 writes what the others captioned, whole.
        stream: !jsonl && world.size() == 1 && std::io::stdout().is_terminal(),
    };
    let mut stdout = std::io::stdout().lock();
    let mut progress = args
        .split
        .as_ref()
        .filter(|_| world.is_root())
        .map(|split| PhaseProgress::new(format!("captioning {split}"), "clip(s)"));
    let (mut failures, mut total) = (0u64, 0u64);
    loop {
        // Every rank reads the same chunks; rank r captions the r-th of each round.
        let mut round = Vec::with_capacity(world.size());
        for _ in 0..world.size() {
            round.push(items.next_chunk(settings.batch_size)?);
        }
        // Rank 0's reading decides the end, so that no rank waits for one that stopped.
        if !world.root_says(!round[0].is_empty()) {
            break;
        }
        let mine = std::mem::take(&mut round[world.rank()]);
        let mut share = Share::default();
        if !mine.is_empty() {
            let results = caption_chunk(&mut captioner, &mine, &settings, &output, &mut stdout)?;
            for (item, result) in mine.iter().zip(&results) {
                share.failed += u64::from(output.write(&mut share.written, item, result)?);
            }
            share.items = mine.len() as u64;
        }
        let Some(shares) = world.gather_bytes(&share.to_bytes())? else {
            continue;
        };
        for bytes in shares {
            let share = Share::from_bytes(&bytes)?;
            failures += share.failed;
            total += share.items;
            stdout.write_all(&share.written)?;
        }
        stdout.flush()?;
        if let Some(line) = progress.as_mut().and_then(|p| p.line(total as usize, None)) {
            printer::progress(&line);
        }
    }
    let counts = captioner.encode_counts();
    tracing::info!(
        "{} window(s) went through the encoder, {} came from the cache",
        counts.encoder_runs,
        counts.cache_hits
    );
    if !world.is_root() {
        // Rank 0 wrote this rank's captions and says how the inputs fared.
        return Ok(());
    }
    if failures == total && total > 0 {
        bail!("all {total} input(s) failed");
    }
    if failures > 0 {
        return Err(super::exit::Exit::partial(format!(
            "{failures} of {total} input(s) failed; the others were captioned"
        )));
    }
    Ok(())
}

/// What one rank captioned in a round: its output lines, how many items, how many failed.
#[derive(Default)]
struct Share {
    failed: u64,
    items: u64,
    written: Vec<u8>,
}

impl Share {
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.written.len());
        out.extend(self.failed.to_le_bytes());
        out.extend(self.items.to_le_bytes());
        out.extend(&self.written);
        out
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let (Some(failed), Some(items)) = (bytes.get(..8), bytes.get(8..16)) else {
            bail!("a rank sent {} bytes of results, not a share", bytes.len());
        };
        Ok(Self {
            failed: u64::from_le_bytes(failed.try_into()?),
            items: u64::from_le_bytes(items.try_into()?),
            written: bytes[16..].to_vec(),
        })
    }
}

/// Captions one chunk; on a terminal, each caption is shown as it is generated and then
/// replaced by its post-processed text.
fn caption_chunk(
    captioner: &mut Captioner,
    chunk: &[CaptionItem],
    settings: &CaptionSettings,
    output: &Output,
    out: &mut impl Write,
) -> Result<Vec<ItemResult>> {
    if !output.stream {
        return Ok(captioner.caption(chunk, settings, false, &mut |_| {})?);
    }
    let mut streamed = Streamed::default();
    let mut label = String::new();
    let mut failure: Option<std::io::Error> = None;
    let results = captioner.caption(chunk, settings, true, &mut |event| match event {
        CaptionEvent::Started { span, windows, .. } => {
            streamed = Streamed::default();
            label = span
                .filter(|_| windows > 1)
                .map(span_label)
                .unwrap_or_default();
            let _ = write!(out, "{label}");
        }
        CaptionEvent::Partial { text, .. } => streamed.show(out, text),
        CaptionEvent::Finished { result, .. } => {
            let shown = match result {
                Ok(c) => streamed.replace(out, &label, &c.text),
                Err(_) => writeln!(out).map_err(Into::into),
            };
            if let Err(e) = shown {
                failure.get_or_insert(std::io::Error::other(format!("{e:#}")));
            }
        }
    })?;
    if let Some(e) = failure {
        return Err(e.into());
    }
    Ok(results)
}

impl Output {
    /// Writes an item's result to `out`; whether it failed.
    fn write(&self, out: &mut impl Write, item: &CaptionItem, result: &ItemResult) -> Result<bool> {
        let captions = match result {
            Ok(c) => c,
            Err(msg) => {
                // Errors from decoding already name the file.
                let shown = if msg.contains(&item.audio) {
                    msg.clone()
                } else {
                    format!("{}: {msg}", item.audio)
                };
                printer::error(&display_text(&shown, 64 * 1024));
                if self.jsonl {
                    let v = serde_json::json!({"id": item.id, "audio": item.audio, "error": msg});
                    writeln!(out, "{}", terminal_safe_json(v.to_string()))?;
                }
                return Ok(true);
            }
        };
        if self.stream {
            return Ok(false);
        }
        let several = captions.len() > 1;
        for c in captions {
            if self.jsonl {
                let mut v = serde_json::json!({
                    "id": item.id, "audio": item.audio, "caption": c.text,
                    "tokens": c.tokens, "seconds": c.seconds,
                });
                if !item.references.is_empty() {
                    v["references"] = item.references.clone().into();
                }
                if !item.metadata.is_empty() {
                    v["metadata"] = crate::eval::split::metadata_object(&item.metadata);
                }
                if let Some((start, end)) = c.span {
                    v["start_s"] = start.into();
                    v["end_s"] = end.into();
                }
                writeln!(out, "{}", terminal_safe_json(v.to_string()))?;
            } else {
                let text = display_text(&c.text, usize::MAX);
                match c.span.filter(|_| several) {
                    Some(span) => writeln!(out, "{}{text}", span_label(span))?,
                    None => writeln!(out, "{text}")?,
                }
            }
        }
        Ok(false)
    }
}

/// `[m:ss.s-m:ss.s] `
fn span_label((start, end): Span) -> String {
    let t = |s: f64| format!("{}:{:04.1}", (s / 60.0).floor() as u64, s % 60.0);
    format!("[{}-{}] ", t(start), t(end))
}

/// Raw caption text shown on a terminal while it is generated, then replaced by the
/// post-processed caption.
#[derive(Default)]
struct Streamed {
    shown: String,
}

impl Streamed {
    /// Shows what `text` adds to what is on screen. Text that may still change (an
    /// incomplete UTF-8 sequence, or the start of a stop string) is held back by the caller's
    /// stop-string cut and by waiting for a clean extension.
    fn show(&mut self, out: &mut impl Write, text: &str) {
        if let Some(new) = text.strip_prefix(self.shown.as_str()) {
            let new = new.trim_end_matches('\u{FFFD}');
            if !new.is_empty() {
                let _ = write!(out, "{}", display_text(new, usize::MAX));
                let _ = out.flush();
                self.shown.push_str(new);
            }
        }
    }

    /// Replaces the streamed text (after `label`) by `text` and ends the line.
    fn replace(&mut self, out: &mut impl Write, label: &str, text: &str) -> Result<()> {
        if text == self.shown {
            writeln!(out)?;
            return Ok(());
        }
        let term = console::Term::stdout();
        let width = usize::from(term.size().1).max(1);
        let rows: usize = format!("{label}{}", self.shown)
            .split('\n')
            .map(|l| console::measure_text_width(l).div_ceil(width).max(1))
            .sum();
        out.flush()?;
        term.clear_line()?;
        term.clear_last_lines(rows - 1)?;
        writeln!(out, "{label}{}", display_text(text, usize::MAX))?;
        Ok(())
    }
}
