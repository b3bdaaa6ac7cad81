//! Log-mel front-end against faster-whisper / OpenAI Whisper reference arrays.

use earshot::audio::{self, Segment};
use earshot::mel::{mel_filterbank, LogMelExtractor, MelSettings, Padding, N_FRAMES, N_SAMPLES};
use earshot_tests::*;

#[test]
fn filterbank_80_matches_whisper() {
    let (shape, reference) = read_npy(&whisper_oracle("expected/mel_filters_80.npy"));
    assert_eq!(shape, vec![80, 201]);
    let d = max_abs_diff(&mel_filterbank(80), &reference);
    assert!(d <= 1e-6, "max abs diff {d}");
}

#[test]
fn filterbank_128_matches_openai_whisper_asset() {
    // `mel_128` from whisper/assets/mel_filters.npz in the openai-whisper package (librosa).
    let (shape, reference) = read_npy(&fixture("mel_filters_128_openai_whisper.npy"));
    assert_eq!(shape, vec![128, 201]);
    let d = max_abs_diff(&mel_filterbank(128), &reference);
    assert!(d <= 1e-6, "max abs diff {d}");
}

fn mel_of(samples: &[f32], padding: Padding) -> Vec<f32> {
    LogMelExtractor::new(80)
        .unwrap()
        .window_features(samples, padding)
}

fn assert_close(got: &[f32], reference_rel: &str) {
    let (shape, reference) = read_npy(&whisper_oracle(reference_rel));
    assert_eq!(shape, vec![80, 3000]);
    let d = max_abs_diff(got, &reference);
    assert!(d <= 1e-3, "{reference_rel}: max abs diff {d}");
}

#[test]
fn speech_mel_whisper_padding() {
    let samples =
        audio::load_16k_mono(&whisper_oracle("audio/a_speech_16k.wav"), Segment::whole()).unwrap();
    assert_close(
        &mel_of(&samples, Padding::Whisper),
        "expected/a_speech_mel_pad30s.npy",
    );
}

#[test]
fn speech_mel_trailing_padding_like_faster_whisper() {
    let samples =
        audio::load_16k_mono(&whisper_oracle("audio/a_speech_16k.wav"), Segment::whole()).unwrap();
    assert_close(
        &mel_of(&samples, Padding::Trailing),
        "expected/a_speech_mel_fw.npy",
    );
}

#[test]
fn sine_mel_whisper_padding() {
    // The reference was computed from sox's 16 kHz resampling of the 44.1 kHz file.
    let (_, sox_16k) = read_npy(&whisper_oracle("expected/b_sine440_wave_f32.npy"));
    assert_close(
        &mel_of(&sox_16k, Padding::Whisper),
        "expected/b_sine440_mel_pad30s.npy",
    );
    // End to end from the 44.1 kHz stereo file through our own decoder and resampler. Resamplers
    // legitimately differ in the first/last few samples (boundary handling), which touches
    // the first and last STFT frames; every frame in between must agree.
    let ours = audio::load_16k_mono(
        &whisper_oracle("audio/b_sine440_44k1_stereo.wav"),
        Segment::whole(),
    )
    .unwrap();
    let got = mel_of(&ours, Padding::Whisper);
    let (_, reference) = read_npy(&whisper_oracle("expected/b_sine440_mel_pad30s.npy"));
    let real_frames = 48000 / 160; // 300
    let mut worst = 0f32;
    for m in 0..80 {
        for t in 2..real_frames - 2 {
            worst = worst.max((got[m * 3000 + t] - reference[m * 3000 + t]).abs());
        }
        for t in real_frames + 2..3000 {
            worst = worst.max((got[m * 3000 + t] - reference[m * 3000 + t]).abs());
        }
    }
    assert!(worst <= 1e-3, "interior frames: max abs diff {worst}");
}

#[test]
fn long_audio_windows_are_independent_clips() {
    let speech =
        audio::load_16k_mono(&whisper_oracle("audio/a_speech_16k.wav"), Segment::whole()).unwrap();
    // 65 s: speech repeated with gaps, so windows differ.
    let mut long = Vec::new();
    while long.len() < 65 * 16000 {
        long.extend_from_slice(&speech);
        long.extend(std::iter::repeat_n(0.0, 7919));
    }
    long.truncate(65 * 16000);
    for padding in [Padding::Whisper, Padding::Trailing] {
        let settings = MelSettings {
            n_mels: 80,
            padding,
            window_hop_s: 30.0,
            ..Default::default()
        };
        let mut ex = LogMelExtractor::new(80).unwrap();
        let (n, data) = ex.windows(&long, &settings).unwrap();
        assert_eq!(n, 3);
        for w in 0..n {
            let start = w * N_SAMPLES;
            let clip = &long[start..(start + N_SAMPLES).min(long.len())];
            let expected = ex.window_features(clip, padding);
            assert_eq!(
                &data[w * 80 * N_FRAMES..(w + 1) * 80 * N_FRAMES],
                &expected[..]
            );
        }
        // The last window holds 5 s of audio: 500 real frames then padding.
        let last = &data[2 * 80 * N_FRAMES..];
        if padding == Padding::Trailing {
            assert!(last[501..N_FRAMES].iter().all(|&v| v == 0.0));
        }
    }
}

#[test]
fn cli_mel_writes_the_same_features() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("speech.npy");
    let input = whisper_oracle("audio/a_speech_16k.flac");
    let o = earshot([
        "mel".as_ref(),
        input.as_os_str(),
        "--padding".as_ref(),
        "trailing".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(o.stdout.is_empty(), "mel prints nothing on stdout");
    let (shape, data) = read_npy(&out);
    assert_eq!(shape, vec![1, 80, 3000]);
    let (_, reference) = read_npy(&whisper_oracle("expected/a_speech_mel_fw.npy"));
    assert!(max_abs_diff(&data, &reference) <= 1e-3);

    // 128 bins and a segment.
    let out128 = dir.path().join("speech128.npy");
    let o = earshot([
        "mel".as_ref(),
        input.as_os_str(),
        "--bins".as_ref(),
        "128".as_ref(),
        "--start".as_ref(),
        "0.5".as_ref(),
        "--end".as_ref(),
        "2".as_ref(),
        "--out".as_ref(),
        out128.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (shape, _) = read_npy(&out128);
    assert_eq!(shape, vec![1, 128, 3000]);

    let o = earshot([
        "mel".as_ref(),
        input.as_os_str(),
        "--bins".as_ref(),
        "64".as_ref(),
        "--out".as_ref(),
        out128.as_os_str(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("80 or 128"));
}
