//! Arguments shared by several subcommands.

use std::path::Path;

use anyhow::{Context, Result};
use clap::Args;

use crate::audio::{self, Segment};
use crate::mel::{LogMelExtractor, MelSettings, Padding, N_FRAMES};

#[derive(Debug, Clone, Args)]
pub struct AudioArgs {
    /// Start of the segment to use, in seconds
    #[arg(long, value_name = "S")]
    pub start: Option<f64>,
    /// End of the segment to use, in seconds
    #[arg(long, value_name = "S")]
    pub end: Option<f64>,
    /// Padding convention for clips shorter than 30 s
    #[arg(long, value_enum, default_value_t = Padding::Whisper)]
    pub padding: Padding,
    /// Seconds between the starts of consecutive 30 s windows for long audio (1 <= hop <= 30)
    #[arg(long, value_name = "S", default_value_t = crate::mel::WINDOW_S)]
    pub window_hop: f64,
}

impl AudioArgs {
    pub fn settings(&self, n_mels: usize) -> MelSettings {
        MelSettings {
            n_mels,
            padding: self.padding,
            window_hop_s: self.window_hop,
            // `mel` and `encode` write (n, bins, 3000) arrays, comparable with Whisper's.
            window: crate::mel::EncoderWindow::Full,
        }
    }

    /// Decodes `input` and computes its log-mel windows: (n_windows, data).
    pub fn mel(&self, input: &Path, n_mels: usize) -> Result<(usize, Vec<f32>)> {
        let settings = self.settings(n_mels);
        settings.validate()?;
        let segment = Segment {
            start: self.start,
            end: self.end,
        };
        let samples = audio::load_16k_mono(input, segment)?;
        let mut extractor = LogMelExtractor::new(n_mels)?;
        let out = extractor
            .windows(&samples, &settings)
            .with_context(|| format!("{}: computing log-mel", input.display()))?;
        debug_assert_eq!(out.1.len(), out.0 * n_mels * N_FRAMES);
        Ok(out)
    }
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, Args)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens when sampling
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p when sampling
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Random seed for sampling
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> crate::sampler::SamplingParams {
        crate::sampler::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

#[derive(Debug, Clone, Copy, Args)]
pub struct TraceArgs {
    /// Check every layer's output for NaN/Inf and stop at the first layer that produces one,
    /// naming it (slow: a debugging aid)
    #[arg(long)]
    pub trace_nonfinite: bool,
}

impl TraceArgs {
    pub fn trace(&self) -> crate::models::nonfinite::NonFiniteTrace {
        crate::models::nonfinite::NonFiniteTrace {
            enabled: self.trace_nonfinite,
        }
    }
}

/// Runs a command's `body` on this process's rank of an MPI job (or alone, a world of one).
/// An error on one rank of several ends every rank (MPI_Abort), printed first with the rank:
/// the others would otherwise wait for it in their next collective forever. A partial
/// failure (some inputs failed) is not such an error: rank 0 says so after the last
/// collective, and the job ends with its status.
pub fn on_this_rank(body: impl FnOnce(&mut crate::dist::World) -> Result<()>) -> Result<()> {
    let mut world = crate::dist::World::from_environment()?;
    let result = body(&mut world);
    if let Err(err) = &result {
        let code = super::exit::code_of(err);
        if world.size() > 1 && code != super::exit::PARTIAL && code != super::exit::BROKEN_PIPE {
            let text = crate::text::display_text(&format!("{err:#}"), 64 * 1024);
            super::printer::error(&format!(
                "rank {} of {}: {text}; ending every rank",
                world.rank(),
                world.size()
            ));
            world.abort_others(code);
        }
    }
    result
}

/// The captioner of `caption`, `eval` and their like: the config's models with `checkpoint`,
/// a PEFT `adapter` folder put on the LLM in place of the config's LoRA, and with `merge`
/// the adapters folded into the LLM's weights (an error when there are none).
pub fn load_captioner(
    config: crate::config::RunConfig,
    checkpoint: Option<&Path>,
    allow_mismatch: bool,
    adapter: Option<&Path>,
    merge: bool,
) -> Result<crate::caption::Captioner> {
    let mut captioner = crate::caption::Captioner::load(config, checkpoint, allow_mismatch)?;
    if let Some(dir) = adapter {
        captioner.use_peft_adapter(dir)?;
    }
    if merge && captioner.merge_adapter()? == 0 {
        anyhow::bail!(
            "--merge: the LLM has no LoRA adapters (no [lora] in the config, no --adapter)"
        );
    }
    Ok(captioner)
}
