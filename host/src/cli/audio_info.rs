use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::audio;

#[derive(Debug, Args)]
#[command(after_help = "Example:\n  earshot audio-info tests/fixtures/audio/speech.m4a")]
pub struct AudioInfoArgs {
    /// Audio file
    pub input: PathBuf,
    /// Print one JSON object instead of `key: value` lines
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct Report {
    #[serde(flatten)]
    header: audio::AudioInfo,
    samples_16k: usize,
    decoded_duration_s: f64,
}

pub fn run(args: AudioInfoArgs) -> Result<()> {
    let mut header = audio::probe(&args.input)?;
    // Decode fully: the header's count can be absent or wrong, the decoded count is the
    // truth. Frames are counted, not kept, so memory stays flat however long the file is.
    let (frames, channels) = audio::count_decoded_frames(&args.input)?;
    if header.channels == 0 {
        // Some containers (MP4) only reveal the channel layout once a packet is decoded.
        header.channels = channels;
    }
    // The resampler's output length (swr's: the ceiling of frames * 16000 / rate, or one
    // fewer where its mirrored tail ends early).
    let samples_16k = audio::resampled_len(frames, header.sample_rate, audio::SAMPLE_RATE)
        .map_err(|reason| anyhow::anyhow!("{}: {reason}", args.input.display()))?
        as usize;
    let report = Report {
        header,
        samples_16k,
        decoded_duration_s: samples_16k as f64 / audio::SAMPLE_RATE as f64,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let h = &report.header;
    println!("file: {}", args.input.display());
    println!("container: {}", h.container);
    println!("codec: {}", h.codec);
    println!("sample_rate: {}", h.sample_rate);
    println!("channels: {}", h.channels);
    match h.duration_s {
        Some(d) => println!("duration_s: {d:.6}"),
        None => println!("duration_s: unknown (header gives no length)"),
    }
    println!("decoded_duration_s: {:.6}", report.decoded_duration_s);
    println!("samples_16k: {}", report.samples_16k);
    Ok(())
}
