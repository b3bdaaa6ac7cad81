//! Whisper encoder against CTranslate2's output, through `earshot import ct2` weights.

use earshot::models::nonfinite::NonFiniteTrace;
use earshot::models::whisper::WhisperEncoder;
use earshot::models::Runtime;
use earshot_tests::*;

/// `earshot encode INPUT --whisper WHISPER --out OUT`.
fn encode_cli(
    input: &std::path::Path,
    whisper: &std::path::Path,
    out: &std::path::Path,
) -> std::process::Output {
    earshot([
        "encode".as_ref(),
        input.as_os_str(),
        "--whisper".as_ref(),
        whisper.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
    ])
}

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
    let out = encode_cli(
        &whisper_oracle("expected/a_speech_mel_pad30s.npy"),
        &hf,
        &enc,
    );
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
    let out = encode_cli(
        &whisper_oracle("audio/a_speech_16k.flac"),
        &default_whisper(),
        &enc,
    );
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
    let out = encode_cli(
        &fixture("mel_filters_128_openai_whisper.npy"),
        &default_whisper(),
        &dir.path().join("x.npy"),
    );
    let err = expect_failure(&out);
    assert!(err.contains("mel shape [128, 201]"), "{err}");
}

/// A Whisper folder shaped like large-v3's release: 128 mel bins, f16 weights in two
/// shards with `model.safetensors.index.json`, decoder tensors present (and unused). Built
/// from tiny.en's weights with a new 128-bin first convolution.
fn write_128_bin_folder(dir: &std::path::Path, f16_shards: bool) {
    use candle_core::{DType, Device, Tensor};
    let src = default_whisper();
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let d = tensors["model.encoder.conv1.weight"].dim(0).unwrap();
    // Deterministic values, so both folders hold the same weights.
    let conv1: Vec<f32> = (0..d * 128 * 3)
        .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1)
        .collect();
    tensors.insert(
        "model.encoder.conv1.weight".into(),
        Tensor::from_vec(conv1, (d, 128, 3), &Device::Cpu).unwrap(),
    );
    tensors.insert(
        "model.decoder.embed_tokens.weight".into(),
        Tensor::ones((10, d), DType::F32, &Device::Cpu).unwrap(),
    );
    // The same values in both folders: rounded to f16 once.
    let tensors: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| {
            let t = t.to_dtype(DType::F16).unwrap();
            (
                k,
                if f16_shards {
                    t
                } else {
                    t.to_dtype(DType::F32).unwrap()
                },
            )
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["num_mel_bins"] = 128.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    if !f16_shards {
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        return;
    }
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        let shard: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), tensors[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.join(file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), file.into());
        }
    }
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({ "metadata": {}, "weight_map": weight_map }).to_string(),
    )
    .unwrap();
}

#[test]
fn a_128_mel_bin_encoder_loads_from_f16_shards() {
    let dir = tempfile::tempdir().unwrap();
    let (sharded, single) = (dir.path().join("f16-shards"), dir.path().join("f32"));
    write_128_bin_folder(&sharded, true);
    write_128_bin_folder(&single, false);
    assert!(!sharded.join("model.safetensors").exists());
    let mut outputs = Vec::new();
    for folder in [&sharded, &single] {
        // From audio: the CLI computes a 128-bin mel for this encoder.
        let enc = dir.path().join(format!(
            "{}.npy",
            folder.file_name().unwrap().to_string_lossy()
        ));
        let out = encode_cli(&fixture("audio/speech_f32.wav"), folder, &enc);
        expect_success(&out);
        let (shape, values) = read_npy(&enc);
        assert_eq!(shape, vec![1, 1500, 384]);
        assert!(values.iter().all(|v| v.is_finite()));
        outputs.push(values);
    }
    // f16 shards widened to f32 are the same weights as the f32 file.
    assert_eq!(max_abs_diff(&outputs[0], &outputs[1]), 0.0);
    // An 80-bin mel is refused by this encoder, naming both sizes.
    let out = encode_cli(
        &whisper_oracle("expected/a_speech_mel_pad30s.npy"),
        &sharded,
        &dir.path().join("x.npy"),
    );
    let err = expect_failure(&out);
    assert!(err.contains("[80, 3000]") && err.contains("128"), "{err}");
}

/// `forward_layers`: the hidden states side by side, in ascending order; the last one is
/// the encoder's output (checked against CTranslate2), any subset is the same columns of
/// all of them, and blocks past the deepest state asked for do not change the others.
#[test]
fn hidden_states_side_by_side() {
    use candle_core::Tensor;
    let rt = Runtime::cpu();
    let encoder = WhisperEncoder::load_dir(&default_whisper(), &rt).unwrap();
    let (_, mel) = read_npy(&whisper_oracle("expected/a_speech_mel_pad30s.npy"));
    let x = Tensor::from_vec(mel, (1, 80, 3000), &rt.device).unwrap();
    let all = encoder
        .forward_layers(&x, &[0, 1, 2, 3, 4], NonFiniteTrace::default())
        .unwrap();
    assert_eq!(all.dims(), &[1, 1500, 5 * 384]);
    let state = |t: &Tensor, j: usize| -> Vec<f32> {
        t.narrow(2, j * 384, 384)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (_, reference) = read_npy(&whisper_oracle("expected/a_speech_enc_pad30s.npy"));
    let err = rel_l2(&state(&all, 4), &reference);
    assert!(
        err <= 1e-3,
        "state 4 (the output) vs CTranslate2: relative L2 {err}"
    );
    let out = encoder.forward(&x, NonFiniteTrace::default()).unwrap();
    assert_eq!(state(&out, 0), state(&all, 4));
    let some = encoder
        .forward_layers(&x, &[1, 3], NonFiniteTrace::default())
        .unwrap();
    assert_eq!(some.dims(), &[1, 1500, 2 * 384]);
    assert_eq!(state(&some, 0), state(&all, 1));
    assert_eq!(state(&some, 1), state(&all, 3));
    // Five different states: the residual stream grows through the blocks.
    for j in 0..4 {
        let d = rel_l2(&state(&all, j), &state(&all, j + 1));
        assert!(d > 0.05, "states {j} and {} nearly equal ({d})", j + 1);
    }
    for bad in [&[][..], &[2, 1], &[5], &[1, 1]] {
        let e = encoder
            .forward_layers(&x, bad, NonFiniteTrace::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden-state indices"), "{bad:?}: {e}");
    }
}

/// `[mel] window = "full-trimmed"`: the 30 s window into the encoder and the frames covering
/// the clip (rounded up to whole seconds) out: exactly the first frames of the full window's
/// output, as many as a clip-length window gives, and not the clip-length window's values
/// (their context differs: Whisper was trained on whole windows).
#[test]
fn full_trimmed_windows_are_the_full_window_s_first_frames() {
    use earshot::mel::{EncoderWindow, MelSettings};
    use earshot::pipeline::clip::ClipEncoder;
    let samples = earshot::audio::load_16k_mono(
        &whisper_oracle("audio/a_speech_16k.wav"),
        earshot::audio::Segment::whole(),
    )
    .unwrap();
    // 46,536 samples: 291 mel frames, rounded up to 300, so 150 encoder frames kept.
    assert_eq!(samples.len(), 46_536);
    let encode = |window: EncoderWindow| {
        let rt = Runtime::cpu();
        let encoder = WhisperEncoder::load_dir(&default_whisper(), &rt).unwrap();
        let settings = MelSettings {
            window,
            ..MelSettings::default()
        };
        let mut clip = ClipEncoder::new(encoder, rt, settings, None).unwrap();
        let mut out = clip.encode_samples(&samples, (None, None), None).unwrap();
        assert_eq!(out.len(), 1, "{window:?}: one window");
        out.remove(0)
    };
    let full = encode(EncoderWindow::Full);
    let trimmed = encode(EncoderWindow::FullTrimmed);
    let clip = encode(EncoderWindow::Clip);
    assert_eq!(full.dims(), &[1, 1500, 384]);
    assert_eq!(trimmed.dims(), &[1, 150, 384]);
    assert_eq!(clip.dims(), trimmed.dims());
    let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let head = full.narrow(1, 0, 150).unwrap();
    assert_eq!(max_abs_diff(&flat(&head), &flat(&trimmed)), 0.0);
    let apart = max_abs_diff(&flat(&clip), &flat(&trimmed));
    assert!(
        apart > 0.1,
        "clip-length and trimmed windows differ by only {apart}"
    );
}
