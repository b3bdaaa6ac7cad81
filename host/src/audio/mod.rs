//! Audio input: decode any supported container/codec (symphonia), downmix to mono and
//! resample to Whisper's 16 kHz with libswresample's filter and clip to the 16-bit range, as
//! Whisper's own loaders do. Everything downstream sees `Vec<f32>` at 16 kHz.

mod decode;
mod error;
mod fixups;
mod ogg;
mod resample;

pub use decode::{
    count_decoded_frames, decode_file_mono, decode_mono, probe, AudioInfo, DecodedAudio, Encoded,
};
pub use error::AudioError;
pub use resample::{resample_mono, resampled_len, MAX_INPUT_RATE};

use std::path::Path;

/// The only sample rate the rest of the pipeline accepts.
pub const SAMPLE_RATE: u32 = 16_000;

/// A time range inside a file, in seconds. `None` means "from the start" / "to the end".
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Segment {
    pub start: Option<f64>,
    pub end: Option<f64>,
}

impl Segment {
    pub fn whole() -> Self {
        Self::default()
    }

    /// Checks the range itself (not against a file's duration).
    pub fn validate(&self, path: &Path) -> Result<(), AudioError> {
        let bad = |reason: String| AudioError::BadSegment {
            path: path.to_path_buf(),
            reason,
        };
        for (name, v) in [("start", self.start), ("end", self.end)] {
            if let Some(v) = v {
                if !v.is_finite() || v < 0.0 {
                    return Err(bad(format!("{name} = {v} must be a finite number >= 0")));
                }
            }
        }
        if let (Some(s), Some(e)) = (self.start, self.end) {
            if e <= s {
                return Err(bad(format!("end ({e} s) must be after start ({s} s)")));
            }
        }
        Ok(())
    }
}

/// Decodes `path` (optionally a segment of it) to mono float32 at 16 kHz.
///
/// Channels are averaged; non-finite samples are rejected with an error (never silently
/// zeroed: a NaN in the input would poison every feature downstream).
pub fn load_16k_mono(path: &Path, segment: Segment) -> Result<Vec<f32>, AudioError> {
    to_16k(path, decode_mono(path, segment)?)
}

/// [`load_16k_mono`], refusing audio longer than `max_s` seconds (found without decoding
/// more than that).
pub fn load_16k_mono_within(
    path: &Path,
    segment: Segment,
    max_s: f64,
) -> Result<Vec<f32>, AudioError> {
    let file = decode::open_path(path)?;
    to_16k(path, decode_file_mono(file, path, segment, Some(max_s))?)
}

/// Resamples already decoded audio to 16 kHz (no-op when it already is), then clips it to
/// the 16-bit range as Whisper's own loaders do.
///
/// faster-whisper (PyAV) and openai-whisper (ffmpeg) both ask for signed 16-bit output, so a
/// float recording with peaks past full scale (common in Vorbis, MP3 and AAC, and in the
/// overshoot of a resampling filter) reaches the model clipped to [-1, 32767/32768]; the
/// features Whisper was trained on are those of the clipped signal.
pub fn to_16k(path: &Path, decoded: DecodedAudio) -> Result<Vec<f32>, AudioError> {
    let mut samples = if decoded.sample_rate == SAMPLE_RATE {
        decoded.samples
    } else {
        resample_mono(&decoded.samples, decoded.sample_rate, SAMPLE_RATE).map_err(|reason| {
            AudioError::Resample {
                path: path.to_path_buf(),
                reason,
            }
        })?
    };
    clip_to_s16_range(&mut samples);
    Ok(samples)
}

/// The largest sample a signed 16-bit output holds, as a fraction of full scale.
pub const S16_MAX: f32 = 32767.0 / 32768.0;

/// Clips samples to what a signed 16-bit conversion keeps: [-1, 32767/32768].
pub fn clip_to_s16_range(samples: &mut [f32]) {
    for s in samples {
        *s = s.clamp(-1.0, S16_MAX);
    }
}
