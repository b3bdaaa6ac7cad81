use std::path::PathBuf;

/// Everything that can go wrong turning a file into samples. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum AudioError {
    // `cause` rather than `source`: the message already includes it, and anyhow's `{:#}`
    // would print a `#[source]` a second time.
    #[error("{path}: cannot open: {cause}")]
    Open {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: is a directory, not an audio file")]
    IsDirectory { path: PathBuf },
    #[error("{path}: file is empty (0 bytes)")]
    EmptyFile { path: PathBuf },
    #[error("{path}: not a recognised audio file ({reason})")]
    UnrecognisedFormat { path: PathBuf, reason: String },
    #[error("{path}: contains no audio track")]
    NoAudioTrack { path: PathBuf },
    #[error("{path}: the decoder cannot read this variant of the {container} format ({reason})")]
    UnsupportedVariant {
        path: PathBuf,
        container: String,
        reason: String,
    },
    #[error("{path}: unsupported codec {codec}")]
    UnsupportedCodec { path: PathBuf, codec: String },
    #[error("{path}: {what} is unknown in the stream header")]
    MissingParameter { path: PathBuf, what: &'static str },
    #[error("{path}: corrupt or truncated audio: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: contains no audio samples")]
    NoSamples { path: PathBuf },
    #[error(
        "{path}: {count} non-finite sample(s) (NaN or Inf), first at sample {first_index}; \
         refusing to use them"
    )]
    NonFinite {
        path: PathBuf,
        count: usize,
        first_index: usize,
    },
    #[error("{path}: bad segment: {reason}")]
    BadSegment { path: PathBuf, reason: String },
    #[error(
        "{path}: longer than the limit of {limit_s} s of audio (data.max-audio-s); use a \
         segment of it or raise the limit"
    )]
    TooLong { path: PathBuf, limit_s: f64 },
    #[error("{path}: the decoder crashed on this file ({reason}); it is corrupt or hostile")]
    DecoderPanic { path: PathBuf, reason: String },
    #[error("{path}: resampling failed: {reason}")]
    Resample { path: PathBuf, reason: String },
}
