//! Front-end timings for scripts/bench_frontend.sh (which runs the reference side by side).
//!
//! bench_frontend mel WAV_30S REPEATS      -> median seconds of one 30 s log-mel (1 thread)
//! bench_frontend decode FILE REPEATS      -> median seconds to decode + resample FILE to 16 kHz
//! bench_frontend resample RATE REPEATS    -> median seconds to resample 60 s of mono noise at
//!                                            RATE to 16 kHz: earshot (libswresample's filter)
//!                                            and, as "before", the rubato FFT resampler it
//!                                            replaced (kept here only to be measured)
//! Prints one JSON object per call on stdout.

use std::path::PathBuf;
use std::time::Instant;

use earshot::audio::{self, Segment};
use earshot::mel::{LogMelExtractor, Padding};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: bench_frontend (mel|decode|resample) FILE|RATE REPEATS";
    let (what, file, repeats) = match &args[..] {
        [_, w, f, r] => (
            w.as_str(),
            PathBuf::from(f),
            r.parse::<usize>().expect(usage),
        ),
        _ => panic!("{usage}"),
    };
    match what {
        "mel" => {
            let samples = audio::load_16k_mono(&file, Segment::whole()).unwrap();
            let mut ex = LogMelExtractor::new(80).unwrap();
            // Steady state of a pipeline: buffers reused, as LogMelExtractor::windows does.
            let mut out = ex.window_features(&samples, Padding::Whisper); // warm-up
            let times: Vec<f64> = (0..repeats)
                .map(|_| {
                    let t = Instant::now();
                    ex.window_features_into(&samples, Padding::Whisper, &mut out);
                    std::hint::black_box(&out);
                    t.elapsed().as_secs_f64()
                })
                .collect();
            println!(
                "{{\"what\":\"mel\",\"samples\":{},\"median_s\":{}}}",
                samples.len(),
                median(times)
            );
        }
        "decode" => {
            let mut n = 0;
            let times: Vec<f64> = (0..repeats)
                .map(|_| {
                    let t = Instant::now();
                    let s = audio::load_16k_mono(&file, Segment::whole()).unwrap();
                    n = s.len();
                    t.elapsed().as_secs_f64()
                })
                .collect();
            let m = median(times);
            println!(
                "{{\"what\":\"decode\",\"file\":{:?},\"samples_16k\":{n},\"median_s\":{m},\"audio_s_per_s\":{}}}",
                file.display().to_string(),
                n as f64 / 16000.0 / m
            );
        }
        "resample" => {
            let rate: u32 = file.to_str().and_then(|r| r.parse().ok()).expect(usage);
            // Deterministic white noise (an LCG): the cost does not depend on the content.
            let mut state = 0x2545_f491_4f6c_dd1du64;
            let input: Vec<f32> = (0..rate as usize * 60)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
                })
                .collect();
            let time = |f: &dyn Fn() -> usize| {
                f(); // warm-up
                median(
                    (0..repeats)
                        .map(|_| {
                            let t = Instant::now();
                            std::hint::black_box(f());
                            t.elapsed().as_secs_f64()
                        })
                        .collect(),
                )
            };
            let ours = time(&|| audio::resample_mono(&input, rate, 16_000).unwrap().len());
            let before = time(&|| rubato_fft(&input, rate, 16_000).len());
            println!(
                "{{\"what\":\"resample\",\"rate\":{rate},\"audio_s\":60,\"earshot_s\":{ours},\"rubato_fft_s\":{before}}}"
            );
        }
        _ => panic!("{usage}"),
    }
}

/// The resampler earshot used before it followed libswresample (rubato's synchronous FFT
/// resampler, its delay removed), for the before/after figure in BENCHMARKS.md.
fn rubato_fft(input: &[f32], rate_in: u32, rate_out: u32) -> Vec<f32> {
    use rubato::{FftFixedInOut, Resampler};
    let expected = (input.len() as u64 * rate_out as u64).div_ceil(rate_in as u64) as usize;
    let gcd = {
        let (mut a, mut b) = (rate_in as usize, rate_out as usize);
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let min_chunk_in = rate_in as usize / gcd;
    let chunks = 1024usize.div_ceil(min_chunk_in).next_multiple_of(2);
    let mut r = FftFixedInOut::<f32>::new(
        rate_in as usize,
        rate_out as usize,
        chunks * min_chunk_in,
        1,
    )
    .unwrap();
    let delay = r.output_delay();
    let chunk_in = r.input_frames_next();
    let mut output = Vec::with_capacity(expected + delay + r.output_frames_max());
    let mut out_buf = r.output_buffer_allocate(true);
    let mut pieces = input.chunks_exact(chunk_in);
    for chunk in &mut pieces {
        let (_, n) = r.process_into_buffer(&[chunk], &mut out_buf, None).unwrap();
        output.extend_from_slice(&out_buf[0][..n]);
    }
    let rest = pieces.remainder();
    if !rest.is_empty() {
        let (_, n) = r
            .process_partial_into_buffer(Some(&[rest]), &mut out_buf, None)
            .unwrap();
        output.extend_from_slice(&out_buf[0][..n]);
    }
    while output.len() < expected + delay {
        let (_, n) = r
            .process_partial_into_buffer(None::<&[&[f32]]>, &mut out_buf, None)
            .unwrap();
        if n == 0 {
            break;
        }
        output.extend_from_slice(&out_buf[0][..n]);
    }
    output.drain(..delay.min(output.len()));
    output.truncate(expected);
    output
}
