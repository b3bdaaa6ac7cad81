use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::{Args, ValueEnum};

use crate::audio::{self, Segment};
use crate::caption::{caption_clip, PromptPrefix};
use crate::config::RunConfig;
use crate::mel::{LogMelExtractor, MelSettings, N_FRAMES};
use crate::models::llm::load_llm;
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::projector::Projector;
use crate::models::whisper::WhisperEncoder;
use crate::models::Runtime;
use crate::plugins::{DatasetAdapter, PluginHost, PostProcessor, PromptTemplate};
use crate::sampler::Sampler;
use crate::train::resolve_audio;

use super::common::SamplingArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LongAudio {
    /// One caption per 30 s window, with its start time
    PerWindow,
    /// One caption from the concatenated windows' audio embeddings
    Concat,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Without --checkpoint the projector is freshly initialised and the \
captions are gibberish (a warning says so). One file: the caption on stdout. Several files, \
--split or --jsonl: one JSON object per line {id, audio, caption, references, tokens, seconds}. \
A file that fails gets an error line; the others are still captioned and the exit status is 1."
)]
pub struct CaptionArgs {
    /// Run config (models, plugins, projector settings)
    #[arg(long)]
    pub config: PathBuf,
    /// Trained projector (projector.safetensors from `earshot train`)
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
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
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Audio longer than 30 s
    #[arg(long, value_enum, default_value_t = LongAudio::PerWindow)]
    pub long_audio: LongAudio,
    /// Override a config value (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

struct Item {
    id: String,
    audio: PathBuf,
    segment: Segment,
    metadata: Vec<(String, String)>,
    references: Vec<String>,
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
    let mut projector = Projector::new(
        &cfg.projector,
        encoder.config.d_model,
        llm.model.config.hidden_size,
        cfg.train.seed,
        &rt.device,
    )?;
    match &args.checkpoint {
        Some(p) => projector.load_into(p).with_context(|| format!("loading the projector {}", p.display()))?,
        None => eprintln!("warning: no --checkpoint: the projector is freshly initialised (seed {}), so the captions are gibberish", cfg.train.seed),
    }
    let items: Vec<Item> = match &args.split {
        Some(split) => {
            let mut ds =
                DatasetAdapter::open(&host, &cfg.data.adapter, &cfg.data.root, &cfg.data.options)?;
            for w in &ds.dataset.warnings {
                eprintln!("warning: {w}");
            }
            if !ds.dataset.splits.contains(split) {
                bail!(
                    "{}: no split {split:?} (have: {})",
                    cfg.data.root.display(),
                    ds.dataset.splits.join(", ")
                );
            }
            let mut items = Vec::new();
            let mut pos = 0;
            loop {
                let b = ds.read(split, pos, 256)?;
                for ex in b.examples {
                    let audio = match &ex.audio {
                        crate::plugins::AudioSource::Path(rel) => {
                            resolve_audio(&cfg.data.root, rel)?
                        }
                        crate::plugins::AudioSource::Inline(_) => bail!(
                            "example {}: inline audio is not supported by caption yet",
                            ex.id
                        ),
                    };
                    let mut references = ex.references.clone();
                    if let Some(t) = &ex.target {
                        references.insert(0, t.clone());
                    }
                    items.push(Item {
                        id: ex.id,
                        audio,
                        segment: Segment {
                            start: ex.start_s,
                            end: ex.end_s,
                        },
                        metadata: ex.metadata,
                        references,
                    });
                }
                match b.next {
                    Some(n) => pos = n,
                    None => break,
                }
            }
            items
        }
        None => {
            if args.audio.is_empty() {
                bail!("give audio files to caption, or --split NAME");
            }
            args.audio
                .iter()
                .map(|p| Item {
                    id: p
                        .file_stem()
                        .unwrap_or_default()
                        .to_string_lossy()
                        .to_string(),
                    audio: p.clone(),
                    segment: Segment::whole(),
                    metadata: Vec::new(),
                    references: Vec::new(),
                })
                .collect()
        }
    };
    let jsonl = args.jsonl || args.split.is_some() || items.len() > 1;
    let settings = MelSettings {
        n_mels: encoder.config.num_mel_bins,
        padding: cfg.mel.padding,
        window_hop_s: 30.0,
    };
    let mut mel = LogMelExtractor::new(settings.n_mels)?;
    let mut failures = 0;
    let mut out = std::io::stdout().lock();
    let mut prefix: Option<PromptPrefix> = None;
    for item in &items {
        let started = Instant::now();
        let result = (|| -> Result<Vec<(f64, String, usize)>> {
            let samples = audio::load_16k_mono(&item.audio, item.segment)?;
            let (n, data) = mel.windows(&samples, &settings)?;
            let per = settings.n_mels * N_FRAMES;
            let mut projected = Vec::with_capacity(n);
            for w in 0..n {
                let x = Tensor::from_slice(
                    &data[w * per..(w + 1) * per],
                    (1, settings.n_mels, N_FRAMES),
                    &rt.device,
                )?;
                projected.push(encoder.forward(&x, NonFiniteTrace::default())?);
            }
            let prompt = template.render(&item.metadata, &cfg.plugins.prompt_options)?;
            let before = llm.tokenizer.encode(&prompt.before_audio)?;
            // The text before the audio is usually the same for every clip: its keys and
            // values are computed once and reused.
            if prefix.as_ref().is_none_or(|p| p.ids != before) {
                prefix = Some(PromptPrefix::new(&llm.model, &before)?);
            }
            let prefix = prefix.as_ref().expect("just set");
            let after = llm.tokenizer.encode_piece(&prompt.after_audio)?;
            let groups: Vec<(f64, Vec<Tensor>)> = match args.long_audio {
                LongAudio::PerWindow => projected
                    .into_iter()
                    .enumerate()
                    .map(|(w, e)| (w as f64 * 30.0, vec![e]))
                    .collect(),
                LongAudio::Concat => vec![(0.0, projected)],
            };
            let mut captions = Vec::new();
            for (start, encs) in groups {
                let mut sampler = Sampler::new(params)?;
                let mut text = caption_clip(
                    &llm.model,
                    &llm.tokenizer,
                    &projector,
                    prefix,
                    &after,
                    &encs,
                    &prompt.stop_strings,
                    args.max_tokens,
                    &mut sampler,
                )?;
                let tokens = llm.tokenizer.encode_piece(&text)?.len();
                if let Some(p) = post.as_mut() {
                    text = p.process(&text, &prompt.stop_strings, &item.metadata)?;
                }
                captions.push((start, text, tokens));
            }
            Ok(captions)
        })();
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(captions) => {
                for (start, text, tokens) in captions {
                    if jsonl {
                        let mut v = serde_json::json!({
                            "id": item.id, "audio": item.audio.display().to_string(),
                            "caption": text, "tokens": tokens, "seconds": seconds,
                        });
                        if !item.references.is_empty() {
                            v["references"] = item.references.clone().into();
                        }
                        if args.long_audio == LongAudio::PerWindow {
                            v["start_s"] = start.into();
                        }
                        writeln!(out, "{v}")?;
                    } else {
                        writeln!(out, "{text}")?;
                    }
                }
                if !out.is_terminal() {
                    out.flush()?;
                }
            }
            Err(e) => {
                failures += 1;
                // Errors from decoding already name the file.
                let msg = format!("{e:#}");
                if msg.contains(&item.audio.display().to_string()) {
                    eprintln!("error: {msg}");
                } else {
                    eprintln!("error: {}: {msg}", item.audio.display());
                }
                if jsonl {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({"id": item.id, "audio": item.audio.display().to_string(), "error": format!("{e:#}")})
                    )?;
                }
            }
        }
    }
    if failures > 0 {
        bail!("{failures} of {} input(s) failed", items.len());
    }
    Ok(())
}
