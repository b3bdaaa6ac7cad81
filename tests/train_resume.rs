//! Checkpoints: an interrupted and resumed run gives the same losses as an uninterrupted
//! one; a manifest mismatch is refused; kill -9 mid-run leaves a loadable checkpoint;
//! Ctrl-C saves one and exits cleanly; the second run takes every clip from the encoder cache.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use earshot_tests::*;

fn bundled() -> PathBuf {
    repo_root().join("configs/cpu-smollm2-tones.toml")
}

fn train(run_dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args: Vec<String> = vec![
        "train".into(),
        bundled().display().to_string(),
        "--set".into(),
        format!("train.run-dir=\"{}\"", run_dir.display()),
        "--set".into(),
        "train.steps=6".into(),
        "--set".into(),
        "train.checkpoint-every=3".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    earshot(args)
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    expect_success(&train(&a, &[]));
    let out = train(&b, &["--max-steps", "3"]);
    expect_success(&out);
    assert!(b.join("checkpoints/step-00000003/state.json").is_file());
    // The second run finds every clip in the encoder cache.
    let out = train(&b, &["--resume"]);
    let stdout = expect_success(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("encoder: 0 clip(s) encoded, 8 from the cache"),
        "{stderr}"
    );
    assert!(
        stdout.contains("trained to step 6 (3 step(s) now)"),
        "{stdout}"
    );
    let (la, lb) = (run_losses(&a), run_losses(&b));
    assert_eq!(la.len(), 6);
    assert_eq!(
        lb.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    for ((s, x), (_, y)) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-5, "step {s}: {x} vs {y}");
    }
    let pa = std::fs::read(a.join("projector.safetensors")).unwrap();
    let pb = std::fs::read(b.join("projector.safetensors")).unwrap();
    assert_eq!(pa, pb, "the resumed projector equals the uninterrupted one");

    // A checkpoint made with other settings is refused, naming what differs.
    let out = train(
        &b,
        &[
            "--resume",
            "--set",
            "mel.padding=\"trailing\"",
            "--set",
            "train.steps=7",
        ],
    );
    let err = expect_failure(&out);
    assert!(
        err.contains("mel settings") && err.contains("refusing to resume"),
        "{err}"
    );
    let out = train(
        &b,
        &[
            "--resume",
            "--set",
            "train.batch-size=2",
            "--set",
            "train.steps=7",
        ],
    );
    let err = expect_failure(&out);
    assert!(err.contains("data order would differ"), "{err}");
    // Only the newest checkpoints are kept (keep-last = 3): steps 3 and 6.
    let kept: Vec<String> = std::fs::read_dir(b.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(kept.contains(&"step-00000006".to_string()), "{kept:?}");
}

fn spawn_train(run_dir: &Path, steps: usize) -> std::process::Child {
    earshot_command()
        .args(["train".as_ref(), bundled().as_os_str()])
        .arg("--set")
        .arg(format!("train.run-dir=\"{}\"", run_dir.display()))
        .arg("--set")
        .arg(format!("train.steps={steps}"))
        .arg("--set")
        .arg("train.checkpoint-every=1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for_checkpoints(run_dir: &Path, n: usize) {
    let started = Instant::now();
    while complete_checkpoints(run_dir).len() < n {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Steps of the complete checkpoints (`step-N` folders holding a state.json), ascending.
fn complete_checkpoints(run_dir: &Path) -> Vec<usize> {
    let mut steps: Vec<usize> = std::fs::read_dir(run_dir.join("checkpoints"))
        .map(|r| {
            r.filter_map(|e| {
                let e = e.unwrap();
                let n = e.file_name().to_string_lossy().to_string();
                let step = n.strip_prefix("step-")?.parse().ok()?;
                e.path().join("state.json").is_file().then_some(step)
            })
            .collect()
        })
        .unwrap_or_default();
    steps.sort();
    steps
}

/// Six steps with a checkpoint after each, killed (SIGKILL, by a fault-injection point only
/// tests enable) inside the checkpoint write of step 4 at `stage`; then resumed.
fn killed_in_checkpoint_write(run: &Path, stage: &str) -> std::process::Output {
    let out = earshot_command()
        .args(["train".as_ref(), bundled().as_os_str()])
        .arg("--set")
        .arg(format!("train.run-dir=\"{}\"", run.display()))
        .args([
            "--set",
            "train.steps=6",
            "--set",
            "train.checkpoint-every=1",
        ])
        .env("EARSHOT_TEST_KILL_IN_CHECKPOINT", format!("{stage}@4"))
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(9),
        "{stage}: the fault injection did not kill the run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    train(run, &["--resume", "--set", "train.checkpoint-every=1"])
}

#[test]
fn a_kill_inside_a_checkpoint_write_resumes_from_the_newest_complete_one() {
    let d = tempfile::tempdir().unwrap();
    let whole = d.path().join("whole");
    expect_success(&train(&whole, &["--set", "train.checkpoint-every=1"]));
    let uninterrupted = std::fs::read(whole.join("projector.safetensors")).unwrap();
    // (stage, the step the resumed run must start from)
    for (stage, resumes_at) in [("files-written", 3), ("state-written", 3), ("renamed", 4)] {
        let run = d.path().join(stage);
        let out = killed_in_checkpoint_write(&run, stage);
        let stdout = expect_success(&out);
        assert!(
            stdout.contains(&format!(
                "trained to step 6 ({} step(s) now)",
                6 - resumes_at
            )),
            "{stage}: {stdout}"
        );
        assert_eq!(
            run_losses(&run).iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5, 6],
            "{stage}: the metrics hold every step once"
        );
        let resumed = std::fs::read(run.join("projector.safetensors")).unwrap();
        assert!(
            resumed == uninterrupted,
            "{stage}: the resumed projector differs from the uninterrupted run's"
        );
        assert_eq!(complete_checkpoints(&run), vec![4, 5, 6], "{stage}");
    }
}

#[test]
fn kill_minus_nine_leaves_a_loadable_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let mut child = spawn_train(&run, 50);
    wait_for_checkpoints(&run, 2);
    child.kill().unwrap();
    child.wait().unwrap();
    // A leftover partial write must be ignored too.
    std::fs::create_dir_all(run.join("checkpoints/.step-99999999.partial")).unwrap();
    let latest = *complete_checkpoints(&run).last().unwrap();
    let out = earshot_command()
        .args(["train".as_ref(), bundled().as_os_str()])
        .arg("--set")
        .arg(format!("train.run-dir=\"{}\"", run.display()))
        .arg("--set")
        .arg(format!("train.steps={}", latest + 1))
        .arg("--set")
        .arg("train.checkpoint-every=1")
        .arg("--resume")
        .output()
        .unwrap();
    let stdout = expect_success(&out);
    assert!(
        stdout.contains(&format!("trained to step {} (1 step(s) now)", latest + 1)),
        "{stdout}"
    );
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let child = spawn_train(&run, 50);
    wait_for_checkpoints(&run, 1);
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("interrupted: checkpoint saved at step"),
        "{stderr}"
    );
    assert!(run.join("projector.safetensors").is_file());
}

/// (step, grad_norm) of every logged step.
fn grad_norms(run_dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    // Same samples in the same order; every target has the same number of tokens, so the
    // mean over micro-batches equals the mean over the whole batch.
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    expect_success(&train(
        &a,
        &["--max-steps", "3", "--set", "train.batch-size=4"],
    ));
    expect_success(&train(
        &b,
        &[
            "--max-steps",
            "3",
            "--set",
            "train.batch-size=2",
            "--set",
            "train.accumulate=2",
        ],
    ));
    let (la, lb) = (run_losses(&a), run_losses(&b));
    assert_eq!(
        la.iter().map(|x| x.0).collect::<Vec<_>>(),
        lb.iter().map(|x| x.0).collect::<Vec<_>>(),
        "both runs log the same steps"
    );
    assert_eq!(la.len(), 3);
    for ((s, x), (_, y)) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-4, "step {s}: {x} vs {y}");
    }
    // Adam's update hardly changes if the gradient is scaled, so the loss alone would not
    // catch a missing 1/micro-batches factor: the gradient norm does.
    for ((s, x), (_, y)) in grad_norms(&a).iter().zip(&grad_norms(&b)) {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs().max(1e-6),
            "step {s}: gradient norm {x} vs {y}"
        );
    }
    let load = |run: &Path| {
        candle_core::safetensors::load(run.join("projector.safetensors"), &candle_core::Device::Cpu)
            .unwrap()
    };
    let (pa, pb) = (load(&a), load(&b));
    assert_eq!(pa.len(), pb.len());
    for (name, ta) in &pa {
        let (va, vb): (Vec<f32>, Vec<f32>) = (
            ta.flatten_all().unwrap().to_vec1().unwrap(),
            pb[name].flatten_all().unwrap().to_vec1().unwrap(),
        );
        let diff = max_abs_diff(&va, &vb);
        assert!(diff <= 1e-5, "{name}: projectors differ by {diff}");
    }
}

#[test]
fn every_kind_of_checkpoint_path_captions() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    // A validation split (the train split again) so that `best/` is written.
    expect_success(&train(
        &run,
        &[
            "--set",
            "train.steps=2",
            "--set",
            "train.checkpoint-every=1",
            "--set",
            "train.eval-every=1",
            "--set",
            "data.valid-split=\"train\"",
        ],
    ));
    let clip = repo_root().join("configs/data/tones/clips/one.wav");
    let caption = |ckpt: &Path| {
        let out = earshot([
            "caption".as_ref(),
            "--config".as_ref(),
            bundled().as_os_str(),
            "--checkpoint".as_ref(),
            ckpt.as_os_str(),
            "--max-tokens".as_ref(),
            "3".as_ref(),
            clip.as_os_str(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (expect_success(&out), stderr)
    };
    let (final_caption, _) = caption(&run.join("projector.safetensors"));
    for p in [
        run.clone(),
        run.join("best"),
        run.join("checkpoints"),
        run.join("checkpoints/step-00000002"),
    ] {
        let (got, stderr) = caption(&p);
        assert!(!stderr.contains("gibberish"), "{}: {stderr}", p.display());
        if p != run.join("best") {
            assert_eq!(got, final_caption, "{}", p.display());
        }
    }
    let err = expect_failure(&earshot([
        "caption".as_ref(),
        "--config".as_ref(),
        bundled().as_os_str(),
        "--checkpoint".as_ref(),
        d.path().as_os_str(),
        clip.as_os_str(),
    ]));
    assert!(err.contains("no step-N checkpoint folder"), "{err}");
}

#[test]
fn early_stopping_ends_the_run_and_names_the_best_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    // A learning rate so small that the eval loss cannot improve after the first eval.
    let out = train(
        &run,
        &[
            "--set",
            "train.steps=20",
            "--set",
            "train.lr=1e-30",
            "--set",
            "train.eval-every=1",
            "--set",
            "train.early-stop-patience=2",
            "--set",
            "data.valid-split=\"train\"",
        ],
    );
    let stdout = expect_success(&out);
    assert!(
        stdout.contains("stopped early: no better eval loss in 2 evaluation(s)")
            && stdout.contains("best checkpoint: step 1 ")
            && stdout.contains("trained to step 3 "),
        "{stdout}"
    );
    assert_eq!(run_losses(&run).len(), 3);
    assert!(run.join("best/step-00000001/state.json").is_file());
    assert!(run.join("checkpoints/step-00000003/state.json").is_file());
    // Early stopping without a validation split is refused up front.
    let err = expect_failure(&train(
        &d.path().join("other"),
        &["--set", "train.early-stop-patience=2"],
    ));
    assert!(
        err.contains("early-stop-patience needs a validation split"),
        "{err}"
    );
}

/// `[encoder] layers`: a run over two hidden states trains a mixing weight per state, says
/// the learned mix, captions with the same setting, and is refused (naming the encoder
/// layers) by a config that reads other states; a state the encoder lacks is a config error.
#[test]
fn mixed_encoder_layers_train_caption_and_refuse_other_layers() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let mixed = "encoder.layers=[2, 4]";
    let stdout = expect_success(&train(&run, &["--set", mixed, "--set", "train.steps=2"]));
    let mix_line = stdout
        .lines()
        .find(|l| l.starts_with("encoder hidden-state mix of the final projector: 2: "))
        .unwrap_or_else(|| panic!("no mix line in: {stdout}"));
    let weights: Vec<f64> = mix_line
        .split(": ")
        .skip(2)
        .map(|w| w.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(weights.len(), 2, "{mix_line}");
    assert!(
        (weights.iter().sum::<f64>() - 1.0).abs() < 2e-3,
        "{mix_line}"
    );
    let saved = candle_core::safetensors::load(
        run.join("projector.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(saved["layer_weights"].dims(), &[2]);

    let caption = |checkpoint: &Path, sets: &[&str]| {
        let sets: Vec<String> = sets
            .iter()
            .flat_map(|s| ["--set", s])
            .map(String::from)
            .collect();
        caption_one_wav(checkpoint, &sets)
    };
    expect_success(&caption(&run, &[mixed]));
    expect_success(&caption(&run.join("checkpoints"), &[mixed]));
    // The final projector file alone (no manifest beside it) and a checkpoint folder.
    let err = expect_failure(&caption(&run, &[]));
    assert!(
        err.contains("not this config's projector") && err.contains("[encoder] layers"),
        "{err}"
    );
    let err = expect_failure(&caption(
        &run.join("checkpoints"),
        &["encoder.layers=[1, 4]"],
    ));
    assert!(
        err.contains("[encoder] layers") && err.contains("refusing to caption"),
        "{err}"
    );
    let err = expect_failure(&train(
        &run,
        &[
            "--resume",
            "--set",
            "encoder.layers=\"all\"",
            "--set",
            "train.steps=3",
        ],
    ));
    assert!(
        err.contains("[encoder] layers") && err.contains("refusing to resume"),
        "{err}"
    );
    let err = expect_failure(&train(
        &d.path().join("bad"),
        &["--set", "encoder.layers=[1, 9]"],
    ));
    assert!(
        err.contains("9 is not a hidden state of this encoder"),
        "{err}"
    );
}

/// LoRA: a run interrupted and resumed writes the same bytes as an uninterrupted one
/// (adapters, their optimizer state and dropout masks included); the run leaves a PEFT
/// adapter folder; captioning needs the same [lora], and a checkpoint with other adapters
/// is refused by name.
#[test]
fn lora_resume_is_byte_identical_and_captioning_needs_the_same_adapters() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let lora = [
        "--set",
        "lora.rank=4",
        "--set",
        "lora.dropout=0.1",
        "--set",
        "lora.targets=[\"q_proj\", \"v_proj\", \"down_proj\"]",
        "--set",
        "lora.lr=0.001",
    ];
    let stdout = expect_success(&train(&a, &lora));
    assert!(stdout.contains("trained to step 6"), "{stdout}");
    let mut first: Vec<&str> = lora.to_vec();
    first.extend(["--max-steps", "3"]);
    expect_success(&train(&b, &first));
    let mut again: Vec<&str> = lora.to_vec();
    again.push("--resume");
    expect_success(&train(&b, &again));
    for file in ["projector.safetensors", "adapter/adapter_model.safetensors"] {
        let (x, y) = (
            std::fs::read(a.join(file)).unwrap(),
            std::fs::read(b.join(file)).unwrap(),
        );
        assert_eq!(
            x, y,
            "{file}: the resumed run differs from the uninterrupted one"
        );
    }
    // PEFT's layout: its config and tensor names.
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(a.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 32.0);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["down_proj", "q_proj", "v_proj"])
    );
    let adapter = candle_core::safetensors::load(
        a.join("adapter/adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    // SmolLM2-135M: 30 layers, 3 targets, A and B.
    assert_eq!(adapter.len(), 30 * 3 * 2);
    let b_down = &adapter["base_model.model.model.layers.29.mlp.down_proj.lora_B.weight"];
    assert_eq!(b_down.dims(), &[576, 4]);
    let trained: f32 = b_down
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(trained > 0.0, "B moved away from zero");
    // Every step trained the adapters as well: the update ratios name them.
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.contains("layers.0.self_attn.q_proj.lora_A.weight"),
        "{}",
        &metrics[..metrics.len().min(2000)]
    );

    let caption = |checkpoint: &Path, args: &[&str]| {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        caption_one_wav(checkpoint, &args)
    };
    // One clip: the caption alone on stdout.
    let captions = |out: &std::process::Output| expect_success(out);
    let own = captions(&caption(&a, &lora));
    assert!(!own.trim().is_empty());
    expect_success(&caption(&b.join("checkpoints"), &lora));
    // The PEFT folder the run wrote, put on the LLM with --adapter, captions the same.
    let adapter_dir = a.join("adapter");
    let mut with_adapter: Vec<&str> = lora.to_vec();
    with_adapter.extend(["--adapter", adapter_dir.to_str().unwrap()]);
    assert_eq!(captions(&caption(&a, &with_adapter)), own);
    // Folded into the weights (--merge): the same caption.
    let mut merged: Vec<&str> = lora.to_vec();
    merged.push("--merge");
    assert_eq!(captions(&caption(&a, &merged)), own);
    // A missing adapter folder is an error naming its config file.
    let mut missing: Vec<&str> = lora.to_vec();
    missing.extend(["--adapter", "/nonexistent-adapter"]);
    let err = expect_failure(&caption(&a, &missing));
    assert!(
        err.contains("/nonexistent-adapter/adapter_config.json"),
        "{err}"
    );
    let err = expect_failure(&caption(&a, &[]));
    assert!(
        err.contains("LoRA tensor") && err.contains("[lora]"),
        "{err}"
    );
    let err = expect_failure(&caption(&a.join("checkpoints"), &["--set", "lora.rank=8"]));
    assert!(
        err.contains("LoRA adapters ([lora])") && err.contains("refusing to caption"),
        "{err}"
    );
}

/// `earshot caption` of the bundled config on tones clip one.wav (3 tokens) with
/// `checkpoint` and the extra arguments.
fn caption_one_wav(checkpoint: &Path, extra: &[String]) -> std::process::Output {
    let clip = repo_root().join("configs/data/tones/clips/one.wav");
    let mut args: Vec<std::ffi::OsString> = vec![
        "caption".into(),
        "--config".into(),
        bundled().into(),
        "--checkpoint".into(),
        checkpoint.into(),
        "--max-tokens".into(),
        "3".into(),
    ];
    args.extend(extra.iter().map(std::ffi::OsString::from));
    args.push(clip.into());
    earshot(args)
}
