//! Every load checks the weights: non-finite values (every offending tensor named, with
//! counts), truncated files, missing tensors, wrong shapes, configs that contradict the weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use earshot_tests::*;

/// A copy of the default Whisper (HF layout) in `dir`, with its tensors passed through `edit`.
fn whisper_copy(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let src = default_whisper();
    let out = dir.join("whisper");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(src.join("config.json"), out.join("config.json")).unwrap();
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, out.join("model.safetensors")).unwrap();
    out
}

fn set_element(t: &Tensor, index: usize, value: f32) -> Tensor {
    let dtype = t.dtype();
    let mut v = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    v[index] = value;
    Tensor::from_vec(v, t.dims(), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn encode_with(whisper: &Path, extra: &[&str]) -> std::process::Output {
    let out = whisper.parent().unwrap().join("enc.npy");
    let mut args: Vec<std::ffi::OsString> = vec![
        "encode".into(),
        whisper_oracle("expected/a_speech_mel_pad30s.npy").into(),
        "--whisper".into(),
        whisper.into(),
        "--out".into(),
        out.into(),
    ];
    args.extend(extra.iter().map(|s| s.into()));
    earshot(args)
}

const FC1: &str = "model.encoder.layers.1.fc1.weight";
const POS: &str = "model.encoder.embed_positions.weight";

#[test]
fn nan_and_inf_weights_are_reported_by_name_with_counts() {
    let d = tempfile::tempdir().unwrap();
    let w = whisper_copy(d.path(), |t| {
        let a = set_element(&t[FC1], 10, f32::NAN);
        t.insert(FC1.into(), set_element(&a, 11, f32::NAN));
        t.insert(POS.into(), set_element(&t[POS], 3, f32::INFINITY));
    });
    for (out, code) in [
        (encode_with(&w, &[]), 1),
        (earshot(["inspect".as_ref(), w.as_os_str()]), EXIT_INTEGRITY),
    ] {
        let err = expect_exit(&out, code);
        assert!(err.contains("2 tensor(s) hold non-finite values"), "{err}");
        assert!(
            err.contains(&format!("{FC1} (NaN: 2, +Inf: 0, -Inf: 0)")),
            "{err}"
        );
        assert!(
            err.contains(&format!("{POS} (NaN: 0, +Inf: 1, -Inf: 0)")),
            "{err}"
        );
    }
    assert!(!d.path().join("enc.npy").exists());
}

#[test]
fn inspect_summarises_good_models() {
    let out = earshot(["inspect".as_ref(), default_whisper().as_os_str()]);
    let s = expect_success(&out);
    assert!(s.contains("architecture: whisper"), "{s}");
    assert!(s.contains("tensors: 167"), "{s}");
    assert!(s.contains("all tensors finite: yes"), "{s}");
    let out = earshot(["inspect".as_ref(), default_gguf().as_os_str()]);
    let s = expect_success(&out);
    assert!(s.contains("architecture: llama"), "{s}");
    assert!(s.contains("tensors_q4_1:"), "{s}");
    assert!(s.contains("bos_token: 1 \"<|im_start|>\""), "{s}");
    assert!(s.contains("eos_token: 2 \"<|im_end|>\""), "{s}");
    assert!(
        s.contains("sha256 SmolLM2-135M-Instruct.Q4_1.gguf: b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        "{s}"
    );
}

#[test]
fn truncated_safetensors_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let w = whisper_copy(d.path(), |_| {});
    let f = w.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    for (out, code) in [
        (encode_with(&w, &[]), 1),
        (earshot(["inspect".as_ref(), w.as_os_str()]), EXIT_INTEGRITY),
    ] {
        let err = expect_exit(&out, code);
        assert!(
            err.contains("model.safetensors: invalid or truncated safetensors"),
            "{err}"
        );
    }
}

#[test]
fn truncated_gguf_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("cut.gguf");
    let bytes = std::fs::read(default_gguf()).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let out = earshot(["inspect".as_ref(), f.as_os_str()]);
    let err = expect_exit(&out, EXIT_INTEGRITY);
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );
    let out = earshot([
        "generate".as_ref(),
        "--llm".as_ref(),
        f.as_os_str(),
        "--prompt".as_ref(),
        "hi".as_ref(),
    ]);
    let err = expect_failure(&out);
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );
    // Cut inside the header.
    std::fs::write(&f, &bytes[..1000]).unwrap();
    let out = earshot(["inspect".as_ref(), f.as_os_str()]);
    let err = expect_exit(&out, EXIT_INTEGRITY);
    assert!(err.contains("invalid or truncated GGUF"), "{err}");
}

#[test]
fn missing_tensor_is_named() {
    let d = tempfile::tempdir().unwrap();
    let w = whisper_copy(d.path(), |t| {
        t.remove("model.encoder.layers.2.self_attn.v_proj.weight");
    });
    let err = expect_failure(&encode_with(&w, &[]));
    assert!(
        err.contains("tensor `model.encoder.layers.2.self_attn.v_proj.weight` is missing"),
        "{err}"
    );
}

#[test]
fn shape_mismatch_is_named() {
    let d = tempfile::tempdir().unwrap();
    let w = whisper_copy(d.path(), |t| {
        let cut = t[FC1].narrow(0, 0, 100).unwrap();
        t.insert(FC1.into(), cut);
    });
    let err = expect_failure(&encode_with(&w, &[]));
    assert!(
        err.contains(&format!(
            "tensor `{FC1}` has shape [100, 384], expected [1536, 384]"
        )),
        "{err}"
    );
}

#[test]
fn config_that_contradicts_the_weights_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let w = whisper_copy(d.path(), |_| {});
    let cfg_path = w.join("config.json");
    let original = std::fs::read_to_string(&cfg_path).unwrap();
    for (key, value, expect) in [
        (
            "encoder_layers",
            6,
            "config says encoder_layers = 6, the weights have 4",
        ),
        ("d_model", 768, "config says d_model 768"),
        ("num_mel_bins", 128, "num_mel_bins 128"),
    ] {
        let mut cfg: serde_json::Value = serde_json::from_str(&original).unwrap();
        cfg[key] = value.into();
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let err = expect_failure(&encode_with(&w, &[]));
        assert!(
            err.contains("the config contradicts the weights") && err.contains(expect),
            "{key}: {err}"
        );
    }
    std::fs::write(&cfg_path, "{ not json").unwrap();
    let err = expect_failure(&encode_with(&w, &[]));
    assert!(err.contains("config.json: bad config"), "{err}");
}

#[test]
fn trace_nonfinite_names_the_first_bad_layer() {
    // Finite weights that overflow in f32 arithmetic: layer 2's MLP layer-norm gain set to
    // 3e38 (stored as f32: the file's f16 could not hold it), so the normalised activations
    // beyond +-1.13 overflow.
    let d = tempfile::tempdir().unwrap();
    let name = "model.encoder.layers.2.final_layer_norm.weight";
    let w = whisper_copy(d.path(), |t| {
        let huge = Tensor::full(3e38f32, t[name].dims(), &Device::Cpu).unwrap();
        t.insert(name.into(), huge);
    });
    let err = expect_failure(&encode_with(&w, &[]));
    assert!(
        err.contains("NaN/Inf") && err.contains("--trace-nonfinite"),
        "{err}"
    );
    assert!(!d.path().join("enc.npy").exists(), "no output on failure");
    let err = expect_failure(&encode_with(&w, &["--trace-nonfinite"]));
    assert!(
        err.contains("non-finite values first appear in the output of whisper.encoder.layers.2"),
        "{err}"
    );
}

/// A copy of the default GGUF with `value` written over element `index` of the f32 tensor
/// `name` (found through the file's own tensor table).
fn gguf_copy_with(dir: &Path, name: &str, index: usize, value: f32) -> PathBuf {
    use candle_core::quantized::{gguf_file, GgmlDType};
    let src = default_gguf();
    let mut f = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let info = &content.tensor_infos[name];
    assert_eq!(info.ggml_dtype, GgmlDType::F32, "{name} is stored as f32");
    let at = content.tensor_data_offset as usize + info.offset as usize + 4 * index;
    let mut bytes = std::fs::read(&src).unwrap();
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    let out = dir.join("model.gguf");
    std::fs::write(&out, bytes).unwrap();
    out
}

fn generate_with(llm: &Path) -> std::process::Output {
    earshot([
        "generate".as_ref(),
        "--llm".as_ref(),
        llm.as_os_str(),
        "--prompt".as_ref(),
        "Hello".as_ref(),
        "--max-tokens".as_ref(),
        "1".as_ref(),
    ])
}

#[test]
fn nan_and_inf_in_gguf_and_hugging_face_llm_weights_are_named() {
    let d = tempfile::tempdir().unwrap();
    let gguf = gguf_copy_with(d.path(), "output_norm.weight", 7, f32::NAN);
    let err = expect_failure(&generate_with(&gguf));
    assert!(
        err.contains("model.gguf") && err.contains("model.norm.weight (NaN: 1, +Inf: 0, -Inf: 0)"),
        "{err}"
    );
    // The same model in Hugging Face layout, with an infinity in one projection.
    let hf = d.path().join("hf");
    expect_success(&earshot([
        "import".as_ref(),
        "gguf".as_ref(),
        default_gguf().as_os_str(),
        "--out".as_ref(),
        hf.as_os_str(),
    ]));
    let file = hf.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let name = "model.layers.3.mlp.down_proj.weight";
    let edited = set_element(&t[name], 5, f32::NEG_INFINITY);
    t.insert(name.to_string(), edited);
    candle_core::safetensors::save(&t, &file).unwrap();
    let err = expect_failure(&generate_with(&hf));
    assert!(
        err.contains(&format!("{name} (NaN: 0, +Inf: 0, -Inf: 1)")),
        "{err}"
    );
}

/// `earshot train` on the bundled config into `run`, up to `steps`.
fn train_tones(run: &Path, steps: usize, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<String> = vec![
        "train".into(),
        repo_root()
            .join("configs/cpu-smollm2-tones.toml")
            .display()
            .to_string(),
        "--set".into(),
        format!("train.run-dir=\"{}\"", run.display()),
        "--set".into(),
        format!("train.steps={steps}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    earshot(args)
}

#[test]
fn nan_in_a_projector_checkpoint_is_named() {
    let d = tempfile::tempdir().unwrap();
    // A projector for the bundled config, trained one step, then poisoned.
    let run = d.path().join("run");
    expect_success(&train_tones(&run, 1, &[]));
    let file = run.join("projector.safetensors");
    let mut t = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let name = t.keys().find(|k| k.contains("weight")).unwrap().clone();
    let edited = set_element(&t[&name], 3, f32::NAN);
    t.insert(name.clone(), edited);
    candle_core::safetensors::save(&t, &file).unwrap();
    let clip = repo_root().join("configs/data/tones/clips/one.wav");
    let err = expect_failure(&earshot([
        "caption".as_ref(),
        "--config".as_ref(),
        repo_root()
            .join("configs/cpu-smollm2-tones.toml")
            .as_os_str(),
        "--checkpoint".as_ref(),
        file.as_os_str(),
        clip.as_os_str(),
    ]));
    assert!(
        err.contains("projector.safetensors") && err.contains(&name) && err.contains("NaN"),
        "{err}"
    );
    // The same inside a checkpoint folder, which resume reads.
    let ckpt = run.join("checkpoints/step-00000001/projector.safetensors");
    candle_core::safetensors::save(&t, &ckpt).unwrap();
    let err = expect_failure(&train_tones(&run, 2, &["--resume"]));
    assert!(
        err.contains("step-00000001") && err.contains("NaN"),
        "{err}"
    );
}
