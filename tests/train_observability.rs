//! What a user watches while training and afterwards: the progress bar on a terminal, plain
//! log lines otherwise, metrics with epochs, eval lines, loss / update-ratio PNGs refreshed
//! at each eval, the run's config.toml, and `earshot compare` over two runs of a sweep.

use std::path::{Path, PathBuf};

use earshot_tests::*;

fn bundled() -> PathBuf {
    repo_root().join("configs/cpu-smollm2-tones.toml")
}

fn train_args(run_dir: &Path, lr: &str) -> Vec<String> {
    [
        "train",
        &bundled().display().to_string(),
        "--overwrite",
        "--set",
        &format!("train.run-dir=\"{}\"", run_dir.display()),
        "--set",
        "train.steps=4",
        "--set",
        &format!("train.lr={lr}"),
        "--set",
        "train.log-every=2",
        "--set",
        "data.valid-split=\"train\"",
        "--set",
        "train.eval-every=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Width and height from a PNG's IHDR chunk, or None if the file is not a PNG.
fn png_size(path: &Path) -> Option<(u32, u32)> {
    let b = std::fs::read(path).ok()?;
    if b.len() < 24 || &b[..8] != b"\x89PNG\r\n\x1a\n" || &b[12..16] != b"IHDR" {
        return None;
    }
    let be = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    Some((be(16), be(20)))
}

#[test]
fn progress_metrics_plots_and_compare() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("lr-a"), d.path().join("lr-b"));

    // Off a terminal: plain lines every log-every steps, eval lines, no bar.
    let out = earshot(train_args(&a, "5e-3"));
    expect_success(&out);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    for want in ["step     2/4  epoch 1.00", "step     4/4  epoch 2.00"] {
        assert!(err.contains(want), "{want:?} in {err}");
    }
    assert!(err.contains("step 2: eval loss"), "{err}");
    assert!(err.contains("(best so far)"), "{err}");
    assert!(
        !err.contains("ETA"),
        "no progress bar off a terminal: {err}"
    );

    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let epochs: Vec<f64> = metrics
        .iter()
        .map(|m| m["epoch"].as_f64().unwrap())
        .collect();
    assert_eq!(epochs, vec![0.5, 1.0, 1.5, 2.0]);
    for m in &metrics {
        for (name, r) in m["update_ratio_log10"].as_object().unwrap() {
            let r = r.as_f64().unwrap();
            assert!(
                (-12.0..=0.5).contains(&r),
                "{name}: log10 update ratio {r} (a zero-initialised tensor must not explode)"
            );
        }
    }
    for png in ["loss.png", "update_ratios.png"] {
        assert_eq!(png_size(&a.join(png)), Some((1000, 600)), "{png}");
    }
    let config = std::fs::read_to_string(a.join("config.toml")).unwrap();
    assert!(config.contains("lr = 0.005"), "{config}");

    // On a terminal: the progress bar with its ETA.
    let script = std::process::Command::new("script")
        .arg("--version")
        .output()
        .expect("the progress-bar test needs `script` (util-linux) for a pseudo-terminal");
    assert!(script.status.success());
    let cmd = std::iter::once(earshot_bin().display().to_string())
        .chain(train_args(&b, "1e-3").into_iter().map(|a| format!("'{a}'")))
        .collect::<Vec<_>>()
        .join(" ");
    let tty = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&tty.stdout).to_string();
    assert!(tty.status.success(), "{screen}");
    assert!(screen.contains("ETA"), "a progress bar: {screen:?}");
    assert!(screen.contains("step 4/4"), "{screen:?}");
    assert!(screen.contains("trained to step 4"), "{screen:?}");

    // The sweep compared: a table naming the differing setting, and one PNG.
    let png = d.path().join("sweep.png");
    let out = earshot([
        "compare".as_ref(),
        a.as_os_str(),
        b.as_os_str(),
        "--out".as_ref(),
        png.as_os_str(),
    ]);
    let table = expect_success(&out);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 3, "{table}");
    assert!(rows[0].contains("best eval (step)"), "{table}");
    let last_eval = |dir: &Path| {
        let text = std::fs::read_to_string(dir.join("eval.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        format!("{:.4}", v["eval_loss"].as_f64().unwrap())
    };
    assert!(
        rows[1].starts_with("lr-a") && rows[1].contains("train.lr=0.005"),
        "{table}"
    );
    assert!(
        rows[2].starts_with("lr-b") && rows[2].contains("train.lr=0.001"),
        "{table}"
    );
    assert!(rows[1].contains(&last_eval(&a)), "{table}");
    assert!(rows[2].contains(&last_eval(&b)), "{table}");
    assert!(
        !rows[1].contains("log-every"),
        "only differing settings: {table}"
    );
    assert_eq!(png_size(&png), Some((1000, 600)));

    // Not a run folder: a clear error.
    let out = earshot(["compare".as_ref(), a.as_os_str(), d.path().as_os_str()]);
    let err = expect_failure(&out);
    assert!(err.contains("not a run folder"), "{err}");
}

/// A learning rate that blows the projector up: non-finite steps are skipped and logged, and
/// after `train.max-nonfinite-steps` in a row the run stops, naming the first layer whose
/// output is not finite.
#[test]
fn non_finite_steps_are_skipped_then_the_run_stops_naming_the_layer() {
    let d = tempfile::tempdir().unwrap();
    let mut args = train_args(&d.path().join("run"), "1e38");
    args.extend(["--set".into(), "train.steps=12".into()]);
    args.extend(["--set".into(), "train.max-nonfinite-steps=3".into()]);
    let out = earshot(args);
    let err = expect_failure(&out);
    assert!(
        err.contains("non-finite loss or gradient; step skipped"),
        "{err}"
    );
    assert!(
        err.contains("3 steps in a row with non-finite loss or gradients; stopping"),
        "{err}"
    );
    assert!(err.contains("llm.layers.0"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn redirected_runs_print_progress_lines_for_every_long_phase() {
    let d = tempfile::tempdir().unwrap();
    let config = repo_root().join("configs/cpu-smollm2-tones.toml");
    // stderr is a pipe here, as with `2> log`, CI or nohup; a short interval so that even 8
    // clips give lines. A fresh EARSHOT_HOME, so the clips really go through the encoder.
    let home = fresh_home(d.path());
    let out = earshot_command()
        .env("EARSHOT_HOME", &home)
        .args(["--progress-interval", "0", "train"])
        .arg(&config)
        .arg("--set")
        .arg(format!(
            "train.run-dir=\"{}\"",
            d.path().join("run").display()
        ))
        .args([
            "--set",
            "train.steps=1",
            "--set",
            "data.valid-split=\"train\"",
            // A warmup longer than the run is said before it starts.
            "--set",
            "train.schedule=\"warmup-cosine\"",
            "--set",
            "train.warmup-steps=5",
        ])
        .output()
        .unwrap();
    expect_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    for want in [
        "train.warmup-steps = 5 is more than train.steps = 1",
        "encoding train: 1/8 clip(s)",
        "encoding train: 8/8 clip(s)",
        "evaluating: 8/8 clip(s)",
        "encoder: 8 clip(s) encoded, 8 from the cache",
    ] {
        assert!(err.contains(want), "{want:?} not in: {err}");
    }
    // Lines come with a rate, and time left while the phase runs.
    let line = err
        .lines()
        .find(|l| l.contains("encoding train: 4/8"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains("/s, about "), "{line}");
    // The default interval (10 s) keeps a fast phase to its final line.
    let out = earshot_command()
        .env("EARSHOT_HOME", &home)
        .args(["train"])
        .arg(&config)
        .arg("--set")
        .arg(format!(
            "train.run-dir=\"{}\"",
            d.path().join("run2").display()
        ))
        .args(["--set", "train.steps=1"])
        .output()
        .unwrap();
    expect_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("encoding train:").count(), 1, "{err}");
    // Captioning a split.
    let out = earshot_command()
        .env("EARSHOT_HOME", &home)
        .args(["--progress-interval", "0", "caption", "--config"])
        .arg(&config)
        .args(["--split", "train", "--max-tokens", "1", "--batch-size", "4"])
        .output()
        .unwrap();
    expect_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("captioning train: 4 clip(s)") && err.contains("captioning train: 8 clip(s)"),
        "{err}"
    );
}

/// `RUST_LOG=earshot=debug` shows where a run spends its time: each stage's span is logged as
/// it closes, with its time, in training (encode, mel, encoder forward, plugin calls, train
/// step, checkpoint) and captioning (prefill, decode loop, post-process); without colour
/// codes when stderr is not a terminal.
#[test]
fn debug_logging_times_every_stage() {
    let d = tempfile::tempdir().unwrap();
    // A fresh home: nothing cached, so the mel and the encoder run.
    let home = fresh_home(d.path());
    let run_dir = d.path().join("run");
    let out = earshot_command()
        .env("EARSHOT_HOME", &home)
        .env("RUST_LOG", "earshot=debug")
        .args([
            "train",
            &bundled().display().to_string(),
            "--set",
            &format!("train.run-dir=\"{}\"", run_dir.display()),
            "--set",
            "train.steps=1",
        ])
        .output()
        .unwrap();
    let train_log = expect_exit(&out, 0);
    let out = earshot_command()
        .env("EARSHOT_HOME", &home)
        .env("RUST_LOG", "earshot=debug")
        .args([
            "caption",
            "--config",
            &bundled().display().to_string(),
            "--checkpoint",
            &run_dir.display().to_string(),
            "--max-tokens",
            "3",
        ])
        .arg(repo_root().join("configs/data/tones/clips/one.wav"))
        .output()
        .unwrap();
    let caption_log = expect_exit(&out, 0);
    let closed = |log: &str, span: &str| {
        log.lines()
            .any(|l| l.contains(span) && l.contains("close time.busy="))
    };
    for span in [
        "encode{",
        "mel{",
        "encoder forward{",
        "plugin call{call=\"render\"}",
        "plugin call{call=\"read\"",
        "train step{step=1}",
        "checkpoint{step=1}",
    ] {
        assert!(
            closed(&train_log, span),
            "train: no closed {span}: {train_log}"
        );
    }
    for span in [
        "project{",
        "prefill prefix{",
        "decode loop{",
        "post-process",
    ] {
        assert!(
            closed(&caption_log, span),
            "caption: no closed {span}: {caption_log}"
        );
    }
    assert!(
        !caption_log.contains('\u{1b}'),
        "colour codes in a log file"
    );
}
