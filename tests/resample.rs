//! Resampling to 16 kHz against the reference pipeline: faster-whisper's decode_audio (PyAV ->
//! libswresample, its defaults) and its numpy log-mel, made by
//! scripts/make-resample-fixtures.sh (pinned versions; outputs in tests/fixtures/resample/).
//! The bar is the issue's: every mel band, every frame, within 5e-2 (log10 units); before
//! the resampler followed swr, bands 77-79 (7.4-8 kHz) were up to 0.26 off on every frame
//! with sound.

use std::path::PathBuf;

use earshot::audio::{self, Segment};
use earshot::mel::{LogMelExtractor, Padding};
use earshot_tests::*;

/// The mel bar of the issue, over all 80 bands and every frame.
const MEL_TOLERANCE: f32 = 5e-2;

/// (case name, input file, waveform tolerance). The generated WAVs are s16 like the
/// reference's output, so only its rounding (1.5e-5) separates them; the stamps are Vorbis,
/// decoded by symphonia here and by ffmpeg there.
fn cases() -> Vec<(&'static str, PathBuf, f32)> {
    let mut cases = Vec::new();
    for rate in [22_050, 44_100, 48_000] {
        for layout in ["mono", "stereo"] {
            let name: &'static str =
                Box::leak(format!("noise_chirp_{rate}_{layout}").into_boxed_str());
            cases.push((name, fixture(&format!("resample/{name}.wav")), 3e-5));
        }
    }
    let stamps = data_dir().join("tuxpaint-stamps-default/stamps");
    for (name, rel) in [
        (
            "stamp_washing_machine_44100_stereo",
            "household/Washing-machine.ogg",
        ),
        ("stamp_frog_44100_mono", "animals/amphibians/frog.ogg"),
        (
            "stamp_heron_22050_mono",
            "animals/birds/heron_greatblue_flying.ogg",
        ),
        ("stamp_one_it_48000_stereo", "symbols/math/1_it.ogg"),
        (
            "stamp_bathyscape_11025_mono",
            "vehicles/ship/cartoon/bathyscape.ogg",
        ),
    ] {
        cases.push((name, stamps.join(rel), 1e-3));
    }
    cases
}

#[test]
fn resampled_waveforms_and_mels_match_libswresample() {
    let mut extractor = LogMelExtractor::new(80).unwrap();
    let mut report = Vec::new();
    for (name, input, wave_tolerance) in cases() {
        assert!(
            input.is_file(),
            "{}: missing (generated WAVs are committed; the stamps come from scripts/setup.sh)",
            input.display()
        );
        let samples = audio::load_16k_mono(&input, Segment::whole()).unwrap();
        let (_, wave) = read_npy(&fixture(&format!("resample/{name}_wave16k.npy")));
        assert_eq!(samples.len(), wave.len(), "{name}: sample count");
        let wave_diff = max_abs_diff(&samples, &wave);

        // faster-whisper's convention: the clip's own frames, padded with zeros after.
        let (shape, reference) = read_npy(&fixture(&format!("resample/{name}_mel_fw.npy")));
        let (bands, frames) = (shape[0], shape[1]);
        assert_eq!(bands, 80);
        let mel = extractor.window_features(&samples, Padding::Trailing);
        let n_frames = mel.len() / bands;
        let mut worst = (0f32, 0usize, 0usize);
        for b in 0..bands {
            for f in 0..frames {
                let d = (mel[b * n_frames + f] - reference[b * frames + f]).abs();
                if d > worst.0 {
                    worst = (d, b, f);
                }
            }
        }
        report.push(format!(
            "{name}: wave {wave_diff:.2e}, mel {:.2e} (band {}, frame {})",
            worst.0, worst.1, worst.2
        ));
        assert!(
            wave_diff <= wave_tolerance,
            "{name}: waveform max abs diff {wave_diff} > {wave_tolerance}\n{}",
            report.join("\n")
        );
        assert!(
            worst.0 <= MEL_TOLERANCE,
            "{name}: mel max abs diff {} at band {} frame {} > {MEL_TOLERANCE}\n{}",
            worst.0,
            worst.1,
            worst.2,
            report.join("\n")
        );
    }
    eprintln!("{}", report.join("\n"));
}
