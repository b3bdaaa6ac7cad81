//! Sample-rate conversion that reproduces libswresample's default resampler: the one behind
//! faster-whisper's and openai-whisper's audio loading (PyAV and ffmpeg), and so behind the
//! log-mel features every Whisper checkpoint was trained and evaluated on.
//!
//! Why not rubato: its sinc resamplers offer Blackman/Hann windows and its FFT resampler its
//! own fixed filter; neither takes a Kaiser window or a caller's filter bank, and a different
//! transition band changes the top mel bands (7.4-8 kHz) by up to 0.26 log10 units on every
//! frame with sound. What Whisper expects is swr's filter, so that is what is built here.
//!
//! The algorithm, as libswresample 4-6 runs it with its defaults (filter_size 32,
//! phase_shift 10, linear_interp on, exact_rational on, cutoff 0.97, Kaiser window beta 9):
//! - a polyphase bank of Kaiser-windowed sincs with its cutoff at `min(1, 0.97 * out / in)`
//!   of the input's Nyquist, `ceil(32 / factor)` taps rounded up to even, every phase
//!   divided by the sum of phase 0;
//! - `out / gcd` phases when that is at most 1024 (every output lands exactly on a phase),
//!   otherwise 1024 phases with linear interpolation between neighbours;
//! - output `j` is centred on input time `j * in / out` (no delay);
//! - the input is mirrored at the start (`x[-n] = x[n]`) and, once it ends, by
//!   `(min(left, taps) + 1) / 2` samples (`x[N + k] = x[N - 1 - k]`), `left` being the
//!   samples swr still holds; the output ends where that mirrored tail runs out.
//!
//! Checked against PyAV 16.0.1 (libswresample 6.1) for 8 kHz to 96 kHz, exact and
//! interpolated phase counts, and lengths from 300 samples up: equal to its s16 output within
//! its rounding (1.5e-5), edges included, and the same number of samples.

/// The largest input rate accepted: past it the filter bank (taps grow with the ratio)
/// would cost more memory than any real recording warrants.
pub const MAX_INPUT_RATE: u32 = 1_536_000;

const FILTER_SIZE: f64 = 32.0;
const MAX_PHASES: u64 = 1 << 10;
const CUTOFF: f64 = 0.97;
const KAISER_BETA: f64 = 9.0;

/// The resampler for one pair of rates: the filter bank and the step between outputs.
struct Plan {
    /// Phases in the bank (rows `0..phases`, plus row `phases` = phase 0 one tap later).
    phases: u64,
    taps: usize,
    /// `(taps - 1) / 2`: the tap that sits on the output's time at phase 0.
    centre: usize,
    /// `(phases + 1) x taps`, row-major.
    bank: Vec<f32>,
    /// Output step in phase units is `div + modulo / src_incr`.
    src_incr: u64,
    div: u64,
    modulo: u64,
}

impl Plan {
    fn new(rate_in: u32, rate_out: u32) -> Plan {
        let factor = (rate_out as f64 * CUTOFF / rate_in as f64).min(1.0);
        let mut taps = ((FILTER_SIZE / factor).ceil() as usize).max(1);
        if taps > 1 {
            taps = taps.next_multiple_of(2);
        }
        let g = gcd(rate_in as u64, rate_out as u64);
        let exact = rate_out as u64 / g;
        let phases = if exact <= MAX_PHASES {
            exact
        } else {
            MAX_PHASES
        };
        let centre = (taps - 1) / 2;
        let mut rows = vec![vec![0f64; taps]; phases as usize];
        for (ph, row) in rows.iter_mut().enumerate() {
            for (i, tap) in row.iter_mut().enumerate() {
                let t = (i as f64 - centre as f64) - ph as f64 / phases as f64;
                let x = std::f64::consts::PI * t * factor;
                let sinc = if x == 0.0 { 1.0 } else { x.sin() / x };
                let w = 2.0 * x / (factor * taps as f64 * std::f64::consts::PI);
                *tap = sinc * bessel_i0(KAISER_BETA * (1.0 - w * w).max(0.0).sqrt());
            }
        }
        let norm: f64 = rows[0].iter().sum();
        let mut bank = Vec::with_capacity((phases as usize + 1) * taps);
        for row in &rows {
            bank.extend(row.iter().map(|&v| (v / norm) as f32));
        }
        // Row `phases` is phase 0 one input sample later: swr copies it from row 0 shifted by
        // one tap, its first tap taken from row 0's padding (zero unless the row has none).
        let padded = taps.next_multiple_of(8);
        bank.push(if padded == taps { bank[taps - 1] } else { 0.0 });
        bank.extend_from_within(0..taps - 1);

        let (num, den) = reduce(rate_out as u64, rate_in as u64 * phases);
        let (mut src_incr, mut dst_incr) = (num, den);
        while dst_incr < (1 << 20) && src_incr < (1 << 20) {
            dst_incr *= 2;
            src_incr *= 2;
        }
        Plan {
            phases,
            taps,
            centre,
            bank,
            src_incr,
            div: dst_incr / src_incr,
            modulo: dst_incr % src_incr,
        }
    }

    fn row(&self, phase: u64) -> &[f32] {
        let start = phase as usize * self.taps;
        &self.bank[start..start + self.taps]
    }

    /// Walks the outputs of an `n`-sample input, calling `emit(first_sample, phase, frac)`
    /// for each; returns how many there were.
    fn walk(&self, n: usize, mut emit: impl FnMut(i64, u64, u64)) -> usize {
        let n = n as i64;
        let taps = self.taps as i64;
        // The first output is centred on sample 0: its filter starts `centre` samples before.
        let mut first = -(self.centre as i64);
        let (mut phase, mut frac) = (0u64, 0u64);
        let mut end = n;
        let mut mirrored_tail = false;
        let mut count = 0;
        loop {
            if first + taps > end {
                if mirrored_tail {
                    return count;
                }
                // Input ended: swr mirrors half of what it still holds (at most the filter).
                let held = (n - first).clamp(0, taps);
                end = n + (held + 1) / 2;
                mirrored_tail = true;
                continue;
            }
            emit(first, phase, frac);
            count += 1;
            frac += self.modulo;
            phase += self.div;
            if frac >= self.src_incr {
                frac -= self.src_incr;
                phase += 1;
            }
            first += (phase / self.phases) as i64;
            phase %= self.phases;
        }
    }
}

/// Resamples mono `input` from `rate_in` to `rate_out` as libswresample's defaults do.
///
/// The output has [`resampled_len`] samples: `ceil(len * rate_out / rate_in)` or one fewer
/// (where swr's mirrored tail ends a sample early).
pub fn resample_mono(input: &[f32], rate_in: u32, rate_out: u32) -> Result<Vec<f32>, String> {
    check_rates(rate_in, rate_out)?;
    if rate_in == rate_out {
        return Ok(input.to_vec());
    }
    if input.is_empty() {
        return Ok(Vec::new());
    }
    let plan = Plan::new(rate_in, rate_out);
    let n = input.len() as i64;
    // Mirrored at both ends; a clip shorter than the mirror is mirrored as far as it goes
    // and zero beyond. (swr returns nothing at all for fewer than taps + 1 samples, 2 ms at
    // 44.1 kHz; this returns the filter's estimate instead of an empty clip.)
    let sample = |k: i64| -> f32 {
        let k = if k < 0 { -k } else { k };
        let k = if k >= n { 2 * n - 1 - k } else { k };
        if (0..n).contains(&k) {
            input[k as usize]
        } else {
            0.0
        }
    };
    let mut window = vec![0f32; plan.taps];
    let mut output = Vec::with_capacity(resampled_len_upper(input.len(), rate_in, rate_out));
    let interpolate = plan.modulo != 0;
    plan.walk(input.len(), |first, phase, frac| {
        let samples: &[f32] = if first >= 0 && first + plan.taps as i64 <= n {
            &input[first as usize..first as usize + plan.taps]
        } else {
            for (i, w) in window.iter_mut().enumerate() {
                *w = sample(first + i as i64);
            }
            &window
        };
        let mut value = dot(samples, plan.row(phase));
        if interpolate && frac != 0 {
            let next = dot(samples, plan.row(phase + 1));
            value += (next - value) * (frac as f64 / plan.src_incr as f64) as f32;
        }
        output.push(value);
    });
    Ok(output)
}

/// How many samples [`resample_mono`] returns for `frames` input samples, without resampling.
pub fn resampled_len(frames: u64, rate_in: u32, rate_out: u32) -> Result<u64, String> {
    check_rates(rate_in, rate_out)?;
    if rate_in == rate_out || frames == 0 {
        return Ok(frames);
    }
    let plan = Plan::new(rate_in, rate_out);
    let frames = usize::try_from(frames).map_err(|_| format!("{frames} frames is too many"))?;
    Ok(plan.walk(frames, |_, _, _| {}) as u64)
}

fn resampled_len_upper(frames: usize, rate_in: u32, rate_out: u32) -> usize {
    (frames as u64 * rate_out as u64).div_ceil(rate_in as u64) as usize + 1
}

fn check_rates(rate_in: u32, rate_out: u32) -> Result<(), String> {
    if rate_in == 0 || rate_out == 0 {
        return Err(format!(
            "cannot resample {rate_in} Hz to {rate_out} Hz: a rate of 0 Hz"
        ));
    }
    if rate_in > MAX_INPUT_RATE {
        return Err(format!(
            "a sample rate of {rate_in} Hz is above the {MAX_INPUT_RATE} Hz the resampler accepts"
        ));
    }
    Ok(())
}

/// A dot product in eight independent f32 lanes (vectorised by the compiler; the taps are a
/// few dozen to a few hundred, so accumulation error stays near f32's epsilon).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut lanes = [0f32; LANES];
    let whole = a.len() / LANES * LANES;
    for (x, y) in a[..whole]
        .chunks_exact(LANES)
        .zip(b[..whole].chunks_exact(LANES))
    {
        for k in 0..LANES {
            lanes[k] += x[k] * y[k];
        }
    }
    let mut sum = lanes.iter().sum::<f32>();
    for (x, y) in a[whole..].iter().zip(&b[whole..]) {
        sum += x * y;
    }
    sum
}

/// The modified Bessel function of the first kind, order 0, by its power series (converges
/// fast for the window's arguments, 0..=9).
fn bessel_i0(x: f64) -> f64 {
    let quarter_x2 = x * x / 4.0;
    let (mut sum, mut term, mut k) = (1.0f64, 1.0f64, 1.0f64);
    while term > sum * 1e-17 {
        term *= quarter_x2 / (k * k);
        sum += term;
        k += 1.0;
    }
    sum
}

fn reduce(num: u64, den: u64) -> (u64, u64) {
    let g = gcd(num, den);
    (num / g, den / g)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The centroid of a resampled impulse sits where the impulse was in time.
    #[test]
    fn no_time_shift() {
        for (rate_in, rate_out) in [
            (44_100u32, 16_000u32),
            (48_000, 16_000),
            (22_050, 16_000),
            (8_000, 16_000),
            (11_025, 16_000),
            (44_056, 16_000),
        ] {
            let mut impulse = vec![0f32; rate_in as usize];
            impulse[rate_in as usize / 2] = 1.0;
            let out = resample_mono(&impulse, rate_in, rate_out).unwrap();
            assert_eq!(out.len(), rate_out as usize);
            let (mut moment, mut mass) = (0f64, 0f64);
            for (j, &v) in out.iter().enumerate() {
                moment += j as f64 * v as f64;
                mass += v as f64;
            }
            let centre = moment / mass;
            let expected = (rate_in / 2) as f64 * rate_out as f64 / rate_in as f64;
            assert!(
                (centre - expected).abs() < 0.02,
                "{rate_in}->{rate_out}: centre {centre} vs {expected}"
            );
        }
    }

    /// A constant stays that constant (every phase sums to about phase 0's sum), edges too.
    #[test]
    fn dc_passes_at_unit_gain() {
        for rate_in in [8_000u32, 22_050, 44_100, 48_000, 44_056, 96_000] {
            let out = resample_mono(&vec![0.5f32; 10_000], rate_in, 16_000).unwrap();
            for (j, v) in out.iter().enumerate() {
                assert!((v - 0.5).abs() < 2e-3, "{rate_in} Hz: sample {j} = {v}");
            }
        }
    }

    /// The count agrees with the resampler, for lengths around the mirror's edge cases.
    #[test]
    fn resampled_len_is_the_output_length() {
        for rate_in in [8_000u32, 22_050, 44_100, 96_000, 12_345] {
            for n in [1usize, 2, 5, 47, 91, 92, 93, 200, 1_001, 144_007] {
                let out = resample_mono(&vec![0.1f32; n], rate_in, 16_000).unwrap();
                let len = resampled_len(n as u64, rate_in, 16_000).unwrap();
                assert_eq!(out.len() as u64, len, "{rate_in} Hz, {n} samples");
                // Past the filter's length the count is swr's: the ceiling or one fewer.
                if n >= 1_001 {
                    let ceil = (n as u64 * 16_000).div_ceil(rate_in as u64);
                    assert!(
                        len == ceil || len + 1 == ceil,
                        "{rate_in} Hz, {n}: {len} vs {ceil}"
                    );
                }
            }
        }
    }

    #[test]
    fn absurd_rates_are_refused() {
        assert!(resample_mono(&[0.0; 4], 0, 16_000).is_err());
        let err = resample_mono(&[0.0; 4], 4_000_000_000, 16_000).unwrap_err();
        assert!(err.contains("4000000000 Hz"), "{err}");
    }

    #[test]
    fn bessel_matches_known_values() {
        // I0(0) = 1, I0(1) = 1.2660658777520082, I0(9) = 1093.5883545113745.
        assert_eq!(bessel_i0(0.0), 1.0);
        assert!((bessel_i0(1.0) - 1.266_065_877_752_008_2).abs() < 1e-14);
        assert!((bessel_i0(9.0) / 1_093.588_354_511_374_5 - 1.0).abs() < 1e-14);
    }
}
