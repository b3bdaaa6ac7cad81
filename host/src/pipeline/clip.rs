//! Audio into frozen-encoder outputs, one (1, frames, layers * d_enc) tensor per window (1500 frames
//! for a 30 s window, fewer for a clip-length one: `[mel] window = "clip"`), through
//! the on-disk encoder cache. The cache is looked up first: a window found there costs no
//! log-mel and no encoder forward (an epoch served from the cache computes neither; the
//! counters below let a test check it).

use candle_core::Tensor;

use super::encoder_cache::{encoder_identity, EncoderCache};
use super::error::Result;
use crate::config::RunConfig;
use crate::mel::{LogMelExtractor, MelSettings, N_FRAMES, N_SAMPLES, WINDOW_S};
use crate::models::nonfinite::NonFiniteTrace;
use crate::models::whisper::WhisperEncoder;
use crate::models::Runtime;
use crate::plugins::Example;

use super::examples::{example_segment, first_window_segment, load_example_audio};
use super::manifest::EncoderIdentity;

/// The log-mel settings a run feeds its encoder: the encoder's bins, the config's padding
/// and window length, consecutive 30 s windows.
pub fn mel_settings(config: &RunConfig, encoder: &WhisperEncoder) -> MelSettings {
    MelSettings {
        n_mels: encoder.config.num_mel_bins,
        padding: config.mel.padding,
        window_hop_s: WINDOW_S,
        window: config.mel.window,
    }
}

/// Work done by a [`ClipEncoder`], for logs and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeCounts {
    /// Windows whose log-mel was computed.
    pub mel_windows: usize,
    /// Windows that went through the encoder (not found in the cache).
    pub encoder_runs: usize,
    /// Windows read from the cache.
    pub cache_hits: usize,
}

/// The frozen encoder with its mel front-end and cache.
pub struct ClipEncoder {
    pub encoder: WhisperEncoder,
    pub rt: Runtime,
    pub settings: MelSettings,
    mel: LogMelExtractor,
    cache: Option<EncoderCache>,
    /// The hidden states kept per window (ascending; `[encoder_layers]` = the output alone).
    layers: Vec<usize>,
    pub counts: EncodeCounts,
}

impl ClipEncoder {
    /// With the on-disk cache under `$EARSHOT_HOME/cache/encoder`, keyed by the encoder
    /// checksum, mel settings and encoder layers of `manifest` (a run's manifest's
    /// [`super::manifest::Manifest::encoder_identity`]); keeps its layers.
    pub fn with_default_cache(
        encoder: WhisperEncoder,
        rt: Runtime,
        settings: MelSettings,
        manifest: &EncoderIdentity,
    ) -> Result<Self> {
        let mut identity = encoder_identity(&manifest.encoder, &rt);
        // The encoder's output alone keeps the key it always had.
        if let Some(layers) = &manifest.encoder_layers {
            identity.push_str(&format!("|hidden states {layers:?}"));
        }
        let cache = EncoderCache::new(EncoderCache::default_dir(), &identity, &manifest.mel);
        let mut clips = Self::new(encoder, rt, settings, Some(cache))?;
        if let Some(layers) = &manifest.encoder_layers {
            clips.layers = layers.clone();
        }
        Ok(clips)
    }

    /// `cache: None` computes every window; the encoder's output alone.
    pub fn new(
        encoder: WhisperEncoder,
        rt: Runtime,
        settings: MelSettings,
        cache: Option<EncoderCache>,
    ) -> Result<Self> {
        Ok(Self {
            mel: LogMelExtractor::new(settings.n_mels)?,
            layers: vec![encoder.config.encoder_layers],
            encoder,
            rt,
            settings,
            cache,
            counts: EncodeCounts::default(),
        })
    }

    /// The width of one encoder hidden state.
    /// Whether encoder outputs go through the on-disk cache.
    pub fn has_cache(&self) -> bool {
        self.cache.is_some()
    }

    pub fn d_model(&self) -> usize {
        self.encoder.config.d_model
    }

    /// Decodes and encodes the first window of an example's audio: (1, frames, d_enc), what
    /// training uses. Clips longer than 30 s are cut (with a warning).
    pub fn encode_example_first_window(
        &mut self,
        ex: &Example,
        root: &std::path::Path,
        max_audio_s: f64,
    ) -> Result<Tensor> {
        let samples = load_example_audio(ex, root, first_window_segment(ex), max_audio_s)?;
        let mut windows = self.encode_samples(&samples, (ex.start_s, ex.end_s), Some(1))?;
        if samples.len() > N_SAMPLES {
            tracing::warn!(
                "example {}: longer than 30 s of audio; training uses the first 30 s",
                ex.id
            );
        }
        Ok(windows.remove(0))
    }

    /// Puts into the cache what training and captioning read of an example: its first
    /// window as training decodes it and, for a clip that goes on past one window, every
    /// window of the whole clip as captioning and evaluation decode it (those keys differ:
    /// the samples differ). Entries already there are left as they are.
    pub fn fill_cache_for_example(
        &mut self,
        ex: &Example,
        root: &std::path::Path,
        max_audio_s: f64,
    ) -> Result<()> {
        let span = (ex.start_s, ex.end_s);
        let first = load_example_audio(ex, root, first_window_segment(ex), max_audio_s)?;
        self.encode_samples(&first, span, Some(1))?;
        if first.len() > N_SAMPLES {
            let whole = load_example_audio(ex, root, example_segment(ex), max_audio_s)?;
            self.encode_samples(&whole, span, None)?;
        }
        Ok(())
    }

    /// Encoder outputs (1, frames, d_enc) of the windows of 16 kHz mono `samples` (at
    /// most `max_windows`), each read from the cache or computed and stored there.
    /// `segment` is the part of the file the samples came from (part of the cache key).
    pub fn encode_samples(
        &mut self,
        samples: &[f32],
        segment: (Option<f64>, Option<f64>),
        max_windows: Option<usize>,
    ) -> Result<Vec<Tensor>> {
        let _span = tracing::debug_span!("encode", samples = samples.len()).entered();
        let spans = self.mel.window_spans(samples.len(), &self.settings)?;
        let n = max_windows.map_or(spans.len(), |m| spans.len().min(m));
        let clip_key = self.cache.as_ref().map(|c| c.key(samples, segment));
        let mut features = Vec::with_capacity(self.settings.n_mels * N_FRAMES);
        let mut out = Vec::with_capacity(n);
        for (w, span) in spans.into_iter().take(n).enumerate() {
            let frames = self.settings.window_frames(span.len());
            let kept = self.settings.kept_encoder_frames(span.len());
            let dims = [1, kept, self.encoder.config.d_model * self.layers.len()];
            let key = clip_key.as_ref().map(|k| EncoderCache::window_key(k, w));
            if let (Some(c), Some(k)) = (&self.cache, &key) {
                if let Some(t) = c.get(k, &dims, &self.rt.device) {
                    self.counts.cache_hits += 1;
                    out.push(t);
                    continue;
                }
            }
            {
                let _mel = tracing::debug_span!("mel", window = w).entered();
                features.resize(self.settings.n_mels * frames, 0.0);
                self.mel.features_into(
                    &samples[span],
                    self.settings.padding,
                    frames,
                    &mut features,
                );
                self.counts.mel_windows += 1;
            }
            let x = Tensor::from_slice(
                &features,
                (1, self.settings.n_mels, frames),
                &self.rt.device,
            )?;
            let encoded = {
                let _enc = tracing::debug_span!("encoder forward", window = w).entered();
                let all =
                    self.encoder
                        .forward_layers(&x, &self.layers, NonFiniteTrace::default())?;
                if all.dim(1)? > kept {
                    // `full-trimmed`: the frames covering the clip (contiguous for the
                    // cache and the projector).
                    all.narrow(1, 0, kept)?.contiguous()?
                } else {
                    all
                }
            };
            self.counts.encoder_runs += 1;
            if let (Some(c), Some(k)) = (&self.cache, &key) {
                if let Err(e) = c.put(k, &encoded) {
                    tracing::warn!("cannot write the encoder cache: {e:#}");
                }
            }
            out.push(encoded);
        }
        Ok(out)
    }
}
