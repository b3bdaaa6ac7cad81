use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use clap::Args;

use super::common::{AudioArgs, TraceArgs};
use crate::mel::N_FRAMES;
use crate::models::whisper::WhisperEncoder;
use crate::models::Runtime;

#[derive(Debug, Args)]
#[command(
    after_help = "Output: float32 .npy of shape (n_windows, 1500, d_model): the frozen \
Whisper encoder's output (after its final layer norm) for each 30 s window.\n\nExample:\n  earshot encode tests/fixtures/audio/speech.mp3 \\\n    --whisper ~/.cache/earshot/models/whisper-tiny.en --out enc.npy"
)]
pub struct EncodeArgs {
    /// Audio file, or a log-mel .npy of shape (n_mels, 3000) or (n_windows, n_mels, 3000)
    pub input: PathBuf,
    /// Whisper model folder in Hugging Face layout (config.json + model.safetensors);
    /// `earshot import ct2` makes one from a faster-whisper model
    #[arg(long, value_name = "DIR")]
    pub whisper: PathBuf,
    #[command(flatten)]
    pub audio: AudioArgs,
    /// Where to write the .npy
    #[arg(long, value_name = "OUT.npy")]
    pub out: PathBuf,
    #[command(flatten)]
    pub trace: TraceArgs,
}

/// Windows encoded per forward pass (bounds memory for long audio).
const WINDOWS_PER_BATCH: usize = 4;

pub fn run(args: EncodeArgs) -> Result<()> {
    let rt = Runtime::best_available();
    let encoder = WhisperEncoder::load_dir(&args.whisper, &rt).with_context(|| {
        format!(
            "loading the Whisper encoder from {}",
            args.whisper.display()
        )
    })?;
    let n_mels = encoder.config.num_mel_bins;
    let is_npy = args
        .input
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    let (n_windows, mel) = if is_npy {
        let (shape, data) = crate::npy::read_f32(&args.input)?;
        let n = match shape[..] {
            [m, f] if m == n_mels && f == N_FRAMES => 1,
            [n, m, f] if m == n_mels && f == N_FRAMES => n,
            _ => bail!(
                "{}: mel shape {shape:?}, expected ({n_mels}, {N_FRAMES}) or (n, {n_mels}, {N_FRAMES}) for this encoder",
                args.input.display()
            ),
        };
        (n, data)
    } else {
        args.audio.mel(&args.input, n_mels)?
    };
    if mel.iter().any(|v| !v.is_finite()) {
        bail!(
            "{}: the mel features hold NaN/Inf values",
            args.input.display()
        );
    }
    let d = encoder.config.d_model;
    let mut out = Vec::with_capacity(n_windows * crate::models::whisper::ENCODER_FRAMES * d);
    let per_window = n_mels * N_FRAMES;
    for chunk in mel.chunks(WINDOWS_PER_BATCH * per_window) {
        let b = chunk.len() / per_window;
        let x = Tensor::from_slice(chunk, (b, n_mels, N_FRAMES), &rt.device)?;
        let y = encoder.forward(&x, args.trace.trace())?;
        let values = y
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if values.iter().any(|v| !v.is_finite()) {
            bail!(
                "the encoder output for {} holds NaN/Inf values; nothing was written \
                 (rerun with --trace-nonfinite to find the first layer that produces them)",
                args.input.display()
            );
        }
        out.extend(values);
    }
    let positions = out.len() / n_windows / d;
    crate::npy::write_f32(&args.out, &[n_windows, positions, d], &out)?;
    tracing::info!("{} window(s) encoded -> {}", n_windows, args.out.display());
    Ok(())
}
