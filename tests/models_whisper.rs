//! Whisper encoder against CTranslate2's output, through `earshot import ct2` weights.

use earshot::models::nonfinite::NonFiniteTrace;
use earshot::models::whisper::WhisperEncoder;
use earshot::models::Runtime;
use earshot_tests::*;

#[test]
fn import_ct2_then_encode_matches_ctranslate2() {
    // Fresh import through the CLI, not the set-up's copy.
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("tiny-hf");
    let out = earshot([
        "import".as_ref(),
        "ct2".as_ref(),
        default_whisper_ct2().as_os_str(),
        "--out".as_ref(),
        hf.as_os_str(),
    ]);
    expect_success(&out);
    assert!(hf.join("model.safetensors").is_file() && hf.join("config.json").is_file());
    assert!(!dir.path().join("tiny-hf.partial").exists());

    let enc = dir.path().join("enc.npy");
    let out = earshot([
        "encode".as_ref(),
        whisper_oracle("expected/a_speech_mel_pad30s.npy").as_os_str(),
        "--whisper".as_ref(),
        hf.as_os_str(),
        "--out".as_ref(),
        enc.as_os_str(),
    ]);
    expect_success(&out);
    let (shape, got) = read_npy(&enc);
    assert_eq!(shape, vec![1, 1500, 384]);
    let (_, reference) = read_npy(&whisper_oracle("expected/a_speech_enc_pad30s.npy"));
    let err = rel_l2(&got, &reference);
    assert!(err <= 1e-3, "relative L2 {err}");
}

#[test]
fn encode_from_audio_end_to_end() {
    // Audio -> our mel -> our encoder, against CTranslate2 on the reference mel.
    let dir = tempfile::tempdir().unwrap();
    let enc = dir.path().join("enc.npy");
    let out = earshot([
        "encode".as_ref(),
        whisper_oracle("audio/a_speech_16k.flac").as_os_str(),
        "--whisper".as_ref(),
        default_whisper().as_os_str(),
        "--out".as_ref(),
        enc.as_os_str(),
    ]);
    expect_success(&out);
    let (shape, got) = read_npy(&enc);
    assert_eq!(shape, vec![1, 1500, 384]);
    let (_, reference) = read_npy(&whisper_oracle("expected/a_speech_enc_pad30s.npy"));
    let err = rel_l2(&got, &reference);
    assert!(err <= 1e-3, "relative L2 {err}");
}

#[test]
fn long_audio_gives_one_encoding_per_window() {
    let rt = Runtime::cpu();
    let encoder = WhisperEncoder::load_dir(&default_whisper(), &rt).unwrap();
    // Two windows of the reference mel: the batch must equal two single runs.
    let (_, mel) = read_npy(&whisper_oracle("expected/a_speech_mel_pad30s.npy"));
    let (_, mel_b) = read_npy(&whisper_oracle("expected/b_sine440_mel_pad30s.npy"));
    let both: Vec<f32> = mel.iter().chain(mel_b.iter()).copied().collect();
    let x = candle_core::Tensor::from_vec(both, (2, 80, 3000), &rt.device).unwrap();
    let y = encoder.forward(&x, NonFiniteTrace::default()).unwrap();
    assert_eq!(y.dims(), &[2, 1500, 384]);
    let first = y
        .get(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let (_, reference) = read_npy(&whisper_oracle("expected/a_speech_enc_pad30s.npy"));
    assert!(rel_l2(&first, &reference) <= 1e-3);
}

#[test]
fn encoder_refuses_a_mel_of_the_wrong_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = earshot([
        "encode".as_ref(),
        fixture("mel_filters_128_openai_whisper.npy").as_os_str(),
        "--whisper".as_ref(),
        default_whisper().as_os_str(),
        "--out".as_ref(),
        dir.path().join("x.npy").as_os_str(),
    ]);
    let err = expect_failure(&out);
    assert!(err.contains("mel shape [128, 201]"), "{err}");
}
