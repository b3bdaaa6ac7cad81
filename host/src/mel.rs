//! Whisper's log-mel front-end, numerically equal to OpenAI Whisper / faster-whisper.
//!
//! n_fft 400, hop 160, periodic Hann window, reflect-padded centred STFT, power spectrum,
//! Slaney mel filterbank (computed here, 80 or 128 bins), log10 with a 1e-10 floor, clamp to
//! (max - 8), then (x + 4) / 4. Each 30 s window is an independent clip: its own padding and
//! its own max, exactly `log_mel_spectrogram(pad_or_trim(window))`.

use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};
use serde::{Deserialize, Serialize};

/// The rate the front-end reads (the one definition is [`crate::audio::SAMPLE_RATE`]).
const SAMPLE_RATE: usize = crate::audio::SAMPLE_RATE as usize;
pub const N_FFT: usize = 400;
pub const HOP_LENGTH: usize = 160;
pub const N_FREQ: usize = N_FFT / 2 + 1;
/// Frames in one encoder window (30 s).
pub const N_FRAMES: usize = 3000;
/// Samples in one encoder window (30 s).
pub const N_SAMPLES: usize = N_FRAMES * HOP_LENGTH;
/// Seconds in one encoder window.
pub const WINDOW_S: f64 = N_SAMPLES as f64 / SAMPLE_RATE as f64;

/// Mel frames a clip-length window is rounded up to a multiple of: one second, so clips of
/// similar length share shapes and the encoder (stride 2) gets an even frame count.
pub const CLIP_ROUND_FRAMES: usize = 100;

/// How long each encoder window is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum EncoderWindow {
    /// Always 30 s (3000 mel frames, 1500 encoder frames): a short clip is padded, as Whisper
    /// was trained.
    #[default]
    Full,
    /// Only the frames covering the clip, rounded up to whole seconds (whisper.cpp's
    /// `audio_ctx`): a 1 s clip costs ~1/30 of a full window. Windows after the first of a
    /// long input are 30 s but the last, which covers what is left.
    Clip,
    /// The 30 s window, as Whisper was trained, with the encoder's output cut to the frames
    /// that cover the clip, rounded up to whole seconds as `clip` rounds them: the projector
    /// gets as many positions as with `clip` (not a short clip's few among 1500 padding
    /// frames), each computed with the context the encoder was trained on; the encoder costs
    /// what a full window costs (once per clip with the encoder cache).
    FullTrimmed,
}

/// Where the zeros go when a clip is shorter than 30 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Padding {
    /// Zero-pad the audio to 30 s before the STFT (OpenAI Whisper's `pad_or_trim`).
    #[default]
    Whisper,
    /// Features of the unpadded clip, then 0.0-padded in the log-mel domain (faster-whisper).
    Trailing,
}

/// Everything that determines the features; part of cache keys and checkpoint manifests.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MelSettings {
    /// 80 (Whisper up to large-v2) or 128 (large-v3).
    pub n_mels: usize,
    pub padding: Padding,
    /// Distance between the starts of consecutive 30 s windows for long audio, in seconds.
    pub window_hop_s: f64,
    /// Absent from manifests written before it existed: those used full windows.
    #[serde(default)]
    pub window: EncoderWindow,
}

impl Default for MelSettings {
    fn default() -> Self {
        Self {
            n_mels: 80,
            padding: Padding::Whisper,
            window_hop_s: WINDOW_S,
            window: EncoderWindow::Full,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MelError {
    #[error("unsupported number of mel bins {0}: Whisper uses 80 or 128")]
    BadBins(usize),
    #[error("window hop must be between {MIN_WINDOW_HOP_S} and 30 s, got {0}")]
    BadHop(f64),
    #[error(
        "{windows} windows of features would take {} MiB (more than {} MiB): use a segment \
         (--start/--end) or a longer window hop",
        .bytes >> 20,
        MAX_FEATURE_BYTES >> 20
    )]
    TooManyWindows { windows: usize, bytes: usize },
    #[error("no samples to compute features from")]
    Empty,
}

/// The shortest window hop: shorter ones multiply the windows (and their memory) for no use.
pub const MIN_WINDOW_HOP_S: f64 = 1.0;
/// The most memory the features of one input may take.
pub const MAX_FEATURE_BYTES: usize = 2 << 30;

impl MelSettings {
    pub fn validate(&self) -> Result<(), MelError> {
        if self.n_mels != 80 && self.n_mels != 128 {
            return Err(MelError::BadBins(self.n_mels));
        }
        if !(self.window_hop_s >= MIN_WINDOW_HOP_S && self.window_hop_s <= WINDOW_S) {
            return Err(MelError::BadHop(self.window_hop_s));
        }
        Ok(())
    }

    fn hop_samples(&self) -> usize {
        ((self.window_hop_s * SAMPLE_RATE as f64).round() as usize).max(1)
    }

    /// Mel frames of the window covering `samples` samples: 3000, or with clip-length
    /// windows the clip's frames rounded up to whole seconds.
    pub fn window_frames(&self, samples: usize) -> usize {
        match self.window {
            EncoderWindow::Full | EncoderWindow::FullTrimmed => N_FRAMES,
            EncoderWindow::Clip => clip_frames(samples),
        }
    }

    /// Encoder frames kept of that window (the encoder's stride-2 convolution halves the
    /// mel frames): all of them, or with `full-trimmed` those covering the clip.
    pub fn kept_encoder_frames(&self, samples: usize) -> usize {
        match self.window {
            EncoderWindow::Full | EncoderWindow::Clip => self.window_frames(samples) / 2,
            EncoderWindow::FullTrimmed => clip_frames(samples) / 2,
        }
    }
}

/// The mel frames covering `samples` samples, rounded up to whole seconds, at most a window.
fn clip_frames(samples: usize) -> usize {
    samples
        .div_ceil(HOP_LENGTH)
        .div_ceil(CLIP_ROUND_FRAMES)
        .max(1)
        .saturating_mul(CLIP_ROUND_FRAMES)
        .min(N_FRAMES)
}

// --- Slaney mel scale (librosa's `htk=False`), in f64 ---
const F_SP: f64 = 200.0 / 3.0;
const MIN_LOG_HZ: f64 = 1000.0;
const MIN_LOG_MEL: f64 = MIN_LOG_HZ / F_SP;

fn logstep() -> f64 {
    6.4f64.ln() / 27.0
}

fn hz_to_mel(hz: f64) -> f64 {
    if hz >= MIN_LOG_HZ {
        MIN_LOG_MEL + (hz / MIN_LOG_HZ).ln() / logstep()
    } else {
        hz / F_SP
    }
}

fn mel_to_hz(mel: f64) -> f64 {
    if mel >= MIN_LOG_MEL {
        MIN_LOG_HZ * (logstep() * (mel - MIN_LOG_MEL)).exp()
    } else {
        F_SP * mel
    }
}

/// The dense (n_mels, 201) Slaney-normalised filterbank for 16 kHz, n_fft 400, 0..8 kHz,
/// as `librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels)`.
pub fn mel_filterbank(n_mels: usize) -> Vec<f32> {
    let fft_freqs: Vec<f64> = (0..N_FREQ)
        .map(|k| k as f64 * SAMPLE_RATE as f64 / N_FFT as f64)
        .collect();
    let (mel_lo, mel_hi) = (hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE as f64 / 2.0));
    let mel_f: Vec<f64> = (0..n_mels + 2)
        .map(|i| mel_to_hz(mel_lo + (mel_hi - mel_lo) * i as f64 / (n_mels + 1) as f64))
        .collect();
    let mut weights = vec![0f32; n_mels * N_FREQ];
    for m in 0..n_mels {
        let (left, centre, right) = (mel_f[m], mel_f[m + 1], mel_f[m + 2]);
        let enorm = 2.0 / (right - left);
        for (k, &f) in fft_freqs.iter().enumerate() {
            let lower = (f - left) / (centre - left);
            let upper = (right - f) / (right - centre);
            let w = lower.min(upper).max(0.0);
            weights[m * N_FREQ + k] = (w * enorm) as f32;
        }
    }
    weights
}

/// One mel filter's non-zero span.
struct SparseFilter {
    first_bin: usize,
    weights: Vec<f32>,
}

/// Computes log-mel windows. Holds the FFT plan and scratch buffers; reuse one per thread.
pub struct LogMelExtractor {
    n_mels: usize,
    filters: Vec<SparseFilter>,
    window: [f32; N_FFT],
    fft: Arc<dyn RealToComplex<f32>>,
    frame: Vec<f32>,
    spectrum: Vec<Complex<f32>>,
    scratch: Vec<Complex<f32>>,
    power: [f32; N_FREQ],
    /// Reflect-padded signal, reused between calls (a fresh 1.9 MB buffer per window cost
    /// more in page faults than the FFTs).
    padded: Vec<f32>,
    /// Mel energies frame-major (frames, n_mels): contiguous writes during the STFT; one
    /// blocked transpose at the end gives Whisper's (n_mels, frames) layout.
    frame_major: Vec<f32>,
}

impl LogMelExtractor {
    pub fn new(n_mels: usize) -> Result<Self, MelError> {
        if n_mels != 80 && n_mels != 128 {
            return Err(MelError::BadBins(n_mels));
        }
        let dense = mel_filterbank(n_mels);
        let filters = dense
            .chunks_exact(N_FREQ)
            .map(|row| {
                let first = row.iter().position(|&w| w != 0.0).unwrap_or(0);
                let last = row.iter().rposition(|&w| w != 0.0).map_or(first, |l| l + 1);
                SparseFilter {
                    first_bin: first,
                    weights: row[first..last].to_vec(),
                }
            })
            .collect();
        // Periodic Hann (torch.hann_window(400), numpy's `hanning(401)[:-1]`).
        let mut window = [0f32; N_FFT];
        for (i, w) in window.iter_mut().enumerate() {
            *w = (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / N_FFT as f64).cos()) as f32;
        }
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT);
        let frame = fft.make_input_vec();
        let spectrum = fft.make_output_vec();
        let scratch = fft.make_scratch_vec();
        Ok(Self {
            n_mels,
            filters,
            window,
            fft,
            frame,
            spectrum,
            scratch,
            power: [0.0; N_FREQ],
            padded: Vec::with_capacity(N_SAMPLES + N_FFT + HOP_LENGTH),
            frame_major: vec![0.0; N_FRAMES * n_mels],
        })
    }

    pub fn n_mels(&self) -> usize {
        self.n_mels
    }

    /// Log-mel of consecutive windows of `samples` (16 kHz mono): returns
    /// (n_windows, data) with data laid out (n_windows, n_mels, 3000), C order.
    pub fn windows(
        &mut self,
        samples: &[f32],
        settings: &MelSettings,
    ) -> Result<(usize, Vec<f32>), MelError> {
        let spans = self.window_spans(samples.len(), settings)?;
        let size = self.n_mels * N_FRAMES;
        let mut out = vec![0f32; spans.len() * size];
        for (span, dst) in spans.iter().zip(out.chunks_exact_mut(size)) {
            self.window_features_into(&samples[span.clone()], settings.padding, dst);
        }
        Ok((spans.len(), out))
    }

    /// The sample ranges of the consecutive windows of a clip of `len` samples, without
    /// computing any features (a cache lookup needs only these). Refused, before anything is
    /// allocated, when the features of all windows would pass 2 GiB.
    pub fn window_spans(
        &self,
        len: usize,
        settings: &MelSettings,
    ) -> Result<Vec<std::ops::Range<usize>>, MelError> {
        settings.validate()?;
        if settings.n_mels != self.n_mels {
            return Err(MelError::BadBins(settings.n_mels));
        }
        if len == 0 {
            return Err(MelError::Empty);
        }
        let hop = settings.hop_samples();
        let windows = 1 + len.saturating_sub(N_SAMPLES).div_ceil(hop);
        let bytes = windows.saturating_mul(self.n_mels * N_FRAMES * std::mem::size_of::<f32>());
        if bytes > MAX_FEATURE_BYTES {
            return Err(MelError::TooManyWindows { windows, bytes });
        }
        Ok((0..windows)
            .map(|w| w * hop..(w * hop + N_SAMPLES).min(len))
            .collect())
    }

    /// Log-mel (n_mels, 3000) of one clip of at most 30 s.
    pub fn window_features(&mut self, clip: &[f32], padding: Padding) -> Vec<f32> {
        let mut mel = vec![0f32; self.n_mels * N_FRAMES];
        self.window_features_into(clip, padding, &mut mel);
        mel
    }

    /// As [`Self::window_features`], into `mel` (length n_mels * 3000, overwritten).
    pub fn window_features_into(&mut self, clip: &[f32], padding: Padding, mel: &mut [f32]) {
        self.features_into(clip, padding, N_FRAMES, mel);
    }

    /// Log-mel (n_mels, `frames`) of `clip` as if the window were `frames` long: the clip
    /// (at most that long) zero-padded to it. With `frames` = 3000 this is Whisper's window;
    /// fewer frames is a clip-length window ([`EncoderWindow::Clip`]). `mel` has length
    /// n_mels * frames and is overwritten.
    pub fn features_into(
        &mut self,
        clip: &[f32],
        padding: Padding,
        frames: usize,
        mel: &mut [f32],
    ) {
        assert!(frames <= N_FRAMES, "at most one 30 s window");
        assert_eq!(mel.len(), self.n_mels * frames, "output buffer size");
        let window_samples = frames * HOP_LENGTH;
        let clip = &clip[..clip.len().min(window_samples)];
        match padding {
            Padding::Whisper => {
                // STFT of the clip zero-padded to exactly the window: frames + 1 STFT
                // frames, the last dropped.
                reflect_pad_into(clip, window_samples, &mut self.padded);
                self.power_mel(frames);
                let used = &mut self.frame_major[..frames * self.n_mels];
                log_normalise(used);
                transpose_into(used, frames, self.n_mels, mel);
            }
            Padding::Trailing => {
                // faster-whisper: append one hop of zeros, STFT, drop the last frame.
                let len = clip.len() + HOP_LENGTH;
                let used_frames = (len / HOP_LENGTH).min(frames);
                reflect_pad_into(clip, len, &mut self.padded);
                self.power_mel(used_frames);
                let used = &mut self.frame_major[..used_frames * self.n_mels];
                log_normalise(used);
                self.frame_major[used_frames * self.n_mels..frames * self.n_mels].fill(0.0);
                transpose_into(
                    &self.frame_major[..frames * self.n_mels],
                    frames,
                    self.n_mels,
                    mel,
                );
            }
        }
    }

    /// Mel power of the first `frames` STFT frames of `self.padded`, into
    /// `self.frame_major` (frames, n_mels).
    fn power_mel(&mut self, frames: usize) {
        for t in 0..frames {
            let chunk = &self.padded[t * HOP_LENGTH..t * HOP_LENGTH + N_FFT];
            for ((dst, &x), &w) in self.frame.iter_mut().zip(chunk).zip(&self.window) {
                *dst = x * w;
            }
            self.fft
                .process_with_scratch(&mut self.frame, &mut self.spectrum, &mut self.scratch)
                .expect("buffer sizes come from the plan");
            for (p, c) in self.power.iter_mut().zip(&self.spectrum) {
                *p = c.re * c.re + c.im * c.im;
            }
            let row = &mut self.frame_major[t * self.n_mels..(t + 1) * self.n_mels];
            for (dst, filter) in row.iter_mut().zip(&self.filters) {
                let bins = &self.power[filter.first_bin..filter.first_bin + filter.weights.len()];
                *dst = bins.iter().zip(&filter.weights).map(|(p, w)| p * w).sum();
            }
        }
    }
}

/// `clip` zero-padded to `len` samples, then reflect-padded by n_fft/2 on both sides, as
/// `torch.stft(center=True, pad_mode="reflect")`; written into `out` (reused).
fn reflect_pad_into(clip: &[f32], len: usize, out: &mut Vec<f32>) {
    let pad = N_FFT / 2;
    let n = len as isize;
    let body = |i: usize| clip.get(i).copied().unwrap_or(0.0);
    let period = 2 * (n - 1);
    let reflect = |i: isize| -> usize {
        if period == 0 {
            return 0;
        }
        let j = i.rem_euclid(period);
        (if j >= n { period - j } else { j }) as usize
    };
    out.clear();
    out.extend((-(pad as isize)..0).map(|i| body(reflect(i))));
    out.extend_from_slice(&clip[..clip.len().min(len)]);
    out.resize(pad + len, 0.0);
    out.extend((n..n + pad as isize).map(|i| body(reflect(i))));
}

/// In place: log10 with 1e-10 floor, clamp to max - 8, then (x + 4) / 4.
fn log_normalise(mel: &mut [f32]) {
    let max = mel.iter().copied().fold(0f32, f32::max);
    // log10(max(v, 1e-10)) clamped at log10(max) - 8 equals log10(max(v, floor)).
    let floor = (max.max(1e-10) * 1e-8).max(1e-10);
    for v in mel.iter_mut() {
        *v = (fast_log10(v.max(floor)) + 4.0) * 0.25;
    }
}

/// `src` (rows, cols) into `dst` (cols, rows), in cache-sized tiles.
fn transpose_into(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const TILE: usize = 32;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

/// log10 for positive normal f32, accurate to ~1 ulp of the result's scale: the exponent
/// plus an atanh series for the mantissa reduced to [sqrt(1/2), sqrt(2)). Branch-free so the
/// loop above vectorises; std's log10 was the front-end's largest cost.
#[inline(always)]
fn fast_log10(x: f32) -> f32 {
    const SQRT2: f32 = std::f32::consts::SQRT_2;
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    let big = m > SQRT2;
    m = if big { m * 0.5 } else { m };
    e += big as i32;
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    // ln(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + s^7/7 + s^9/9)
    let poly = 1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    let ln_m = 2.0 * s * poly;
    e as f32 * std::f32::consts::LOG10_2 + ln_m * std::f32::consts::LOG10_E
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_log10_matches_std() {
        let mut worst = 0f64;
        let mut x = 1e-10f32;
        while x < 1e12 {
            let err = (fast_log10(x) as f64 - (x as f64).log10()).abs();
            worst = worst.max(err);
            x *= 1.0007;
        }
        assert!(worst < 2e-6, "worst abs error {worst}");
    }

    #[test]
    fn reflect_pad_matches_numpy_reflect() {
        // np.pad([1,2,3,4,5], 200, mode="reflect") starts ... 3,2 | 1,2,3,4,5 | 4,3 ...
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let mut p = Vec::new();
        reflect_pad_into(&x, 5, &mut p);
        assert_eq!(p.len(), 405);
        assert_eq!(&p[198..207], &[3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 5.0, 4.0, 3.0]);
        // Period 8: index -200 maps to 0 (since 200 % 8 == 0).
        assert_eq!(p[0], 1.0);
        // Zero padding to 8 samples, then reflection of the padded body, as
        // np.pad([1,2,3,4,5,0,0,0], 200, mode="reflect")[198:211].
        reflect_pad_into(&x, 8, &mut p);
        assert_eq!(
            &p[198..211],
            &[3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0]
        );
    }

    #[test]
    fn window_count_and_hop() {
        let mut ex = LogMelExtractor::new(80).unwrap();
        let s = MelSettings::default();
        let samples = vec![0.01f32; N_SAMPLES * 2 + 5 * SAMPLE_RATE];
        let (n, data) = ex.windows(&samples, &s).unwrap();
        assert_eq!(n, 3);
        assert_eq!(data.len(), 3 * 80 * N_FRAMES);
        let exact = vec![0.01f32; N_SAMPLES * 2];
        assert_eq!(ex.windows(&exact, &s).unwrap().0, 2);
        let overlapping = MelSettings {
            window_hop_s: 10.0,
            ..s
        };
        // 65 s with 10 s hop: windows start at 0,10,20,30 (the one at 30 s reaches 60 s), 40 (reaches 65).
        let long = vec![0.01f32; 65 * SAMPLE_RATE];
        assert_eq!(ex.windows(&long, &overlapping).unwrap().0, 5);
    }

    #[test]
    fn clip_window_frames_round_up_to_whole_seconds() {
        let clip = MelSettings {
            window: EncoderWindow::Clip,
            ..MelSettings::default()
        };
        assert_eq!(clip.window_frames(1), 100);
        assert_eq!(clip.window_frames(16_000), 100);
        assert_eq!(clip.window_frames(16_001), 200);
        assert_eq!(clip.window_frames(N_SAMPLES * 2), N_FRAMES);
        assert_eq!(MelSettings::default().window_frames(1), N_FRAMES);
        // full-trimmed: the whole window into the encoder, the clip's (rounded) frames out.
        let trimmed = MelSettings {
            window: EncoderWindow::FullTrimmed,
            ..MelSettings::default()
        };
        for samples in [1, 16_000, 16_001, 45_000, N_SAMPLES, N_SAMPLES * 2] {
            assert_eq!(trimmed.window_frames(samples), N_FRAMES, "{samples}");
            assert_eq!(
                trimmed.kept_encoder_frames(samples),
                clip.window_frames(samples) / 2,
                "{samples}"
            );
            assert_eq!(
                clip.kept_encoder_frames(samples),
                clip.window_frames(samples) / 2
            );
            assert_eq!(
                MelSettings::default().kept_encoder_frames(samples),
                N_FRAMES / 2
            );
        }
    }

    /// A clip-length window is the start of the padded 30 s window: same STFT frames, same
    /// max for the clamp (the padding is silence), when the clip ends at least half an FFT
    /// before the rounded window does.
    #[test]
    fn clip_window_is_the_start_of_the_full_window() {
        let mut ex = LogMelExtractor::new(80).unwrap();
        let n = 21_900; // 1.37 s: rounded up to 2 s = 200 frames
        let clip: Vec<f32> = (0..n)
            .map(|i| {
                let t = i as f32 / SAMPLE_RATE as f32;
                0.3 * (2.0 * std::f32::consts::PI * 440.0 * t).sin() * (1.0 - t / 2.0)
            })
            .collect();
        let frames = 200;
        let full = ex.window_features(&clip, Padding::Whisper);
        let mut short = vec![0f32; 80 * frames];
        ex.features_into(&clip, Padding::Whisper, frames, &mut short);
        for m in 0..80 {
            for t in 0..frames {
                let (a, b) = (full[m * N_FRAMES + t], short[m * frames + t]);
                assert!((a - b).abs() <= 1e-6, "bin {m} frame {t}: {a} vs {b}");
            }
        }
    }
}
