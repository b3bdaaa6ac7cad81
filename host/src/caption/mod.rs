//! Captioning as a library call: [`Captioner`] is built from a run config (and a trained
//! projector), takes [`CaptionItem`]s (files, samples, dataset examples) and returns one
//! result per item, reporting progress per caption as [`CaptionEvent`]s. The CLI, evaluation
//! and any future server all caption through it.
//!
//! Per item: audio -> encoder windows (through the encoder cache) -> projector -> the prompt
//! laid out around it ([`crate::pipeline::layout`]); items that share the text before the
//! audio are decoded together, after that text's keys and values computed once
//! ([`PrefixCache`]), by the one decode loop ([`decode_batch`]); each caption then goes
//! through the post-processor plugin.

pub mod continuous;
pub mod items;

use crate::models::weights::ModelError;
use crate::pipeline::PipelineError;
use crate::plugins::PluginError;
use crate::sampler::SamplingError;
use crate::train::TrainError;

/// Why captioning could not run, or why one item failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptionError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Audio(#[from] crate::audio::AudioError),
    /// The checkpoint could not be used.
    #[error(transparent)]
    Checkpoint(#[from] TrainError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// The dataset adapter returned this example over a per-example bound.
    #[error("{0}")]
    BadExample(crate::plugins::BadExample),
    #[error("{item}: longer than data.max-audio-s = {max_s} s")]
    TooLong { item: String, max_s: f64 },
    #[error(
        "{positions} prompt positions ({windows} windows of audio) plus --max-tokens \
         {max_tokens} exceed the LLM's context of {context}; use --long-audio per-window or \
         fewer tokens"
    )]
    BeyondContext {
        positions: usize,
        windows: usize,
        max_tokens: usize,
        context: usize,
    },
    /// The decode batch it was in failed (every item in it fails).
    #[error("decoding failed: {0}")]
    Decode(String),
    /// The post-processor failed on its caption.
    #[error("{0}")]
    PostProcess(String),
    /// Gathering the ranks' results of a sharded run failed.
    #[error(transparent)]
    Ranks(#[from] crate::dist::DistError),
    /// A rank's results could not be read back on rank 0.
    #[error("a rank's results of a sharded run: {0}")]
    Share(String),
}

impl From<candle_core::Error> for CaptionError {
    fn from(e: candle_core::Error) -> Self {
        CaptionError::Model(e.into())
    }
}

pub type Result<T, E = CaptionError> = std::result::Result<T, E>;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::Tensor;

pub use continuous::{CaptionFeed, ItemOutcome};
pub use items::{AudioInput, CaptionItem, ItemSource};

use crate::audio;
use crate::config::RunConfig;
use crate::mel::WINDOW_S;
use crate::models::llm::{
    decode_batch, DecodeOptions, DecodeRequest, Decoded, Finish, GgufBlocks, LoadedLlm, PrefixCache,
};
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::projector::Projector;
use crate::models::trainable::Trainable;
use crate::pipeline::clip::EncodeCounts;
use crate::pipeline::{
    attach_lora, build_manifest, example_segment, load_example_audio, load_models, mel_settings,
    open_dataset, project_windows, prompt, sequence_embeddings, ClipEncoder, Manifest,
};
use crate::plugins::{DatasetAdapter, PluginHost, PostProcessor, PromptTemplate};
use crate::sampler::{Sampler, SamplingParams};

/// What to do with audio longer than one 30 s window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongAudio {
    /// One caption per 30 s window, with its start and end time
    PerWindow,
    /// One caption from the concatenated windows' audio embeddings
    Concat,
}

/// How to caption.
#[derive(Debug, Clone, Copy)]
pub struct CaptionSettings {
    pub max_tokens: usize,
    /// Captions decoded together (clips that finish early drop out).
    pub batch_size: usize,
    pub sampling: SamplingParams,
    pub long_audio: LongAudio,
}

impl Default for CaptionSettings {
    fn default() -> Self {
        Self {
            max_tokens: 60,
            batch_size: 8,
            sampling: SamplingParams::default(),
            long_audio: LongAudio::PerWindow,
        }
    }
}

/// A window's start and end in seconds.
pub type Span = (f64, f64);

/// One finished caption: of a whole item, or of one window of it (per-window long audio).
#[derive(Debug, Clone)]
pub struct WindowCaption {
    /// The window's span (per-window long audio only).
    pub span: Option<Span>,
    /// After the post-processor.
    pub text: String,
    /// As decoded (cut at a stop string), before the post-processor.
    pub raw: String,
    pub tokens: usize,
    /// Positions the LLM read before generating: the prompt's tokens and the audio's.
    pub prompt_positions: usize,
    pub finish: Finish,
    /// Decoding and encoding the item plus decoding this caption.
    pub seconds: f64,
}

/// An item's captions (one per window with per-window long audio), or why it failed.
pub type ItemResult = std::result::Result<Vec<WindowCaption>, String>;

/// Progress of a [`Captioner::caption`] call, in the order it happens.
pub enum CaptionEvent<'a> {
    /// A caption of `item` starts decoding; `windows` captions are made for that item.
    Started {
        item: usize,
        span: Option<Span>,
        windows: usize,
    },
    /// The raw text of a caption of `item` so far (only when decoding one at a time).
    Partial { item: usize, text: &'a str },
    /// A caption of `item` is finished (post-processed) or failed.
    Finished {
        item: usize,
        result: &'a std::result::Result<WindowCaption, String>,
    },
}

/// The part of a source file some samples came from (start, end in seconds; none: whole).
pub type SourceSpan = (Option<f64>, Option<f64>);

/// How captions are decoded: how many together, whether each one's growing text is
/// reported, and which items are no longer wanted (asked by item before each step).
#[derive(Clone, Copy)]
struct Plan<'a> {
    per_batch: usize,
    partials: bool,
    cancelled: Option<&'a dyn Fn(usize) -> bool>,
}

/// One caption to make: a clip, or one window of it.
struct Job {
    item: usize,
    span: Option<Span>,
    prefix: Vec<u32>,
    rest: Tensor,
    stop_strings: Vec<String>,
    /// Positions before the first generated token (prompt and audio).
    positions: usize,
    /// Time spent decoding and encoding the item.
    prepare_s: f64,
}

/// Models, plugins and a trained projector, ready to caption.
pub struct Captioner {
    pub config: RunConfig,
    pub llm: LoadedLlm,
    pub clips: ClipEncoder,
    pub projector: Projector,
    pub manifest: Manifest,
    host: PluginHost,
    template: PromptTemplate,
    post: Option<PostProcessor>,
    prefixes: PrefixCache,
}

impl Captioner {
    /// Loads the config's models and plugins, and the projector that `checkpoint` names (see
    /// [`crate::train::checkpoint::resolve`]; its manifest must match unless
    /// `allow_mismatch`). Without a checkpoint the projector is freshly initialised (a
    /// warning says the captions will be gibberish).
    pub fn load(
        config: RunConfig,
        checkpoint: Option<&Path>,
        allow_mismatch: bool,
    ) -> Result<Self> {
        let (rt, encoder, mut llm) = load_models(&config, GgufBlocks::Keep)?;
        attach_lora(&config, &mut llm, &rt.device)?;
        let host = PluginHost::new(config.plugins.sandbox, PluginHost::default_cache_dir());
        let template = PromptTemplate::load(&host, &config.plugins.prompt_template)?;
        let post = match &config.plugins.post_processor {
            Some(p) => Some(PostProcessor::load(&host, p)?),
            None => None,
        };
        let settings = mel_settings(&config, &encoder);
        let manifest = build_manifest(&config, &settings)?;
        let mut trained = Trainable {
            projector: Projector::new_mixed(
                &config.projector,
                manifest.encoder_layer_count(),
                encoder.config.d_model,
                llm.model.config.hidden_size,
                config.train.seed,
                &rt.device,
            )?,
            lora: llm.model.adapter().cloned(),
        };
        match checkpoint {
            Some(p) => {
                crate::train::checkpoint::load_trained(
                    p,
                    &mut trained,
                    &manifest,
                    "caption",
                    allow_mismatch,
                )?;
            }
            None => tracing::warn!(
                "no checkpoint: the projector is freshly initialised (seed {}), so the captions are gibberish",
                config.train.seed
            ),
        }
        let projector = trained.projector;
        let clips =
            ClipEncoder::with_default_cache(encoder, rt, settings, &manifest.encoder_identity())?;
        Ok(Self {
            config,
            llm,
            clips,
            projector,
            manifest,
            host,
            template,
            post,
            prefixes: PrefixCache::default(),
        })
    }

    /// Puts the LoRA adapter of a PEFT folder (`adapter_config.json` +
    /// `adapter_model.safetensors`, from Python's `peft` or a run's `adapter/`) on the LLM,
    /// in place of any adapters the config and checkpoint gave it.
    pub fn use_peft_adapter(&mut self, dir: &Path) -> Result<()> {
        let device = crate::models::llm::LanguageModel::device(&self.llm.model).clone();
        let peft = crate::models::lora::read_peft(dir, &device)?;
        let shape = self.llm.model.config.decoder_shape();
        let adapter = crate::models::lora::LoraAdapter::new(&peft.config, &shape, 0, &device)?;
        adapter.load_peft(&peft.tensors, &peft.weights)?;
        tracing::info!(
            "LoRA adapter from {}: rank {}, alpha {}, {} tensor(s)",
            dir.display(),
            peft.config.rank,
            peft.config.alpha,
            peft.tensors.len()
        );
        self.llm
            .model
            .set_adapter(Some(std::sync::Arc::new(adapter)));
        Ok(())
    }

    /// Folds the LLM's LoRA adapters into its weights (`--merge`); the number of projections
    /// changed (0 without adapters).
    pub fn merge_adapter(&mut self) -> Result<usize> {
        let changed = self.llm.model.merge_adapter()?;
        tracing::info!("LoRA adapters merged into {changed} projection(s) of the LLM");
        Ok(changed)
    }

    /// The config's dataset, with `split` checked to exist.
    pub fn open_dataset(&self, split: &str) -> Result<DatasetAdapter> {
        Ok(open_dataset(&self.host, &self.config, &[split])?)
    }

    /// Work done by the encoder so far (windows from the cache, mel and encoder runs).
    pub fn encode_counts(&self) -> EncodeCounts {
        self.clips.counts
    }

    /// Captions `items`: one result per item, in order. Items that share the text before the
    /// audio are decoded `batch_size` at a time; one item's failure (bad audio, a prompt too
    /// long for the context, a failing plugin) fails that item only. `one_at_a_time` decodes
    /// each caption alone and reports its text as it grows ([`CaptionEvent::Partial`]).
    pub fn caption(
        &mut self,
        items: &[CaptionItem],
        settings: &CaptionSettings,
        one_at_a_time: bool,
        on_event: &mut dyn FnMut(CaptionEvent),
    ) -> Result<Vec<ItemResult>> {
        let per_batch = if one_at_a_time {
            1
        } else {
            settings.batch_size.max(1)
        };
        let plan = Plan {
            per_batch,
            partials: one_at_a_time,
            cancelled: None,
        };
        self.caption_in_batches(items, settings, plan, on_event)
    }

    /// [`Captioner::caption`] decoding `settings.batch_size` captions together and still
    /// reporting each one's text as it grows ([`CaptionEvent::Partial`], by item): a server
    /// streams several answers from one decode loop.
    /// `cancelled(item)` is asked before each decoding step: true ends that item's caption
    /// there (finish [`Finish::Cancelled`]) while the rest of its batch goes on.
    pub fn caption_streaming_batched(
        &mut self,
        items: &[CaptionItem],
        settings: &CaptionSettings,
        cancelled: &dyn Fn(usize) -> bool,
        on_event: &mut dyn FnMut(CaptionEvent),
    ) -> Result<Vec<ItemResult>> {
        let plan = Plan {
            per_batch: settings.batch_size.max(1),
            partials: true,
            cancelled: Some(cancelled),
        };
        self.caption_in_batches(items, settings, plan, on_event)
    }

    fn caption_in_batches(
        &mut self,
        items: &[CaptionItem],
        settings: &CaptionSettings,
        plan: Plan,
        on_event: &mut dyn FnMut(CaptionEvent),
    ) -> Result<Vec<ItemResult>> {
        Sampler::new(settings.sampling)?;
        let mut jobs = Vec::new();
        let mut failed: HashMap<usize, String> = HashMap::new();
        for (k, item) in items.iter().enumerate() {
            match self.prepare(k, item, settings) {
                Ok(j) => jobs.extend(j),
                Err(e) => {
                    failed.insert(k, format!("{e:#}"));
                }
            }
        }
        let results = self.decode_jobs(items, &jobs, settings, plan, on_event)?;
        let mut per_item: Vec<ItemResult> = (0..items.len()).map(|_| Ok(Vec::new())).collect();
        for (job, result) in jobs.iter().zip(results) {
            match (&mut per_item[job.item], result) {
                (Ok(done), Ok(c)) => done.push(c),
                (slot @ Ok(_), Err(e)) => *slot = Err(e),
                (Err(_), _) => {}
            }
        }
        for (k, e) in failed {
            per_item[k] = Err(e);
        }
        Ok(per_item)
    }

    /// The 16 kHz mono samples of an item (refused past `data.max-audio-s`) and the segment
    /// of the source they came from (part of the encoder cache key).
    pub fn item_samples<'a>(&self, item: &'a CaptionItem) -> Result<(Cow<'a, [f32]>, SourceSpan)> {
        let max_s = self.config.data.max_audio_s;
        let root = &self.config.data.root;
        // Samples given in memory are used in place, not copied.
        Ok(match &item.input {
            AudioInput::File(p) => (
                audio::load_16k_mono_within(p, audio::Segment::whole(), max_s)?.into(),
                (None, None),
            ),
            AudioInput::Example(ex) => (
                load_example_audio(ex, root, example_segment(ex), max_s)?.into(),
                (ex.start_s, ex.end_s),
            ),
            AudioInput::Decoded { samples, span } => (samples.as_slice().into(), *span),
            AudioInput::Rejected(bad) => return Err(CaptionError::BadExample(bad.clone())),
            AudioInput::Samples(s) => {
                if s.len() as f64 > max_s * audio::SAMPLE_RATE as f64 {
                    return Err(CaptionError::TooLong {
                        item: item.audio.clone(),
                        max_s,
                    });
                }
                (s.as_slice().into(), (None, None))
            }
        })
    }

    /// Decodes each item's audio from its file or example once, in place (as
    /// [`AudioInput::Decoded`]), so that what follows reads the samples without decoding
    /// again. An item whose audio fails is left as it is: captioning reports its error.
    pub fn decode_in_place(&self, items: &mut [CaptionItem]) {
        for item in items {
            if !matches!(item.input, AudioInput::File(_) | AudioInput::Example(_)) {
                continue;
            }
            let decoded = self
                .item_samples(item)
                .map(|(samples, span)| (samples.into_owned(), span));
            if let Ok((samples, span)) = decoded {
                item.input = AudioInput::Decoded { samples, span };
            }
        }
    }

    /// The prompt template rendered for `metadata` and tokenized, with `target` formatted
    /// after it when given (as training lays it out).
    pub fn render_prompt(
        &mut self,
        metadata: &[(String, String)],
        target: Option<&str>,
    ) -> Result<prompt::Prompt> {
        Ok(prompt::render(
            &mut self.template,
            &self.llm.tokenizer,
            metadata,
            &self.config.plugins.prompt_options,
            target,
        )?)
    }

    /// The prompt-prefix cache (shared with a loss computed on the same models).
    pub fn prefixes(&self) -> &PrefixCache {
        &self.prefixes
    }

    /// Decodes, encodes and lays out one item: one job per caption it needs.
    fn prepare(
        &mut self,
        k: usize,
        item: &CaptionItem,
        settings: &CaptionSettings,
    ) -> Result<Vec<Job>> {
        let started = Instant::now();
        let (samples, segment) = self.item_samples(item)?;
        let encoded = self.clips.encode_samples(&samples, segment, None)?;
        let prompt = prompt::render(
            &mut self.template,
            &self.llm.tokenizer,
            &item.metadata,
            &self.config.plugins.prompt_options,
            None,
        )?;
        let duration = samples.len() as f64 / audio::SAMPLE_RATE as f64;
        let groups: Vec<(Option<Span>, Vec<Tensor>)> = match settings.long_audio {
            LongAudio::PerWindow => encoded
                .into_iter()
                .enumerate()
                .map(|(w, e)| {
                    let start = w as f64 * WINDOW_S;
                    (Some((start, (start + WINDOW_S).min(duration))), vec![e])
                })
                .collect(),
            LongAudio::Concat => vec![(None, encoded)],
        };
        let prepare_s = started.elapsed().as_secs_f64();
        let before = &prompt.pieces.before;
        let context = self.llm.model.config.max_position_embeddings;
        groups
            .into_iter()
            .map(|(span, windows)| {
                let audio = project_windows(&self.projector, &windows)?;
                let rest =
                    sequence_embeddings(&self.llm.model, &[], &audio, &prompt.pieces.after, &[])?;
                // Checked here so one over-long clip fails alone, not its batch.
                let positions = before.len() + rest.dim(1)?;
                if positions + settings.max_tokens > context {
                    return Err(CaptionError::BeyondContext {
                        positions,
                        windows: windows.len(),
                        max_tokens: settings.max_tokens,
                        context,
                    });
                }
                Ok(Job {
                    item: k,
                    span,
                    prefix: before.clone(),
                    rest,
                    stop_strings: prompt.stop_strings.clone(),
                    positions,
                    prepare_s,
                })
            })
            .collect()
    }

    /// Decodes the jobs, those sharing the text before the audio together, `per_batch` at a
    /// time; each caption post-processed as soon as it is decoded.
    fn decode_jobs(
        &mut self,
        items: &[CaptionItem],
        jobs: &[Job],
        settings: &CaptionSettings,
        plan: Plan,
        on_event: &mut dyn FnMut(CaptionEvent),
    ) -> Result<Vec<std::result::Result<WindowCaption, String>>> {
        let Plan {
            per_batch,
            partials: stream,
            cancelled,
        } = plan;
        let mut results: Vec<Option<std::result::Result<WindowCaption, String>>> =
            (0..jobs.len()).map(|_| None).collect();
        let mut order: Vec<usize> = (0..jobs.len()).collect();
        order.sort_by(|&a, &b| jobs[a].prefix.cmp(&jobs[b].prefix).then(a.cmp(&b)));
        let windows_of = |item: usize| jobs.iter().filter(|j| j.item == item).count();
        for group in order.chunk_by(|&a, &b| jobs[a].prefix == jobs[b].prefix) {
            let prefix = self
                .prefixes
                .get_or_compute(&self.llm.model, &jobs[group[0]].prefix)?;
            for sub in group.chunks(per_batch) {
                for &j in sub {
                    on_event(CaptionEvent::Started {
                        item: jobs[j].item,
                        span: jobs[j].span,
                        windows: windows_of(jobs[j].item),
                    });
                }
                let mut requests = sub
                    .iter()
                    .map(|&j| {
                        Ok(DecodeRequest {
                            rest: jobs[j].rest.clone(),
                            sampler: Sampler::new(settings.sampling)?,
                            max_tokens: settings.max_tokens,
                            stop_strings: jobs[j].stop_strings.clone(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                // Requests are numbered within this sub-batch; the caller asks by item.
                let by_item = |r: usize| cancelled.is_some_and(|c| c(jobs[sub[r]].item));
                let options = DecodeOptions {
                    tokenizer: Some(&self.llm.tokenizer),
                    eos: self.llm.tokenizer.special.eos,
                    trace: NonFiniteTrace::default(),
                    cancelled: Some(&by_item),
                };
                let decoded = decode_batch(
                    &self.llm.model,
                    &prefix,
                    &mut requests,
                    &options,
                    |r, text| {
                        if stream {
                            on_event(CaptionEvent::Partial {
                                item: jobs[sub[r]].item,
                                text,
                            });
                        }
                    },
                );
                for (r, &j) in sub.iter().enumerate() {
                    let result = match &decoded {
                        Ok(d) => self.finish(&jobs[j], &items[jobs[j].item], d[r].clone()),
                        Err(e) => Err(format!("{e:#}")),
                    };
                    on_event(CaptionEvent::Finished {
                        item: jobs[j].item,
                        result: &result,
                    });
                    results[j] = Some(result);
                }
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every job decoded"))
            .collect())
    }

    /// The post-processor applied to a decoded caption.
    fn finish(
        &mut self,
        job: &Job,
        item: &CaptionItem,
        d: Decoded,
    ) -> std::result::Result<WindowCaption, String> {
        let _span = tracing::debug_span!("post-process").entered();
        let text = match self.post.as_mut() {
            Some(p) => p
                .process(&d.text, &job.stop_strings, &item.metadata)
                .map_err(|e| e.to_string())?,
            None => d.text.clone(),
        };
        Ok(WindowCaption {
            span: job.span,
            text,
            raw: d.text,
            tokens: d.ids.len(),
            prompt_positions: job.positions,
            finish: d.finish,
            seconds: job.prepare_s + d.done.as_secs_f64(),
        })
    }
}
