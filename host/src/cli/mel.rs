use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::common::AudioArgs;
use crate::mel::N_FRAMES;

#[derive(Debug, Args)]
#[command(
    after_help = "Output: float32 .npy of shape (n_windows, n_mels, 3000). Audio longer \
than 30 s gives consecutive 30 s windows (see --window-hop); each window is normalised on its own, \
exactly as Whisper treats a single clip.\n\nExample:\n  earshot mel tests/fixtures/audio/speech.ogg --out mel.npy"
)]
pub struct MelArgs {
    /// Audio file (WAV, FLAC, MP3, OGG/Vorbis, AAC in MP4/M4A, ...); any rate, any channels
    pub input: PathBuf,
    /// Number of mel bins: 80 (Whisper up to large-v2) or 128 (large-v3)
    #[arg(long, default_value_t = 80, value_parser = parse_bins)]
    pub bins: usize,
    #[command(flatten)]
    pub audio: AudioArgs,
    /// Where to write the .npy
    #[arg(long, value_name = "OUT.npy")]
    pub out: PathBuf,
}

pub fn run(args: MelArgs) -> Result<()> {
    let (n_windows, data) = args.audio.mel(&args.input, args.bins)?;
    crate::npy::write_f32(&args.out, &[n_windows, args.bins, N_FRAMES], &data)?;
    tracing::info!(
        "{}: {} window(s) -> {}",
        args.input.display(),
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
