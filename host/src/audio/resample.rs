//! Sample-rate conversion with rubato's synchronous FFT resampler (exact rational ratios,
//! band-limited, no drift), with its processing delay removed so output sample `i` lines up
//! with input time `i / rate_out`.

use rubato::{FftFixedInOut, Resampler};

/// Resamples mono `input` from `rate_in` to `rate_out`.
///
/// The output has `ceil(len * rate_out / rate_in)` samples (the convention of sox and
/// torchaudio), so a 3 s clip at 44.1 kHz becomes exactly 48 000 samples at 16 kHz.
pub fn resample_mono(input: &[f32], rate_in: u32, rate_out: u32) -> Result<Vec<f32>, String> {
    if rate_in == rate_out {
        return Ok(input.to_vec());
    }
    let expected = (input.len() as u64 * rate_out as u64).div_ceil(rate_in as u64) as usize;
    if input.is_empty() {
        return Ok(Vec::new());
    }
    // rubato reports its delay as fft_size_out / 2 while its filter is centred on
    // fft_size_in / 2 (integer division): with an odd FFT size the output is off by half an
    // input sample. An even number of minimal chunks makes both sizes even and the delay exact.
    let gcd = gcd(rate_in as usize, rate_out as usize);
    let min_chunk_in = rate_in as usize / gcd;
    let chunks = 1024usize.div_ceil(min_chunk_in).next_multiple_of(2);
    let mut resampler = FftFixedInOut::<f32>::new(
        rate_in as usize,
        rate_out as usize,
        chunks * min_chunk_in,
        1,
    )
    .map_err(|e| e.to_string())?;
    let delay = resampler.output_delay();
    let chunk_in = resampler.input_frames_next();
    let mut output = Vec::with_capacity(expected + delay + resampler.output_frames_max());
    let mut out_buf = resampler.output_buffer_allocate(true);

    let mut chunks = input.chunks_exact(chunk_in);
    for chunk in &mut chunks {
        let (_, written) = resampler
            .process_into_buffer(&[chunk], &mut out_buf, None)
            .map_err(|e| e.to_string())?;
        output.extend_from_slice(&out_buf[0][..written]);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let (_, written) = resampler
            .process_partial_into_buffer(Some(&[rest]), &mut out_buf, None)
            .map_err(|e| e.to_string())?;
        output.extend_from_slice(&out_buf[0][..written]);
    }
    // Flush the filter's tail with silence until the delayed output is complete.
    while output.len() < expected + delay {
        let (_, written) = resampler
            .process_partial_into_buffer(None::<&[&[f32]]>, &mut out_buf, None)
            .map_err(|e| e.to_string())?;
        if written == 0 {
            break;
        }
        output.extend_from_slice(&out_buf[0][..written]);
    }
    output.drain(..delay.min(output.len()));
    output.truncate(expected);
    Ok(output)
}

fn gcd(a: usize, b: usize) -> usize {
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
}
