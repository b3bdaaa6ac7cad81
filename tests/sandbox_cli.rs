//! Hostile datasets, plugins and inputs through the CLI on the real default models: every
//! one ends in a clear error (or a skipped example) within bounded time and memory, never a
//! hang, a panic, or a file read from outside the dataset root.

use std::path::{Path, PathBuf};
use std::process::Output;

use earshot_tests::*;

/// A 16 kHz mono 16-bit tone of `seconds`.
fn tone(path: &Path, seconds: f64, freq: f64) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for t in 0..(seconds * 16000.0) as u32 {
        let v = 8000.0 * (2.0 * std::f64::consts::PI * freq * t as f64 / 16000.0).sin();
        w.write_sample(v as i16).unwrap();
    }
    w.finalize().unwrap();
}

/// An 8 kHz mono 8-bit WAV of `seconds` (one byte a sample: long audio in a small file).
fn long_wav(path: &Path, seconds: u32) {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 8000,
        bits_per_sample: 8,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for t in 0..seconds * 8000 {
        w.write_sample(((t % 64) as i8) - 32).unwrap();
    }
    w.finalize().unwrap();
}

/// A WAV whose header claims a sample rate of 0 Hz (symphonia panics on it).
fn zero_hz_wav(path: &Path) {
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36u32 + 200).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes()); // PCM
    b.extend_from_slice(&1u16.to_le_bytes()); // mono
    b.extend_from_slice(&0u32.to_le_bytes()); // 0 Hz
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&200u32.to_le_bytes());
    b.extend_from_slice(&[0u8; 200]);
    std::fs::write(path, b).unwrap();
}

/// A one-step run config on the dataset at `root`.
fn config(dir: &Path, root: &Path) -> PathBuf {
    write_run_config(dir, root, "steps = 1\nbatch-size = 2\nrun-dir = \"run\"")
}

/// Runs earshot and returns its output with its peak resident memory in MiB (from wait4).
fn run_measured(args: &[impl AsRef<std::ffi::OsStr>]) -> (Output, f64) {
    use std::os::unix::process::ExitStatusExt;
    let child = earshot_command()
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    // A hang is a failure: the child is killed after 5 minutes (and fails the assertions).
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(300));
        // SAFETY: signalling our own child; if it already exited and was reaped this is a
        // no-op or ESRCH.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    // Read the pipes on threads so a chatty child cannot block on a full pipe.
    let mut child = child;
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut so, &mut v).unwrap();
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut se, &mut v).unwrap();
        v
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    std::mem::forget(child);
    let out = Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    };
    (out, usage.ru_maxrss as f64 / 1024.0)
}

/// `caption --config CFG` followed by `rest`.
fn caption_args(cfg: &Path, rest: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec!["caption".into(), "--config".into(), cfg.into()];
    args.extend(rest.iter().map(|a| a.as_ref().to_os_string()));
    args
}

fn jsonl_dataset(root: &Path, rows: &[(&str, &str)]) {
    let lines: String = rows
        .iter()
        .map(|(id, audio)| {
            format!("{{\"id\": \"{id}\", \"audio\": \"{audio}\", \"text\": \"A tone.\"}}\n")
        })
        .collect();
    std::fs::write(root.join("train.jsonl"), lines).unwrap();
}

#[test]
fn example_audio_cannot_leave_the_dataset_root_through_symlinks() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir_all(root.join("clips")).unwrap();
    tone(&root.join("clips/real.wav"), 1.0, 440.0);
    tone(&d.path().join("secret.wav"), 1.0, 660.0);
    std::os::unix::fs::symlink("clips/real.wav", root.join("inside.wav")).unwrap();
    std::os::unix::fs::symlink("../secret.wav", root.join("escape.wav")).unwrap();
    std::os::unix::fs::symlink("..", root.join("link")).unwrap();
    // An adapter that hands the host these paths as they are (the first-party jsonl adapter
    // already skips them itself, inside its own sandboxed view of the root).
    let split = "real=clips/real.wav;inside=inside.wav;escape=escape.wav;via-link=link/secret.wav";
    let cfg = config(d.path(), &root);
    let sets = [
        format!("data.adapter=\"{}\"", hostile("unchecked-paths").display()),
        format!("data.options=\"{split}\""),
        format!("data.train-split=\"{split}\""),
    ];
    let out = earshot(caption_args(
        &cfg,
        &[
            &"--set",
            &sets[0],
            &"--set",
            &sets[1],
            &"--split",
            &split,
            &"--max-tokens",
            &"2",
        ],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_PARTIAL), "{err}");
    assert!(err.contains("2 of 4 input(s) failed"), "{err}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_id = |id: &str| lines.iter().find(|v| v["id"] == id).unwrap().clone();
    for id in ["real", "inside"] {
        assert!(by_id(id)["caption"].is_string(), "{}", by_id(id));
    }
    for id in ["escape", "via-link"] {
        let e = by_id(id)["error"].as_str().unwrap().to_string();
        assert!(
            e.contains("refused") && e.contains("beneath the dataset root"),
            "{id}: {e}"
        );
    }
    // Training skips them with a warning naming each, and trains on the rest.
    let out = earshot([
        "train".as_ref(),
        cfg.as_os_str(),
        "--set".as_ref(),
        sets[0].as_ref(),
        "--set".as_ref(),
        sets[1].as_ref(),
        "--set".as_ref(),
        sets[2].as_ref(),
    ]);
    let stdout = expect_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("trained to step 1"), "{stdout}");
    for id in ["escape", "via-link"] {
        assert!(
            err.contains(&format!("example {id}")) && err.contains("refused"),
            "{err}"
        );
    }
}

#[test]
fn a_decoder_panic_is_an_error_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("zero-hz.wav");
    zero_hz_wav(&bad);
    for args in [
        vec!["audio-info".into(), bad.clone().into_os_string()],
        vec![
            "mel".into(),
            bad.clone().into_os_string(),
            "--out".into(),
            d.path().join("m.npy").into_os_string(),
        ],
        vec![
            "encode".into(),
            bad.clone().into_os_string(),
            "--whisper".into(),
            default_whisper().into_os_string(),
            "--out".into(),
            d.path().join("e.npy").into_os_string(),
        ],
    ] {
        let out = earshot(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(
            err.contains("zero-hz.wav") && err.contains("0 Hz"),
            "{args:?}: {err}"
        );
    }
    // In a dataset: that example fails, the others are still captioned.
    let root = d.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(&bad, root.join("bad.wav")).unwrap();
    tone(&root.join("good.wav"), 1.0, 440.0);
    jsonl_dataset(&root, &[("bad", "bad.wav"), ("good", "good.wav")]);
    let cfg = config(d.path(), &root);
    let out = earshot(caption_args(
        &cfg,
        &[&"--split", &"train", &"--max-tokens", &"2"],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_PARTIAL), "{err}");
    assert!(
        err.contains("1 of 2 input(s) failed") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn limits_that_make_no_sense_are_refused_clearly() {
    let chatml = plugin_dir("plugins").join("chatml.wasm");
    for t in ["1e30", "inf", "NaN", "0"] {
        let err = expect_failure(&earshot([
            "plugin".as_ref(),
            "check".as_ref(),
            chatml.as_os_str(),
            "--plugin-timeout-s".as_ref(),
            t.as_ref(),
        ]));
        assert!(
            err.contains("--plugin-timeout-s") && !err.contains("panicked"),
            "{t}: {err}"
        );
    }
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    tone(&root.join("a.wav"), 1.0, 440.0);
    jsonl_dataset(&root, &[("a", "a.wav")]);
    let cfg = config(d.path(), &root);
    for (set, key) in [
        ("plugins.sandbox.call-timeout-s=inf", "call-timeout-s"),
        ("plugins.sandbox.memory-mib=0", "memory-mib"),
        ("data.max-audio-s=-1", "max-audio-s"),
    ] {
        let err = expect_failure(&earshot(caption_args(
            &cfg,
            &[&"--set", &set, &root.join("a.wav")],
        )));
        assert!(
            err.contains(key) && !err.contains("panicked"),
            "{set}: {err}"
        );
    }
    let started = std::time::Instant::now();
    let err = expect_failure(&earshot([
        "mel".as_ref(),
        root.join("a.wav").as_os_str(),
        "--window-hop".as_ref(),
        "1e-9".as_ref(),
        "--out".as_ref(),
        d.path().join("m.npy").as_os_str(),
    ]));
    assert!(
        err.contains("window hop must be between 1 and 30 s"),
        "{err}"
    );
    assert!(started.elapsed().as_secs_f64() < 10.0);
}

#[test]
fn decoded_audio_is_bounded() {
    let d = tempfile::tempdir().unwrap();
    // An hour in a 29 MB file: audio-info reports it without holding it in memory.
    let hour = d.path().join("hour.wav");
    long_wav(&hour, 3600);
    let (out, peak_mib) =
        run_measured(&["audio-info".as_ref(), "--json".as_ref(), hour.as_os_str()]);
    let v: serde_json::Value = serde_json::from_str(&expect_success(&out)).unwrap();
    assert_eq!(v["samples_16k"], 3600 * 16000);
    assert!(
        (v["decoded_duration_s"].as_f64().unwrap() - 3600.0).abs() < 1e-6,
        "{v}"
    );
    // Decoding it whole would hold 115 MB of samples and 230 MB resampled.
    assert!(peak_mib < 100.0, "audio-info peaked at {peak_mib:.0} MiB");

    // Captioning refuses audio past data.max-audio-s (default 10 minutes), naming the file.
    let root = d.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    long_wav(&root.join("long.wav"), 660);
    jsonl_dataset(&root, &[("long", "long.wav")]);
    let cfg = config(d.path(), &root);
    let out = earshot(caption_args(&cfg, &[&root.join("long.wav")]));
    let err = expect_failure(&out);
    assert!(
        err.contains("long.wav") && err.contains("longer than the limit of 600 s"),
        "{err}"
    );
    let out = earshot(caption_args(
        &cfg,
        &[&"--set", &"data.max-audio-s=30", &"--split", &"train"],
    ));
    let err = expect_failure(&out);
    assert!(err.contains("longer than the limit of 30 s"), "{err}");
}

#[test]
fn a_huge_prompt_is_refused_before_tokenizing() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    tone(&root.join("a.wav"), 1.0, 440.0);
    jsonl_dataset(&root, &[("a", "a.wav")]);
    let cfg = config(d.path(), &root);
    let huge = hostile("huge-prompt");
    let set = format!("plugins.prompt-template=\"{}\"", huge.display());
    let started = std::time::Instant::now();
    let (out, peak_mib) = run_measured(&caption_args(&cfg, &[&"--set", &set, &root.join("a.wav")]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot fit the model's context"), "{err}");
    // Tokenizing 50 MB took the host past 3 GB; the models themselves take ~1 GB.
    assert!(peak_mib < 1800.0, "peaked at {peak_mib:.0} MiB");
    assert!(started.elapsed().as_secs_f64() < 120.0);
}

#[test]
fn an_endless_split_is_captioned_in_bounded_memory_up_to_the_cap() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let cfg = config(d.path(), &root);
    let adapter = format!("data.adapter=\"{}\"", hostile("endless-split").display());
    let (out, peak_mib) = run_measured(&caption_args(
        &cfg,
        &[
            &"--set",
            &adapter,
            &"--set",
            &"plugins.sandbox.max-examples=16",
            &"--split",
            &"train",
            &"--max-tokens",
            &"1",
        ],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("hostile-endless-split") && err.contains("past 16 examples"),
        "{err}"
    );
    // Captions were streamed out before the cap was hit.
    let captioned = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(captioned, 16, "{err}");
    assert!(peak_mib < 1800.0, "peaked at {peak_mib:.0} MiB");
}

/// The adapter's three pages of four examples, the second holding one with 2,000 metadata
/// entries: every command that reads the split uses the eleven good ones and names the bad
/// one alone (before, the error ended the split at the second page).
fn oversized_example_config(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let cfg = config(dir, &root);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let jsonl = format!("{}", plugin_dir("plugins").join("jsonl.wasm").display());
    assert!(text.contains(&jsonl));
    let text = text.replace(&jsonl, &hostile("oversized-example").display().to_string());
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn stdout_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The one error line names the example, the plugin and the bound; the good ids are all there.
fn assert_one_bad_among_good(lines: &[serde_json::Value], err: &str) {
    let bad: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("error").is_some()).collect();
    assert_eq!(bad.len(), 1, "{lines:?}\n{err}");
    assert_eq!(bad[0]["id"], "huge-metadata", "{err}");
    let msg = bad[0]["error"].as_str().unwrap();
    assert!(
        msg.contains("hostile-oversized-example") && msg.contains("2000 metadata entries"),
        "{msg}"
    );
    let good: Vec<&str> = lines
        .iter()
        .filter(|l| l.get("error").is_none())
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..12)
        .filter(|&k| k != 5)
        .map(|k| format!("good-{k}"))
        .collect();
    assert_eq!(good, want, "{err}");
}

#[test]
fn one_oversized_example_fails_alone_in_caption_and_dataset_list() {
    let d = tempfile::tempdir().unwrap();
    let cfg = oversized_example_config(d.path());
    let out = earshot_with_timeout(
        &caption_args(&cfg, &[&"--split", &"train", &"--max-tokens", &"1"]),
        300,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_one_bad_among_good(&stdout_lines(&out), &err);
    assert!(err.contains("1 of 12 input(s) failed"), "{err}");

    let root = d.path().join("root");
    let adapter = hostile("oversized-example");
    let out = earshot_with_timeout(
        &[
            "dataset".as_ref(),
            "list".as_ref(),
            "--adapter".as_ref(),
            adapter.as_os_str(),
            "--root".as_ref(),
            root.as_os_str(),
            "--batch".as_ref(),
            "4".as_ref(),
        ],
        120,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let lines = stdout_lines(&out);
    assert_one_bad_among_good(&lines, &err);
    assert!(lines.iter().all(|l| l["split"] == "train"), "{lines:?}");
    assert!(
        err.contains("1 of 12 example(s) break a per-example bound"),
        "{err}"
    );
}

#[test]
fn one_oversized_example_is_skipped_in_training_and_eval_or_refused() {
    let d = tempfile::tempdir().unwrap();
    let cfg = oversized_example_config(d.path());
    let out = earshot_with_timeout(&["train".as_ref(), cfg.as_os_str()], 300);
    expect_success(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("training the projector on 11 example(s)")
            && err.contains("(1 skipped: 1 over a plugin bound"),
        "{err}"
    );
    assert!(
        err.contains("huge-metadata") && err.contains("skipped"),
        "{err}"
    );

    // eval on the same split: the eleven are scored, the one is a failure, exit 3.
    let out = earshot_with_timeout(
        &[
            "eval".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
            "--split".as_ref(),
            "train".as_ref(),
            "--max-tokens".as_ref(),
            "1".as_ref(),
            "--no-listening-check".as_ref(),
            "--no-report".as_ref(),
            "--json".as_ref(),
        ],
        300,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["examples"].as_u64(), v["failed"].as_u64()),
        (Some(11), Some(1)),
        "{err}"
    );
    assert!(
        err.contains("huge-metadata") && err.contains("2000 metadata entries"),
        "{err}"
    );

    let out = earshot_with_timeout(
        &[
            "train".as_ref(),
            cfg.as_os_str(),
            "--overwrite".as_ref(),
            "--set".as_ref(),
            "data.bad-examples=\"refuse\"".as_ref(),
        ],
        300,
    );
    let err = expect_failure(&out);
    assert!(
        err.contains("huge-metadata")
            && err.contains("2000 metadata entries")
            && err.contains("data.bad-examples"),
        "{err}"
    );
}
