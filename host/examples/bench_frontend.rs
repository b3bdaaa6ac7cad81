//! Front-end timings for scripts/bench_frontend.sh (which runs the reference side by side).
//!
//! bench_frontend mel WAV_30S REPEATS      -> median seconds of one 30 s log-mel (1 thread)
//! bench_frontend decode FILE REPEATS      -> median seconds to decode + resample FILE to 16 kHz
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
    let usage = "usage: bench_frontend (mel|decode) FILE REPEATS";
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
        _ => panic!("{usage}"),
    }
}
