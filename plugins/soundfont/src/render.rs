//! Turning a sample's points into the clip an example carries: looped samples played out to
//! a minimum length (as a held note would sound), long ones cut, a short fade where the clip
//! ends inside the recording, then a 16-bit mono WAV.

use crate::sf2::SampleHeader;

/// Fade length where a clip is cut or a loop stops: avoids a click the encoder would hear.
const FADE_S: f64 = 0.02;

pub fn render(
    points: &[i16],
    s: &SampleHeader,
    loops: bool,
    min_duration_s: f64,
    max_duration_s: f64,
) -> Vec<i16> {
    let rate = s.sample_rate as f64;
    let min_len = (min_duration_s * rate).round() as usize;
    let max_len = ((max_duration_s * rate).round() as usize).max(1);
    let mut out: Vec<i16> = points.to_vec();
    let mut cut = false;
    if loops && s.has_valid_loop() && out.len() < min_len {
        let a = (s.loop_start - s.start) as usize;
        let b = (s.loop_end - s.start) as usize;
        out.truncate(b);
        while out.len() < min_len {
            let need = min_len - out.len();
            out.extend_from_slice(&points[a..b][..need.min(b - a)]);
        }
        cut = true;
    }
    if out.len() > max_len {
        out.truncate(max_len);
        cut = true;
    }
    if cut {
        let n = ((FADE_S * rate) as usize).min(out.len());
        let len = out.len();
        for (i, v) in out[len - n..].iter_mut().enumerate() {
            let g = 1.0 - (i + 1) as f64 / n as f64;
            *v = (*v as f64 * g).round() as i16;
        }
    }
    out
}

/// The clip played `semitones` away from its pitch: read at 2^(semitones/12) points per
/// output point with linear interpolation (as a SoundFont synthesiser's simplest
/// interpolation), so it is shorter when played higher and longer when played lower.
pub fn transpose(points: &[i16], semitones: i8) -> Vec<i16> {
    if points.is_empty() {
        return Vec::new();
    }
    let step = 2f64.powf(semitones as f64 / 12.0);
    let n = ((points.len() - 1) as f64 / step).floor() as usize + 1;
    (0..n)
        .map(|i| {
            let at = i as f64 * step;
            let j = at as usize;
            let frac = at - j as f64;
            let a = points[j] as f64;
            let b = points.get(j + 1).copied().unwrap_or(points[j]) as f64;
            (a + (b - a) * frac).round() as i16
        })
        .collect()
}

pub fn wav_bytes(points: &[i16], rate: u32) -> Vec<u8> {
    let data = points.len() as u32 * 2;
    let mut b = Vec::with_capacity(44 + data as usize);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes()); // PCM
    b.extend_from_slice(&1u16.to_le_bytes()); // mono
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate * 2).to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data.to_le_bytes());
    for p in points {
        b.extend_from_slice(&p.to_le_bytes());
    }
    b
}
