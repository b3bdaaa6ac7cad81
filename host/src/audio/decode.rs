//! Container/codec decoding with symphonia, to mono f32 at the file's own sample rate.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use symphonia::core::audio::{AudioBufferRef, SampleBuffer};
use symphonia::core::codecs::{self, CodecType, DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::{FormatOptions, FormatReader, Packet, SeekMode, SeekTo};
use symphonia::core::io::{MediaSource, MediaSourceStream, ReadBytes};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;
use symphonia::core::units::{Time, TimeBase};

use super::{AudioError, Segment};

/// What `earshot audio-info` reports, read from the headers (no decoding).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AudioInfo {
    pub container: String,
    pub codec: String,
    pub sample_rate: u32,
    pub channels: usize,
    /// Frames (samples per channel) promised by the header, when it says.
    pub frames: Option<u64>,
    pub duration_s: Option<f64>,
}

/// Mono samples at `sample_rate`.
#[derive(Debug, Clone)]
pub struct DecodedAudio {
    pub samples: Vec<f32>,
    pub sample_rate: u32,
    /// Channels in the source (averaged into `samples`).
    pub channels: usize,
}

struct Opened {
    format: Box<dyn FormatReader>,
    track_id: u32,
    info: AudioInfo,
    params: codecs::CodecParameters,
}

/// Reads the headers of `path`.
pub fn probe(path: &Path) -> Result<AudioInfo, AudioError> {
    let file = open_path(path)?;
    contain_panics(path, || open(file.into(), path).map(|o| o.info))
}

/// Opens `path` for decoding, refusing folders, FIFOs and devices (a FIFO would wait for a
/// writer, a device never ends).
pub fn open_path(path: &Path) -> Result<File, AudioError> {
    crate::files::open(path).map_err(|cause| {
        if cause.kind() == std::io::ErrorKind::IsADirectory {
            AudioError::IsDirectory {
                path: path.to_path_buf(),
            }
        } else {
            AudioError::Open {
                path: path.to_path_buf(),
                cause,
            }
        }
    })
}

thread_local! {
    /// Set while this thread runs symphonia under `contain_panics`.
    static IN_DECODER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Keeps the default panic hook quiet for panics inside the decoder: they are reported as
/// the file's error, and a "thread panicked" message with a backtrace on stderr would say
/// the process crashed when it did not. Every other panic is printed as before.
fn quiet_decoder_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_DECODER.with(|d| d.get()) {
                default(info);
            }
        }));
    });
}

/// Runs `f` (symphonia's probing and decoding) turning a panic inside the decoder into an
/// error naming the file: no input file may take the process down.
fn contain_panics<T>(
    path: &Path,
    f: impl FnOnce() -> Result<T, AudioError>,
) -> Result<T, AudioError> {
    quiet_decoder_panics();
    let outer = IN_DECODER.with(|d| d.replace(true));
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    IN_DECODER.with(|d| d.set(outer));
    run.unwrap_or_else(|panic| {
        let reason = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        Err(AudioError::DecoderPanic {
            path: path.to_path_buf(),
            reason,
        })
    })
}

/// What a WAV header (the file's first bytes, `head`) claims that symphonia would trust
/// blindly (a 0 Hz rate panics in it).
fn check_wav_header(head: &[u8], path: &Path) -> Result<(), AudioError> {
    let n = head.len();
    if n < 12 || &head[..4] != b"RIFF" || &head[8..12] != b"WAVE" {
        return Ok(());
    }
    let mut at = 12;
    while at + 8 <= head.len() {
        let id = &head[at..at + 4];
        let size = u32::from_le_bytes(head[at + 4..at + 8].try_into().unwrap()) as usize;
        if id == b"fmt " {
            if let Some(fmt) = head.get(at + 8..at + 16) {
                let channels = u16::from_le_bytes([fmt[2], fmt[3]]);
                let rate = u32::from_le_bytes(fmt[4..8].try_into().unwrap());
                let bad = |reason: String| AudioError::Corrupt {
                    path: path.to_path_buf(),
                    reason,
                };
                if rate == 0 {
                    return Err(bad("the WAV header gives a sample rate of 0 Hz".into()));
                }
                if channels == 0 {
                    return Err(bad("the WAV header gives 0 channels".into()));
                }
            }
            return Ok(());
        }
        at = at.saturating_add(8).saturating_add(size + (size & 1));
    }
    Ok(())
}

/// What an AIFF/AIFC COMM chunk (within `head`) claims that symphonia would trust blindly: a
/// sample rate that rounds to 0 Hz, or is infinite or not a number, panics in it.
fn check_aiff_header(head: &[u8], path: &Path) -> Result<(), AudioError> {
    if head.len() < 12 || &head[..4] != b"FORM" || !matches!(&head[8..12], b"AIFF" | b"AIFC") {
        return Ok(());
    }
    let bad = |reason: String| AudioError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let mut at = 12usize;
    while at + 8 <= head.len() {
        let size = u32::from_be_bytes(head[at + 4..at + 8].try_into().unwrap()) as usize;
        if &head[at..at + 4] == b"COMM" {
            let Some(comm) = head.get(at + 8..at + 26) else {
                return Ok(());
            };
            if comm[..2] == [0, 0] {
                return Err(bad("the AIFF header gives 0 channels".into()));
            }
            // The rate is an 80-bit extended float: sign, 15-bit exponent, 64-bit mantissa.
            let e = &comm[8..18];
            let exponent = i32::from(u16::from_be_bytes([e[0] & 0x7f, e[1]]));
            let mantissa = u64::from_be_bytes(e[2..10].try_into().unwrap());
            let magnitude = mantissa as f64 * 2f64.powi(exponent - 16383 - 63);
            let rate = if e[0] & 0x80 != 0 {
                -magnitude
            } else {
                magnitude
            };
            if exponent == 0x7fff {
                return Err(bad(
                    "the AIFF header's sample rate is not a finite number".into()
                ));
            }
            if rate < 1.0 {
                return Err(bad(format!(
                    "the AIFF header gives a sample rate of {rate} Hz"
                )));
            }
            return Ok(());
        }
        at = at.saturating_add(8).saturating_add(size + (size & 1));
    }
    Ok(())
}

fn open(source: Encoded, path: &Path) -> Result<Opened, AudioError> {
    let p = || path.to_path_buf();
    let mut source: Box<dyn MediaSource> = match source {
        Encoded::File(file) => {
            let meta = file
                .metadata()
                .map_err(|cause| AudioError::Open { path: p(), cause })?;
            if meta.is_dir() {
                return Err(AudioError::IsDirectory { path: p() });
            }
            if meta.len() == 0 {
                return Err(AudioError::EmptyFile { path: p() });
            }
            Box::new(file)
        }
        Encoded::Bytes(bytes) if bytes.is_empty() => {
            return Err(AudioError::EmptyFile { path: p() })
        }
        Encoded::Bytes(bytes) => Box::new(std::io::Cursor::new(bytes)),
    };
    // One read of the head serves the container sniff and the WAV header check.
    let mut head = [0u8; 512];
    let n = read_up_to(&mut source, &mut head)
        .map_err(|cause| AudioError::Open { path: p(), cause })?;
    let container = sniff_container(&head[..n.min(12)]);
    check_wav_header(&head[..n], path)?;
    check_aiff_header(&head[..n], path)?;
    source
        .seek(SeekFrom::Start(0))
        .map_err(|cause| AudioError::Open { path: p(), cause })?;
    // Headers symphonia misreads (a WAV written to a pipe, AIFF's sound chunk, ...: see
    // fixups.rs): read with their fields corrected; a WAV's fact frame count kept.
    let mut fact_frames = None;
    if let Some(len) = source.byte_len() {
        let header = super::fixups::inspect(&mut source, &head[..n], len)
            .map_err(|cause| AudioError::Open { path: p(), cause })?;
        fact_frames = header.fact_frames;
        if let Some(fix) = header.fix {
            tracing::debug!("{}: {}", path.display(), fix.what);
            source = Box::new(super::fixups::PatchedSource::new(source, fix));
        }
    }

    let mss = MediaSourceStream::new(source, Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    // Gapless: MP3 (LAME/Xing) and AAC encoder delay and padding are trimmed so the sample
    // count matches the source that was encoded.
    let format_opts = FormatOptions {
        enable_gapless: true,
        ..Default::default()
    };
    let probed = symphonia::default::get_probe()
        .format(&hint, mss, &format_opts, &MetadataOptions::default())
        .map_err(|e| match e {
            // symphonia says "unsupported" both when no reader knows the signature and when
            // the reader that does know it meets a variant it cannot read (a WAV sub-format,
            // an AIFC compression): only the first is "not audio".
            SymError::Unsupported(what) if what.starts_with("core (probe)") => {
                AudioError::UnrecognisedFormat {
                    path: p(),
                    reason: "no known container signature".into(),
                }
            }
            SymError::Unsupported(what) => AudioError::UnsupportedVariant {
                path: p(),
                container: container.to_string(),
                reason: what.to_string(),
            },
            SymError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                AudioError::UnrecognisedFormat {
                    path: p(),
                    reason:
                        "the file ends before a complete container header (not audio, or truncated)"
                            .into(),
                }
            }
            other => AudioError::Corrupt {
                path: p(),
                reason: format!("cannot read the container header: {other}"),
            },
        })?;
    let format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| AudioError::NoAudioTrack { path: p() })?;
    let params = track.codec_params.clone();
    let sample_rate = params.sample_rate.ok_or(AudioError::MissingParameter {
        path: p(),
        what: "sample rate",
    })?;
    if sample_rate == 0 {
        return Err(AudioError::Corrupt {
            path: p(),
            reason: "header gives a sample rate of 0".into(),
        });
    }
    let channels = params.channels.map(|c| c.count()).unwrap_or(0);
    let frames =
        real_frames(params.n_frames, fact_frames, params.frames_per_block).filter(|&n| n > 0);
    let info = AudioInfo {
        container: container.to_string(),
        codec: codec_name(params.codec),
        sample_rate,
        channels,
        frames,
        duration_s: frames.map(|n| n as f64 / sample_rate as f64),
    };
    Ok(Opened {
        track_id: track.id,
        format,
        info,
        params,
    })
}

/// The frames a stream holds: the container's count (for block-coded WAV, whole blocks), less
/// the last block's padding where the WAV `fact` chunk says how much of it is real. A `fact`
/// count that would cut a whole block or more (a wrong chunk), or add frames, is not used:
/// the padding is all it may remove.
fn real_frames(
    container: Option<u64>,
    fact: Option<u64>,
    frames_per_block: Option<u64>,
) -> Option<u64> {
    match (container, fact, frames_per_block) {
        (Some(whole), Some(fact), Some(block))
            if block > 1 && fact < whole && whole - fact < block =>
        {
            Some(fact)
        }
        _ => container,
    }
}

/// Decodes `path` (or `segment` of it) to mono float32 at the file's sample rate.
pub fn decode_mono(path: &Path, segment: Segment) -> Result<DecodedAudio, AudioError> {
    decode_file_mono(open_path(path)?, path, segment, None)
}

/// Encoded audio to decode: an opened file, or bytes in memory (an upload, a dataset's
/// inline audio), read in place rather than staged in a temporary file.
pub enum Encoded {
    File(File),
    Bytes(Vec<u8>),
}

impl From<File> for Encoded {
    fn from(file: File) -> Self {
        Self::File(file)
    }
}

impl From<Vec<u8>> for Encoded {
    fn from(bytes: Vec<u8>) -> Self {
        Self::Bytes(bytes)
    }
}

/// Decodes an opened `file` or bytes (named `path` in errors), or `segment` of it, to mono
/// float32 at its sample rate. With `max_s`, audio longer than that many seconds (after the
/// segment) is an error, found without decoding more than the limit.
pub fn decode_file_mono(
    file: impl Into<Encoded>,
    path: &Path,
    segment: Segment,
    max_s: Option<f64>,
) -> Result<DecodedAudio, AudioError> {
    segment.validate(path)?;
    contain_panics(path, || {
        let mut sink = Collect { out: Vec::new() };
        let (info, channels) = decode_into(file.into(), path, segment, max_s, &mut sink)?;
        Ok(DecodedAudio {
            samples: sink.out,
            sample_rate: info.sample_rate,
            channels,
        })
    })
}

/// What `audio-info` reports of a full decode: the frames it yields and the channels,
/// counted without keeping the samples (memory stays flat whatever the file's length).
pub fn count_decoded_frames(path: &Path) -> Result<(u64, usize), AudioError> {
    let file = open_path(path)?;
    contain_panics(path, || {
        let mut sink = Count {
            frames: 0,
            bad: 0,
            first_bad: 0,
        };
        let (_, channels) = decode_into(file.into(), path, Segment::whole(), None, &mut sink)?;
        Ok((sink.frames, channels))
    })
}

/// Where decoded mono frames go.
trait FrameSink {
    /// Appends interleaved frames (averaging channels).
    fn push(&mut self, interleaved: &[f32], channels: usize);
    fn frames(&self) -> u64;
    fn truncate(&mut self, frames: u64);
    /// Non-finite samples: (how many, index of the first).
    fn non_finite(&self) -> Option<(usize, usize)>;
}

struct Collect {
    out: Vec<f32>,
}

impl FrameSink for Collect {
    fn push(&mut self, interleaved: &[f32], channels: usize) {
        append_mono(&mut self.out, interleaved, channels);
    }
    fn frames(&self) -> u64 {
        self.out.len() as u64
    }
    fn truncate(&mut self, frames: u64) {
        self.out.truncate(frames as usize);
    }
    fn non_finite(&self) -> Option<(usize, usize)> {
        let first = self.out.iter().position(|x| !x.is_finite())?;
        Some((self.out.iter().filter(|x| !x.is_finite()).count(), first))
    }
}

struct Count {
    frames: u64,
    bad: usize,
    first_bad: usize,
}

impl FrameSink for Count {
    fn push(&mut self, interleaved: &[f32], channels: usize) {
        let channels = channels.max(1);
        for (i, frame) in interleaved.chunks_exact(channels).enumerate() {
            let mono: f32 = frame.iter().sum();
            if !mono.is_finite() {
                if self.bad == 0 {
                    self.first_bad = self.frames as usize + i;
                }
                self.bad += 1;
            }
        }
        self.frames += (interleaved.len() / channels) as u64;
    }
    fn frames(&self) -> u64 {
        self.frames
    }
    fn truncate(&mut self, frames: u64) {
        self.frames = self.frames.min(frames);
    }
    fn non_finite(&self) -> Option<(usize, usize)> {
        (self.bad > 0).then_some((self.bad, self.first_bad))
    }
}

/// Frames of `segment` and the most frames a decode may yield, at the stream's rate.
#[derive(Debug, Clone, Copy)]
struct FrameRange {
    start: u64,
    end: Option<u64>,
    /// Past it the audio is refused (`max_s`).
    max: Option<u64>,
}

/// The codec's decoder, or an error naming the codec. With `verify`, a decoder whose stream
/// carries a checksum of the decoded audio (FLAC's MD5) computes it as it decodes.
fn make_decoder(
    params: &codecs::CodecParameters,
    info: &AudioInfo,
    path: &Path,
    verify: bool,
) -> Result<Box<dyn codecs::Decoder>, AudioError> {
    // Asked only where the stream has a checksum: symphonia warns when it is asked without one.
    let verify = verify && params.verification_check.is_some();
    symphonia::default::get_codecs()
        .make(params, &DecoderOptions { verify })
        .map_err(|e| match e {
            SymError::Unsupported(_) => AudioError::UnsupportedCodec {
                path: path.to_path_buf(),
                codec: info.codec.clone(),
            },
            other => AudioError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("cannot initialise the {} decoder: {other}", info.codec),
            },
        })
}

fn too_long(path: &Path, max_s: Option<f64>) -> AudioError {
    AudioError::TooLong {
        path: path.to_path_buf(),
        limit_s: max_s.unwrap_or_default(),
    }
}

/// What the header alone refuses before anything is decoded: more frames than `max_s`
/// allows, or a segment starting at or past the end.
fn check_against_header(
    range: FrameRange,
    segment: Segment,
    max_s: Option<f64>,
    info: &AudioInfo,
    path: &Path,
) -> Result<(), AudioError> {
    if let Some(max) = range.max {
        let wanted = match (range.end, info.frames) {
            (Some(end), _) => Some(end.saturating_sub(range.start)),
            (None, Some(total)) => Some(total.saturating_sub(range.start)),
            (None, None) => None,
        };
        if wanted.is_some_and(|w| w > max) {
            return Err(too_long(path, max_s));
        }
    }
    if let (Some(total), true) = (info.frames, range.start > 0) {
        if range.start >= total {
            return Err(AudioError::BadSegment {
                path: path.to_path_buf(),
                reason: format!(
                    "start {} s is at or past the end of the audio ({:.3} s)",
                    segment.start.unwrap_or(0.0),
                    total as f64 / info.sample_rate as f64
                ),
            });
        }
    }
    Ok(())
}

/// Seeks close to `start_frame` so long files are not decoded from the beginning; false for
/// containers that cannot seek (they are decoded from the start and the head discarded).
fn seek_near(
    format: &mut dyn FormatReader,
    decoder: &mut dyn codecs::Decoder,
    track_id: u32,
    start_frame: u64,
    sr: u32,
) -> bool {
    if start_frame == 0 {
        return false;
    }
    let secs = start_frame as f64 / sr as f64;
    let time = Time::new(secs.trunc() as u64, secs.fract());
    let seek = SeekTo::Time {
        time,
        track_id: Some(track_id),
    };
    if format.seek(SeekMode::Accurate, seek).is_err() {
        return false;
    }
    decoder.reset();
    true
}

/// The next packet of the stream; None at its end.
fn next_packet(format: &mut dyn FormatReader, path: &Path) -> Result<Option<Packet>, AudioError> {
    let corrupt = |reason: String| AudioError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    match format.next_packet() {
        Ok(packet) => Ok(Some(packet)),
        Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(SymError::ResetRequired) => Err(corrupt(
            "the stream changes its parameters mid-file (chained streams are not supported)".into(),
        )),
        Err(e) => Err(corrupt(format!("cannot read the next packet: {e}"))),
    }
}

/// One packet decoded; the sample rate may not change.
fn decode_packet<'d>(
    decoder: &'d mut dyn codecs::Decoder,
    packet: &Packet,
    time_base: TimeBase,
    sr: u32,
    path: &Path,
) -> Result<AudioBufferRef<'d>, AudioError> {
    let corrupt = |reason: String| AudioError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    let decoded = decoder.decode(packet).map_err(|e| {
        let at = time_base.calc_time(packet.ts());
        let at_s = at.seconds as f64 + at.frac;
        corrupt(format!("decoding failed at {at_s:.3} s: {e}"))
    })?;
    let rate = decoded.spec().rate;
    if rate != sr {
        return Err(corrupt(format!(
            "sample rate changes mid-stream ({sr} Hz -> {rate} Hz)"
        )));
    }
    Ok(decoded)
}

/// What decoding found once the packets are read: a truncated stream (a header promising
/// more frames than decoded), no frames at all, non-finite samples.
fn check_decoded(
    sink: &mut dyn FrameSink,
    info: &AudioInfo,
    segment: Segment,
    start_frame: u64,
    read_to_the_end: bool,
    decoded_total: u64,
    path: &Path,
) -> Result<(), AudioError> {
    let p = || path.to_path_buf();
    if read_to_the_end {
        if let Some(promised) = info.frames {
            // Never return more than the container's declared duration: MP4 reports the
            // duration without the AAC encoder's end padding, which the decoder still emits.
            sink.truncate(promised.saturating_sub(start_frame));
            if decoded_total < promised {
                return Err(AudioError::Corrupt {
                    path: p(),
                    reason: format!(
                        "truncated: the header promises {promised} frames but only {decoded_total} could be decoded"
                    ),
                });
            }
        }
    }
    if sink.frames() == 0 {
        if start_frame > 0 {
            return Err(AudioError::BadSegment {
                path: p(),
                reason: format!(
                    "no audio between {} s and the requested end",
                    segment.start.unwrap_or(0.0)
                ),
            });
        }
        return Err(AudioError::NoSamples { path: p() });
    }
    if let Some((count, first_index)) = sink.non_finite() {
        return Err(AudioError::NonFinite {
            path: p(),
            count,
            first_index,
        });
    }
    Ok(())
}

/// The decode loop: frames of `segment` of `file` into `sink`; returns the header and the
/// channel count seen.
fn decode_into(
    file: Encoded,
    path: &Path,
    segment: Segment,
    max_s: Option<f64>,
    sink: &mut dyn FrameSink,
) -> Result<(AudioInfo, usize), AudioError> {
    let Opened {
        mut format,
        track_id,
        info,
        params,
    } = open(file, path)?;
    let sr = info.sample_rate;
    let to_frame = |secs: f64| (secs * sr as f64).round() as u64;
    let range = FrameRange {
        start: segment.start.map(to_frame).unwrap_or(0),
        // Never past the stream's real end (a WAV block's padding, AAC's end padding).
        end: segment
            .end
            .map(to_frame)
            .map(|end| info.frames.map_or(end, |frames| end.min(frames))),
        max: max_s.map(|m| (m * sr as f64).floor() as u64),
    };
    // A checksum of the whole stream can only be checked by a decode of the whole stream.
    let whole = range.start == 0 && range.end.is_none();
    let mut decoder = make_decoder(&params, &info, path, whole)?;
    check_against_header(range, segment, max_s, &info, path)?;
    let time_base = params.time_base.unwrap_or_else(|| TimeBase::new(1, sr));
    // Timestamps -> frame index at `sr`.
    let ts_to_frame = |ts: u64| -> u64 {
        let t = time_base.calc_time(ts);
        ((t.seconds as f64 + t.frac) * sr as f64).round() as u64
    };
    // symphonia 0.5's RIFF readers seek to frame x block bytes, right only when a block is
    // one frame: in block-coded WAV (ADPCM, 505 frames a block at 8-16 kHz) every seek lands
    // past the data and a segment came back empty. Those streams are decoded from the start
    // and the head discarded.
    let block_coded = params.frames_per_block.is_some_and(|frames| frames > 1);
    let seeked =
        !block_coded && seek_near(format.as_mut(), decoder.as_mut(), track_id, range.start, sr);

    let mut sample_buf: Option<SampleBuffer<f32>> = None;
    // Frame index of the next decoded frame; only meaningful for segment decoding, where it is
    // re-synchronised from packet timestamps.
    let mut position: u64 = 0;
    let mut decoded_total: u64 = 0;
    let mut hit_end = false;
    let mut channels_seen = info.channels;
    while let Some(packet) = next_packet(format.as_mut(), path)? {
        if packet.track_id() != track_id {
            continue;
        }
        if seeked || range.start > 0 || range.end.is_some() {
            position = ts_to_frame(packet.ts());
        }
        let decoded = decode_packet(decoder.as_mut(), &packet, time_base, sr, path)?;
        let spec = *decoded.spec();
        let n_frames = decoded.frames();
        if n_frames == 0 {
            continue;
        }
        let buf = match &mut sample_buf {
            Some(b) if b.capacity() >= decoded.capacity() * spec.channels.count() => b,
            slot => slot.insert(SampleBuffer::<f32>::new(decoded.capacity() as u64, spec)),
        };
        buf.copy_interleaved_ref(decoded);
        let channels = spec.channels.count().max(1);
        channels_seen = channels;
        let interleaved = &buf.samples()[..n_frames * channels];
        decoded_total += n_frames as u64;

        // Keep only frames in [range.start, range.end).
        let first = range.start.saturating_sub(position).min(n_frames as u64) as usize;
        let last = match range.end {
            Some(end) => end.saturating_sub(position).min(n_frames as u64) as usize,
            None => n_frames,
        };
        if first < last {
            sink.push(&interleaved[first * channels..last * channels], channels);
            if range.max.is_some_and(|m| sink.frames() > m) {
                return Err(too_long(path, max_s));
            }
        }
        position += n_frames as u64;
        if let Some(end) = range.end {
            if position >= end {
                hit_end = true;
                break;
            }
        }
    }

    if info.container == "ogg" {
        check_ogg_pages(format, hit_end, path)?;
    }
    // A header that promises more frames than the stream holds means a truncated file (not
    // judged after a seek or a segment's end: the stream was not read from start to end).
    check_decoded(
        sink,
        &info,
        segment,
        range.start,
        !seeked && !hit_end,
        decoded_total,
        path,
    )?;
    if whole && !seeked {
        check_checksum(decoder.as_mut(), &info, path)?;
    }
    Ok((info, channels_seen))
}

/// Ogg carries no length and symphonia passes over damaged pages: checks the pages the
/// decode read (all of them, and a clean end, when it read to the end).
fn check_ogg_pages(
    format: Box<dyn FormatReader>,
    hit_end: bool,
    path: &Path,
) -> Result<(), AudioError> {
    let mut source = format.into_inner();
    let upto = hit_end.then(|| source.pos());
    source
        .seek(SeekFrom::Start(0))
        .map_err(|cause| AudioError::Open {
            path: path.to_path_buf(),
            cause,
        })?;
    let warning =
        super::ogg::check_pages(&mut source, upto).map_err(|reason| AudioError::Corrupt {
            path: path.to_path_buf(),
            reason,
        })?;
    if let Some(warning) = warning {
        tracing::warn!("{}: {warning}", path.display());
    }
    Ok(())
}

/// After a decode of the whole stream: symphonia's FLAC reader passes over a frame whose CRC
/// fails (and a file cut at a frame boundary just ends), so where the header gives no length
/// only the MD5 of the decoded audio that STREAMINFO carries tells such a file from a whole
/// one. Streams without a checksum pass.
fn check_checksum(
    decoder: &mut dyn codecs::Decoder,
    info: &AudioInfo,
    path: &Path,
) -> Result<(), AudioError> {
    if decoder.finalize().verify_ok == Some(false) {
        return Err(AudioError::Corrupt {
            path: path.to_path_buf(),
            reason: format!(
                "the decoded audio does not match the MD5 checksum in the {} header \
                 (a damaged frame was passed over, the file is cut short, or its audio was \
                 altered)",
                info.codec
            ),
        });
    }
    Ok(())
}

/// Averages interleaved channels into `out`.
fn append_mono(out: &mut Vec<f32>, interleaved: &[f32], channels: usize) {
    if channels == 1 {
        out.extend_from_slice(interleaved);
        return;
    }
    let scale = 1.0 / channels as f32;
    out.extend(
        interleaved
            .chunks_exact(channels)
            .map(|frame| frame.iter().sum::<f32>() * scale),
    );
}

fn read_up_to(file: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Names the container from its signature bytes (symphonia does not expose which reader won).
fn sniff_container(magic: &[u8]) -> &'static str {
    let at = |off: usize, sig: &[u8]| {
        magic.len() >= off + sig.len() && &magic[off..off + sig.len()] == sig
    };
    if at(0, b"RIFF") && at(8, b"WAVE") || at(0, b"RF64") {
        "wav"
    } else if at(0, b"fLaC") {
        "flac"
    } else if at(0, b"OggS") {
        "ogg"
    } else if at(4, b"ftyp") {
        "mp4"
    } else if at(0, b"FORM") && (at(8, b"AIFF") || at(8, b"AIFC")) {
        "aiff"
    } else if at(0, b"caff") {
        "caf"
    } else if at(0, &[0x1A, 0x45, 0xDF, 0xA3]) {
        "matroska"
    } else if at(0, b"ID3") {
        "mp3"
    } else if magic.len() >= 2 && magic[0] == 0xFF && magic[1] & 0xF6 == 0xF0 {
        "adts"
    } else if magic.len() >= 2 && magic[0] == 0xFF && magic[1] & 0xE0 == 0xE0 {
        "mp3"
    } else {
        "unknown"
    }
}

/// A readable name for a codec, including ones symphonia recognises but cannot decode.
fn codec_name(codec: CodecType) -> String {
    if let Some(d) = symphonia::default::get_codecs().get_codec(codec) {
        return d.short_name.to_string();
    }
    let name = match codec {
        codecs::CODEC_TYPE_OPUS => "opus",
        codecs::CODEC_TYPE_SPEEX => "speex",
        codecs::CODEC_TYPE_WMA => "wma",
        codecs::CODEC_TYPE_EAC3 => "eac3",
        codecs::CODEC_TYPE_AC4 => "ac4",
        codecs::CODEC_TYPE_DCA => "dts",
        codecs::CODEC_TYPE_WAVPACK => "wavpack",
        codecs::CODEC_TYPE_MONKEYS_AUDIO => "monkeys-audio",
        codecs::CODEC_TYPE_TTA => "tta",
        codecs::CODEC_TYPE_MUSEPACK => "musepack",
        codecs::CODEC_TYPE_MP1 => "mp1",
        codecs::CODEC_TYPE_MP2 => "mp2",
        codecs::CODEC_TYPE_ADPCM_G722 => "adpcm-g722",
        codecs::CODEC_TYPE_ADPCM_G726 | codecs::CODEC_TYPE_ADPCM_G726LE => "adpcm-g726",
        _ => return format!("codec id {codec}"),
    };
    name.to_string()
}
