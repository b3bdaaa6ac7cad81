use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::audio::{self, Segment};
use crate::mel::{LogMelExtractor, MelSettings, Padding, N_FRAMES};

#[derive(Debug, Args)]
#[command(
    after_help = "Output: float32 .npy of shape (n_windows, n_mels, 3000). Audio longer \
than 30 s gives consecutive 30 s windows (see --window-hop); each window is normalised on its own, \
exactly as Whisper treats a single clip."
)]
pub struct MelArgs {
    /// Audio file (WAV, FLAC, MP3, OGG/Vorbis, AAC in MP4/M4A, ...); any rate, any channels
    pub input: PathBuf,
    /// Number of mel bins: 80 (Whisper up to large-v2) or 128 (large-v3)
    #[arg(long, default_value_t = 80, value_parser = parse_bins)]
    pub bins: usize,
    /// Padding convention for clips shorter than 30 s
    #[arg(long, value_enum, default_value_t = Padding::Whisper)]
    pub padding: Padding,
    /// Start of the segment to use, in seconds
    #[arg(long, value_name = "S")]
    pub start: Option<f64>,
    /// End of the segment to use, in seconds
    #[arg(long, value_name = "S")]
    pub end: Option<f64>,
    /// Seconds between the starts of consecutive 30 s windows for long audio (0 < hop <= 30)
    #[arg(long, value_name = "S", default_value_t = 30.0)]
    pub window_hop: f64,
    /// Where to write the .npy
    #[arg(long, value_name = "OUT.npy")]
    pub out: PathBuf,
}

pub fn run(args: MelArgs) -> Result<()> {
    let settings = MelSettings {
        n_mels: args.bins,
        padding: args.padding,
        window_hop_s: args.window_hop,
    };
    settings.validate()?;
    let segment = Segment {
        start: args.start,
        end: args.end,
    };
    let samples = audio::load_16k_mono(&args.input, segment)?;
    let mut extractor = LogMelExtractor::new(settings.n_mels)?;
    let (n_windows, data) = extractor
        .windows(&samples, &settings)
        .with_context(|| format!("{}: computing log-mel", args.input.display()))?;
    crate::npy::write_f32(&args.out, &[n_windows, settings.n_mels, N_FRAMES], &data)?;
    tracing::info!(
        "{}: {} samples at 16 kHz -> {} window(s) -> {}",
        args.input.display(),
        samples.len(),
        n_windows,
        args.out.display()
    );
    Ok(())
}

fn parse_bins(s: &str) -> Result<usize, String> {
    match s {
        "80" => Ok(80),
        "128" => Ok(128),
        _ => Err(format!("{s} is not a Whisper mel size: use 80 or 128")),
    }
}
