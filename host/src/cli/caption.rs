use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Tensor;
use clap::{Args, ValueEnum};

use crate::audio;
use crate::caption::{caption_batch, clip_rest, Caption, CaptionRequest, PromptPrefix};
use crate::config::RunConfig;
use crate::models::llm::load_llm;
use crate::models::projector::Projector;
use crate::models::whisper::WhisperEncoder;
use crate::models::Runtime;
use crate::plugins::{
    display_text, terminal_safe_json, AudioSource, DatasetAdapter, Example, PluginHost,
    PostProcessor, PromptTemplate, SplitPages, PAGE_SIZE,
};
use crate::sampler::Sampler;
use crate::train::{
    build_manifest, example_segment, load_example_audio, mel_settings, ClipEncoder,
};

use super::common::SamplingArgs;
use super::printer::PhaseProgress;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LongAudio {
    /// One caption per 30 s window, with its start and end time
    PerWindow,
    /// One caption from the concatenated windows' audio embeddings
    Concat,
}

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
    #[arg(long, default_value_t = 60)]
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
}

enum Source {
    File(PathBuf),
    Example(Box<Example>),
}

struct Item {
    id: String,
    /// Shown in output and errors.
    audio: String,
    source: Source,
    metadata: Vec<(String, String)>,
    references: Vec<String>,
}

/// A window's start and end in seconds.
type Span = (f64, f64);

/// One caption to produce: a clip, or one window of it.
struct Job {
    item: usize,
    /// The window's span in seconds (per-window long audio only).
    span: Option<(f64, f64)>,
    prefix: Vec<u32>,
    rest: Tensor,
    stop_strings: Vec<String>,
    /// Time spent decoding and encoding the item.
    prepare_s: f64,
}

struct Done {
    span: Option<(f64, f64)>,
    text: String,
    tokens: usize,
    seconds: f64,
}

/// Where the items to caption come from, read a chunk at a time so that a split is streamed
/// through captioning with bounded memory (a split can be endless or hold inline audio).
enum ItemSource<'a> {
    Files(std::vec::IntoIter<PathBuf>),
    Split(SplitPages<'a>),
}

impl ItemSource<'_> {
    /// Up to `n` items; empty at the end.
    fn next_chunk(&mut self, n: usize, root: &Path) -> Result<Vec<Item>> {
        match self {
            ItemSource::Files(files) => Ok(files
                .by_ref()
                .take(n)
                .map(|p| Item {
                    id: p
                        .file_stem()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .to_string(),
                    audio: p.display().to_string(),
                    source: Source::File(p),
                    metadata: Vec::new(),
                    references: Vec::new(),
                })
                .collect()),
            ItemSource::Split(pages) => {
                let Some(examples) = pages.next_page_of(n.min(PAGE_SIZE as usize) as u32)? else {
                    return Ok(Vec::new());
                };
                Ok(examples
                    .into_iter()
                    .map(|ex| {
                        let mut references = ex.references.clone();
                        if let Some(t) = &ex.target {
                            references.insert(0, t.clone());
                        }
                        Item {
                            id: ex.id.clone(),
                            audio: match &ex.audio {
                                AudioSource::Path(rel) => root.join(rel).display().to_string(),
                                AudioSource::Inline(b) => format!("<{} inline bytes>", b.len()),
                            },
                            metadata: ex.metadata.clone(),
                            references,
                            source: Source::Example(Box::new(ex)),
                        }
                    })
                    .collect())
            }
        }
    }
}

pub fn run(args: CaptionArgs) -> Result<()> {
    let cfg = RunConfig::load(&args.config, &args.set)?;
    let params = args.sampling.params();
    Sampler::new(params)?;
    let rt = Runtime::best_available();
    let encoder = WhisperEncoder::load_dir(&cfg.models.whisper, &rt)
        .with_context(|| format!("loading Whisper from {}", cfg.models.whisper.display()))?;
    let llm = load_llm(&cfg.models.llm, &rt)
        .with_context(|| format!("loading the LLM from {}", cfg.models.llm.display()))?;
    let host = PluginHost::new(cfg.plugins.sandbox, PluginHost::default_cache_dir());
    let mut template = PromptTemplate::load(&host, &cfg.plugins.prompt_template)?;
    let mut post = match &cfg.plugins.post_processor {
        Some(p) => Some(PostProcessor::load(&host, p)?),
        None => None,
    };
    let settings = mel_settings(&cfg, &encoder);
    let manifest = build_manifest(&cfg, &settings)?;
    let mut projector = Projector::new(
        &cfg.projector,
        encoder.config.d_model,
        llm.model.config.hidden_size,
        cfg.train.seed,
        &rt.device,
    )?;
    match &args.checkpoint {
        Some(p) => {
            let (file, state) = crate::train::checkpoint::resolve(p)?;
            if let Some(state) = state {
                let text = std::fs::read_to_string(&state)
                    .with_context(|| format!("{}: cannot read", state.display()))?;
                let saved: crate::train::checkpoint::TrainState = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not a checkpoint state", state.display()))?;
                let differs = saved.manifest.differences(&manifest);
                if !differs.is_empty() {
                    let what = differs.join(", ");
                    if args.allow_mismatch {
                        tracing::warn!("checkpoint {} was made with a different {what}; used anyway (--allow-mismatch)", p.display());
                    } else {
                        bail!("checkpoint {} was made with a different {what} than {} uses; pass --allow-mismatch to caption with it anyway", p.display(), args.config.display());
                    }
                }
            }
            projector
                .load_into(&file)
                .with_context(|| format!("loading the projector {}", file.display()))?;
        }
        None => eprintln!(
            "warning: no --checkpoint: the projector is freshly initialised (seed {}), so the captions are gibberish",
            cfg.train.seed
        ),
    }
    let mut adapter = match &args.split {
        Some(split) => {
            let ds =
                DatasetAdapter::open(&host, &cfg.data.adapter, &cfg.data.root, &cfg.data.options)?;
            for w in &ds.dataset.warnings {
                tracing::warn!("dataset: {w}");
            }
            ds.require_split(split)?;
            Some(ds)
        }
        None if args.audio.is_empty() => bail!("give audio files to caption, or --split NAME"),
        None => None,
    };
    let mut items = match (&mut adapter, &args.split) {
        (Some(ds), Some(split)) => ItemSource::Split(ds.pages(split, PAGE_SIZE)),
        _ => ItemSource::Files(args.audio.clone().into_iter()),
    };
    let jsonl = args.jsonl || args.split.is_some() || args.audio.len() > 1;
    let stream = !jsonl && std::io::stdout().is_terminal();
    let mut clips = ClipEncoder::with_default_cache(&encoder, &rt, settings, &manifest)?;
    let mut prefixes: HashMap<Vec<u32>, PromptPrefix> = HashMap::new();
    let mut out = std::io::stdout().lock();
    let mut failures = 0;
    let batch = args.batch_size as usize;
    let mut total = 0;
    let mut progress = args
        .split
        .as_ref()
        .map(|split| PhaseProgress::new(format!("captioning {split}"), "clip(s)"));
    loop {
        let chunk = items.next_chunk(batch, &cfg.data.root)?;
        if chunk.is_empty() {
            break;
        }
        // Decode, encode and lay out every clip of the chunk.
        let mut jobs = Vec::new();
        let mut failed: HashMap<usize, String> = HashMap::new();
        for (k, item) in chunk.iter().enumerate() {
            let started = Instant::now();
            let made = (|| -> Result<Vec<Job>> {
                let (samples, segment) = match &item.source {
                    Source::File(p) => (
                        audio::load_16k_mono_within(
                            p,
                            audio::Segment::whole(),
                            cfg.data.max_audio_s,
                        )?,
                        (None, None),
                    ),
                    Source::Example(ex) => (
                        load_example_audio(
                            ex,
                            &cfg.data.root,
                            example_segment(ex),
                            cfg.data.max_audio_s,
                        )?,
                        (ex.start_s, ex.end_s),
                    ),
                };
                let encoded = clips.encode_samples(&samples, segment, None)?;
                let prompt = template.render(&item.metadata, &cfg.plugins.prompt_options)?;
                let before = llm.tokenizer.encode(&prompt.before_audio)?;
                let after = llm.tokenizer.encode_piece(&prompt.after_audio)?;
                let duration = samples.len() as f64 / 16000.0;
                let groups: Vec<(Option<Span>, Vec<Tensor>)> = match args.long_audio {
                    LongAudio::PerWindow => encoded
                        .into_iter()
                        .enumerate()
                        .map(|(w, e)| {
                            let start = w as f64 * 30.0;
                            (Some((start, (start + 30.0).min(duration))), vec![e])
                        })
                        .collect(),
                    LongAudio::Concat => vec![(None, encoded)],
                };
                let prepare_s = started.elapsed().as_secs_f64();
                groups
                    .into_iter()
                    .map(|(span, windows)| {
                        let rest = clip_rest(&llm.model, &projector, &windows, &after)?;
                        // Checked here so one over-long clip fails alone, not its batch.
                        let positions = before.len() + rest.dim(1)? + args.max_tokens;
                        let context = llm.model.config.max_position_embeddings;
                        if positions > context {
                            bail!(
                                "{} prompt positions ({} windows of audio) plus --max-tokens {} exceed the LLM's context of {context}; use --long-audio per-window or fewer tokens",
                                before.len() + rest.dim(1)?,
                                windows.len(),
                                args.max_tokens
                            );
                        }
                        Ok(Job {
                            item: k,
                            span,
                            prefix: before.clone(),
                            rest,
                            stop_strings: prompt.stop_strings.clone(),
                            prepare_s,
                        })
                    })
                    .collect()
            })();
            match made {
                Ok(j) => jobs.extend(j),
                Err(e) => {
                    failed.insert(k, format!("{e:#}"));
                }
            }
        }
        // Decode: jobs that share the text before the audio go together, `batch` at a time
        // (one at a time when streaming to a terminal).
        let per_batch = if stream { 1 } else { batch };
        let mut results: Vec<Option<Result<Caption, String>>> =
            (0..jobs.len()).map(|_| None).collect();
        let mut order: Vec<usize> = (0..jobs.len()).collect();
        order.sort_by(|&a, &b| jobs[a].prefix.cmp(&jobs[b].prefix).then(a.cmp(&b)));
        for group in order.chunk_by(|&a, &b| jobs[a].prefix == jobs[b].prefix) {
            let ids = &jobs[group[0]].prefix;
            if !prefixes.contains_key(ids) {
                // The text before the audio is usually the same for every clip: its keys
                // and values are computed once and reused.
                if prefixes.len() >= 16 {
                    prefixes.clear();
                }
                prefixes.insert(ids.clone(), PromptPrefix::new(&llm.model, ids)?);
            }
            let prefix = &prefixes[ids];
            for sub in group.chunks(per_batch) {
                let requests = sub
                    .iter()
                    .map(|&j| {
                        Ok(CaptionRequest {
                            rest: jobs[j].rest.clone(),
                            sampler: Sampler::new(params)?,
                            max_tokens: args.max_tokens,
                            stop_strings: jobs[j].stop_strings.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mut streamed = Streamed::default();
                if stream {
                    let job = &jobs[sub[0]];
                    if let Some(span) = job.span.filter(|_| many_windows(&jobs, job.item)) {
                        write!(out, "{}", span_label(span))?;
                    }
                }
                let decoded = caption_batch(
                    &llm.model,
                    &llm.tokenizer,
                    prefix,
                    llm.tokenizer.special.eos,
                    requests,
                    |_, text| {
                        if stream {
                            streamed.show(&mut out, text);
                        }
                    },
                );
                match decoded {
                    Ok(captions) => {
                        for (&j, c) in sub.iter().zip(captions) {
                            results[j] = Some(Ok(c));
                        }
                    }
                    Err(e) => {
                        for &j in sub {
                            results[j] = Some(Err(format!("{e:#}")));
                        }
                    }
                }
                if stream {
                    // Post-process now so the streamed raw text can be replaced in place.
                    let j = sub[0];
                    let job = &jobs[j];
                    let label = job
                        .span
                        .filter(|_| many_windows(&jobs, job.item))
                        .map(span_label)
                        .unwrap_or_default();
                    match results[j].take().expect("decoded") {
                        Ok(c) => {
                            let item = &chunk[job.item];
                            match finish_caption(&mut post, c, job, &item.metadata) {
                                Ok(done) => {
                                    streamed.replace(&mut out, &label, &done.text)?;
                                }
                                Err(e) => {
                                    writeln!(out)?;
                                    failed.entry(job.item).or_insert(e);
                                }
                            }
                        }
                        Err(e) => {
                            writeln!(out)?;
                            failed.entry(job.item).or_insert(e);
                        }
                    }
                }
            }
        }
        // Report the chunk's items in input order.
        let mut per_item: HashMap<usize, Vec<Done>> = HashMap::new();
        for (job, result) in jobs.iter().zip(results) {
            let Some(result) = result else { continue };
            let done = result.and_then(|c| {
                let metadata = &chunk[job.item].metadata;
                finish_caption(&mut post, c, job, metadata)
            });
            match done {
                Ok(d) => per_item.entry(job.item).or_default().push(d),
                Err(e) => {
                    failed.entry(job.item).or_insert(e);
                }
            }
        }
        for (i, item) in chunk.iter().enumerate() {
            if let Some(msg) = failed.get(&i) {
                failures += 1;
                // Errors from decoding already name the file.
                let shown = if msg.contains(&item.audio) {
                    msg.clone()
                } else {
                    format!("{}: {msg}", item.audio)
                };
                eprintln!("error: {}", display_text(&shown, 64 * 1024));
                if jsonl {
                    let v = serde_json::json!({"id": item.id, "audio": item.audio, "error": msg});
                    writeln!(out, "{}", terminal_safe_json(v.to_string()))?;
                }
                continue;
            }
            if stream {
                continue;
            }
            let dones = per_item.remove(&i).unwrap_or_default();
            let several = dones.len() > 1;
            for d in dones {
                if jsonl {
                    let mut v = serde_json::json!({
                        "id": item.id, "audio": item.audio, "caption": d.text,
                        "tokens": d.tokens, "seconds": d.seconds,
                    });
                    if !item.references.is_empty() {
                        v["references"] = item.references.clone().into();
                    }
                    if let Some((start, end)) = d.span {
                        v["start_s"] = start.into();
                        v["end_s"] = end.into();
                    }
                    writeln!(out, "{}", terminal_safe_json(v.to_string()))?;
                } else {
                    let text = display_text(&d.text, usize::MAX);
                    match d.span.filter(|_| several) {
                        Some(span) => writeln!(out, "{}{text}", span_label(span))?,
                        None => writeln!(out, "{text}")?,
                    }
                }
            }
        }
        out.flush()?;
        total += chunk.len();
        if let Some(line) = progress.as_mut().and_then(|p| p.line(total, None)) {
            eprintln!("{line}");
        }
    }
    tracing::info!(
        "{} window(s) went through the encoder, the rest came from the cache",
        clips.fresh
    );
    if failures > 0 {
        bail!("{failures} of {total} input(s) failed");
    }
    Ok(())
}

/// The caption post-processor applied to a decoded caption.
fn finish_caption(
    post: &mut Option<PostProcessor>,
    c: Caption,
    job: &Job,
    metadata: &[(String, String)],
) -> Result<Done, String> {
    let tokens = c.ids.len();
    let text = match post.as_mut() {
        Some(p) => p
            .process(&c.text, &job.stop_strings, metadata)
            .map_err(|e| format!("{:#}", anyhow!(e)))?,
        None => c.text,
    };
    Ok(Done {
        span: job.span,
        text,
        tokens,
        seconds: job.prepare_s + c.done.as_secs_f64(),
    })
}

fn many_windows(jobs: &[Job], item: usize) -> bool {
    jobs.iter().filter(|j| j.item == item).count() > 1
}

/// `[m:ss.s-m:ss.s] `
fn span_label((start, end): (f64, f64)) -> String {
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
