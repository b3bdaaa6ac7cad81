//! Run-config errors name the key and the line; --set overrides; the bundled CPU config
//! loads and trains.

use earshot_tests::*;

fn bundled() -> std::path::PathBuf {
    repo_root().join("configs/cpu-smollm2-tones.toml")
}

fn train_err(config: &std::path::Path, extra: &[&str]) -> String {
    let mut args: Vec<std::ffi::OsString> = vec!["train".into(), config.into()];
    args.extend(extra.iter().map(|s| s.into()));
    expect_failure(&earshot(args))
}

#[test]
fn unknown_key_and_wrong_type_name_key_and_line() {
    let d = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(bundled()).unwrap();
    let base = bundled().parent().unwrap().display().to_string();
    // Keep relative paths valid by rewriting them against the original folder.
    let text = text
        .replace("\"../", &format!("\"{base}/../"))
        .replace("\"data/", &format!("\"{base}/data/"));
    let bad_key = d.path().join("bad_key.toml");
    std::fs::write(
        &bad_key,
        text.replace("lr = 5e-3", "lr = 5e-3\nlearning-rate = 1"),
    )
    .unwrap();
    let err = train_err(&bad_key, &[]);
    assert!(
        err.contains("unknown field `learning-rate`") && err.contains("line"),
        "{err}"
    );
    let bad_type = d.path().join("bad_type.toml");
    std::fs::write(
        &bad_type,
        text.replace("batch-size = 4", "batch-size = \"four\""),
    )
    .unwrap();
    let err = train_err(&bad_type, &[]);
    assert!(err.contains("batch-size") && err.contains("line"), "{err}");
    let missing = d.path().join("missing.toml");
    std::fs::write(&missing, text.replace("jsonl.wasm", "nope.wasm")).unwrap();
    let err = train_err(&missing, &[]);
    assert!(
        err.contains("data.adapter") && err.contains("nope.wasm") && err.contains("no such file"),
        "{err}"
    );
    let err = train_err(&bundled(), &["--set", "train.lr=-1"]);
    assert!(err.contains("train.lr must be a positive number"), "{err}");
    // Numbers refused before anything loads: NaN passes every comparison, so each is
    // checked to be finite; the projector's shape is checked against the encoder's frames.
    for (set, expected) in [
        ("train.steps=0", "train.steps must be at least 1"),
        (
            "train.weight-decay=nan",
            "train.weight-decay must be a number >= 0",
        ),
        (
            "train.grad-clip=-1",
            "train.grad-clip must be a number >= 0",
        ),
        ("train.eps=0", "train.eps must be a positive number"),
        (
            "train.min-lr=1",
            "train.min-lr must be a number >= 0 and at most train.lr",
        ),
        (
            "projector.positions=0",
            "projector.positions = 0 must be in 1..=1500",
        ),
        (
            "projector.positions=1501",
            "projector.positions = 1501 must be in 1..=1500",
        ),
        (
            "projector.hidden=100000000",
            "projector.hidden = 100000000 must be in 1..=",
        ),
    ] {
        let err = train_err(&bundled(), &["--set", set]);
        assert!(err.contains(expected), "{set}: {err}");
        assert!(
            !err.contains("encoding"),
            "{set}: refused before encoding: {err}"
        );
    }
    let err = expect_exit(
        &earshot([
            "train".as_ref(),
            bundled().as_os_str(),
            "--max-steps".as_ref(),
            "0".as_ref(),
        ]),
        2,
    );
    assert!(err.contains("--max-steps"), "{err}");
    let err = train_err(&d.path().join("absent.toml"), &[]);
    assert!(
        err.contains("absent.toml") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn bundled_config_trains_with_overrides() {
    let d = tempfile::tempdir().unwrap();
    let run_dir = d.path().join("run");
    let out = earshot([
        "train".as_ref(),
        bundled().as_os_str(),
        "--max-steps".as_ref(),
        "2".as_ref(),
        "--set".as_ref(),
        format!("train.run-dir=\"{}\"", run_dir.display()).as_ref(),
        "--set".as_ref(),
        "projector.kind=\"mlp\"".as_ref(),
    ]);
    let s = expect_success(&out);
    assert!(s.contains("trained to step 2"), "{s}");
    assert!(run_dir.join("projector.safetensors").is_file());
    assert_eq!(
        std::fs::read_to_string(run_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );

    // An earlier run is never replaced silently.
    let again = |extra: &[&str]| {
        let mut args: Vec<String> = vec![
            "train".into(),
            bundled().display().to_string(),
            "--max-steps".into(),
            "2".into(),
            "--set".into(),
            format!("train.run-dir=\"{}\"", run_dir.display()),
            "--set".into(),
            // The deprecated key: read as valid-split and test-split both, with a warning.
            "data.eval-split=\"train\"".into(),
            "--set".into(),
            "train.eval-every=1".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        earshot(args)
    };
    let err = expect_failure(&again(&[]));
    assert!(
        err.contains("already holds a run") && err.contains("--overwrite"),
        "{err}"
    );
    // Eval loss every step on the validation split, and the best checkpoint kept.
    let out = again(&["--overwrite"]);
    expect_success(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("data.eval-split is deprecated")
            && stderr.contains("read as data.valid-split and data.test-split both"),
        "{stderr}"
    );
    let evals: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(evals.len(), 2);
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("best.json")).unwrap()).unwrap();
    let min = evals
        .iter()
        .map(|v| v["eval_loss"].as_f64().unwrap())
        .fold(f64::INFINITY, f64::min);
    assert_eq!(best["eval_loss"].as_f64().unwrap(), min);
    let step = best["step"].as_u64().unwrap();
    assert!(run_dir
        .join(format!("best/step-{step:08}/projector.safetensors"))
        .is_file());
}
