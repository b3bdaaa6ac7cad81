//! Several tasks in one model (`[[task]]`): the run trains on both tasks' examples, records
//! each task's validation loss, `earshot eval` gives each task its own section and files,
//! `earshot caption --task` answers with that task's prompt, and a resume with other tasks
//! or weights is refused. The mechanics run on the tones fixture (two tasks over the same
//! clips with different prompts and targets); what multi-task training learns on real data
//! is a benchmark's business (`configs/cpu-smollm2-multitask.toml`), not this test's.

use std::path::{Path, PathBuf};

use earshot_tests::*;

const NAMES: [&str; 8] = [
    "one", "two", "three", "four", "five", "six", "seven", "eight",
];

/// A jsonl dataset over the tones clips: `train.jsonl` and `test.jsonl` (the last two
/// clips), targets from `target(name)`.
fn dataset(dir: &Path, target: impl Fn(&str) -> String) -> PathBuf {
    let clips = repo_root().join("configs/data/tones/clips");
    std::fs::create_dir_all(dir.join("clips")).unwrap();
    let mut train = String::new();
    let mut test = String::new();
    for (i, name) in NAMES.iter().enumerate() {
        std::fs::copy(
            clips.join(format!("{name}.wav")),
            dir.join(format!("clips/{name}.wav")),
        )
        .unwrap();
        let line = serde_json::json!({
            "id": name, "audio": format!("clips/{name}.wav"), "text": target(name), "number": name
        });
        let split = if i < 6 { &mut train } else { &mut test };
        split.push_str(&format!("{line}\n"));
    }
    std::fs::write(dir.join("train.jsonl"), train).unwrap();
    std::fs::write(dir.join("test.jsonl"), test).unwrap();
    dir.to_path_buf()
}

/// The multi-task config in `dir`: its own task `tones` and the task `parity` of
/// `parity.toml`; `tasks` replaces the [[task]] entries when given.
fn configs(dir: &Path, tasks: Option<&str>) -> PathBuf {
    let head = |root: &Path, instruction: &str| {
        run_config_head(
            root,
            &format!("prompt-options = '{{\"instruction\": \"{instruction}\"}}'"),
            "train-split = \"train\"\nvalid-split = \"test\"\ntest-split = \"test\"",
        )
    };
    let tones = dataset(&dir.join("tones"), |n| format!("Tone number {n}."));
    let parity = dataset(&dir.join("parity"), |n| {
        let odd = ["one", "three", "five", "seven"].contains(&n);
        format!("It is {}.", if odd { "odd" } else { "even" })
    });
    std::fs::write(
        dir.join("parity.toml"),
        head(&parity, "Is the number odd or even?")
            + "\n[projector]\npositions = 16\n\n[eval]\nattributes = { number = [\"one\", \"two\"] }\n",
    )
    .unwrap();
    let entries = tasks.unwrap_or(
        r#"
[[task]]
name = "tones"

[[task]]
name = "parity"
config = "parity.toml"
weight = 2.0
"#,
    );
    let text = format!(
        "{}{entries}\n[projector]\npositions = 16\n\n[train]\nsteps = 4\nbatch-size = 4\nlr = 5e-3\neval-every = 2\ncheckpoint-every = 2\nrun-dir = \"{}\"\n",
        head(&tones, "Which tone is this?"),
        dir.join("run").display()
    );
    let path = dir.join("multi.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn two_tasks_train_evaluate_and_caption_from_one_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let config = configs(d.path(), None);
    let out = earshot(["train".as_ref(), config.as_os_str()]);
    expect_success(&out);
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        log.contains("on 12 example(s) of 2 tasks: tones 6 (weight 1), parity 6 (weight 2)"),
        "{log}"
    );
    let run = d.path().join("run");
    // Each evaluation records both tasks' losses and their mean (the number best/ is
    // chosen by).
    let evals = std::fs::read_to_string(run.join("eval.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = evals
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{evals}");
    for v in &lines {
        let (a, b) = (
            v["tasks"]["tones"].as_f64().unwrap(),
            v["tasks"]["parity"].as_f64().unwrap(),
        );
        assert!(a.is_finite() && b.is_finite() && a != b, "{v}");
        assert!(
            (v["eval_loss"].as_f64().unwrap() - (a + b) / 2.0).abs() < 1e-9,
            "{v}"
        );
    }
    assert!(log.contains("(mean of tones"), "{log}");

    // eval: a section per task, each on its own test split with its own attributes, and
    // report and scores files named after the task.
    let out = earshot([
        "eval".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--no-listening-check".as_ref(),
        "--max-tokens".as_ref(),
        "8".as_ref(),
    ]);
    let text = expect_success(&out);
    let tones_at = text.find("task tones").expect("a tones section");
    let parity_at = text.find("task parity").expect("a parity section");
    assert!(tones_at < parity_at, "{text}");
    for task in ["tones", "parity"] {
        assert!(run.join(format!("report-{task}.html")).is_file());
        let scores: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join(format!("eval-{task}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(scores["examples"], 2, "{task}: {scores}");
    }
    assert!(!run.join("report.html").exists());
    // Only parity's config scores the `number` attribute.
    assert!(text[parity_at..].contains("number"), "{text}");
    assert!(!text[tones_at..parity_at].contains("number"), "{text}");

    let out = earshot([
        "eval".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--task".as_ref(),
        "parity".as_ref(),
        "--no-listening-check".as_ref(),
        "--no-report".as_ref(),
        "--max-tokens".as_ref(),
        "8".as_ref(),
        "--json".as_ref(),
    ]);
    let v: serde_json::Value = serde_json::from_str(expect_success(&out).trim()).unwrap();
    let tasks = v["tasks"].as_object().unwrap();
    assert_eq!(tasks.keys().collect::<Vec<_>>(), ["parity"]);

    // caption --task: the task's prompt and dataset with the run's checkpoint, the same
    // captions as the task's own config gives with that checkpoint; without --task, the
    // file's own task.
    let projector = run.join("projector.safetensors");
    let caption = |config: &Path, task: Option<&str>, split: bool| -> Vec<serde_json::Value> {
        let mut args: Vec<std::ffi::OsString> = vec![
            "caption".into(),
            "--config".into(),
            config.into(),
            "--checkpoint".into(),
            projector.clone().into(),
            "--max-tokens".into(),
            "8".into(),
            "--jsonl".into(),
        ];
        if let Some(task) = task {
            args.extend(["--task".into(), task.into()]);
        }
        if split {
            args.extend(["--split".into(), "test".into()]);
        } else {
            args.push(d.path().join("tones/clips/seven.wav").into());
        }
        expect_success(&earshot(args))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let text_of = |lines: &[serde_json::Value]| -> Vec<String> {
        lines
            .iter()
            .map(|l| l["caption"].as_str().unwrap().to_string())
            .collect()
    };
    let parity_toml = d.path().join("parity.toml");
    assert_eq!(
        text_of(&caption(&config, Some("parity"), false)),
        text_of(&caption(&parity_toml, None, false))
    );
    assert_eq!(
        text_of(&caption(&config, Some("tones"), false)),
        text_of(&caption(&config, None, false))
    );
    assert_ne!(
        text_of(&caption(&config, Some("parity"), false)),
        text_of(&caption(&config, Some("tones"), false)),
        "two prompts, one caption"
    );
    let parity_split = caption(&config, Some("parity"), true);
    assert_eq!(parity_split.len(), 2);
    assert_eq!(parity_split[0]["references"][0], "It is odd.");
    let out = earshot([
        "caption".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--task".as_ref(),
        "nope".as_ref(),
        d.path().join("tones/clips/seven.wav").as_os_str(),
    ]);
    let err = expect_failure(&out);
    assert!(
        err.contains("no task \"nope\"") && err.contains("tones, parity"),
        "{err}"
    );

    // Resuming with other weights would change the data order: refused, naming both.
    let changed = configs(
        d.path(),
        Some("[[task]]\nname = \"tones\"\n\n[[task]]\nname = \"parity\"\nconfig = \"parity.toml\"\nweight = 1.0\n"),
    );
    let out = earshot([
        "train".as_ref(),
        changed.as_os_str(),
        "--resume".as_ref(),
        "--max-steps".as_ref(),
        "6".as_ref(),
    ]);
    let err = expect_failure(&out);
    assert!(
        err.contains("parity (6 examples, weight 2)")
            && err.contains("parity (6 examples, weight 1)"),
        "{err}"
    );
}

#[test]
fn bad_task_lists_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    for (entries, expected) in [
        (
            "[[task]]\nname = \"a\"\n\n[[task]]\nname = \"b\"\n",
            "2 [[task]] entries without `config`",
        ),
        (
            "[[task]]\nname = \"a\"\n\n[[task]]\nname = \"a\"\nconfig = \"parity.toml\"\n",
            "name \"a\" is used twice",
        ),
        (
            "[[task]]\nname = \"a/b\"\n",
            "[[task]] name \"a/b\"",
        ),
        (
            "[[task]]\nname = \"a\"\n\n[[task]]\nname = \"b\"\nconfig = \"parity.toml\"\nweight = 0.0\n",
            "task b: weight must be a positive number",
        ),
        (
            "[[task]]\nname = \"a\"\n\n[[task]]\nname = \"b\"\nconfig = \"missing.toml\"\n",
            "task b: config",
        ),
        (
            "[[task]]\nname = \"a\"\n\n[[task]]\nname = \"b\"\nconfig = \"multi.toml\"\n",
            "lists tasks of its own",
        ),
    ] {
        let config = configs(d.path(), Some(entries));
        let out = earshot(["train".as_ref(), config.as_os_str()]);
        let err = expect_failure(&out);
        assert!(err.contains(expected), "{entries}\n{err}");
        assert!(err.contains("multi.toml"), "{err}");
    }
    // A task whose prompt-template plugin differs from the run's.
    let config = configs(d.path(), None);
    let other = plugin_dir("plugins").join("jsonl.wasm");
    let parity = d.path().join("parity.toml");
    let text = std::fs::read_to_string(&parity).unwrap().replace(
        &format!("{}", plugin_dir("plugins").join("chatml.wasm").display()),
        &other.display().to_string(),
    );
    std::fs::write(&parity, text).unwrap();
    let err = expect_failure(&earshot(["train".as_ref(), config.as_os_str()]));
    assert!(
        err.contains("task parity: its prompt-template plugin"),
        "{err}"
    );
}

/// `earshot dataset audit` on a multi-task config audits each task's own dataset, in a
/// section per task; a leak in one task fails the audit naming that task; `--task` picks one.
#[test]
fn dataset_audit_goes_task_by_task() {
    let d = tempfile::tempdir().unwrap();
    let config = configs(d.path(), None);
    let audit = |extra: &[&str]| {
        let mut args: Vec<std::ffi::OsString> =
            vec!["dataset".into(), "audit".into(), config.clone().into()];
        args.extend(extra.iter().map(Into::into));
        earshot(args)
    };
    let out = audit(&[]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tones = text.find("task tones").expect(&text);
    let parity = text.find("task parity").expect(&text);
    assert!(tones < parity, "{text}");

    // One training clip of the parity task also in its test split: that task leaks.
    let test = d.path().join("parity/test.jsonl");
    let mut lines = std::fs::read_to_string(&test).unwrap();
    lines.push_str(
        &serde_json::json!({"id": "again", "audio": "clips/one.wav", "text": "It is odd.", "number": "one"})
            .to_string(),
    );
    lines.push('\n');
    std::fs::write(&test, lines).unwrap();
    let err = expect_failure(&audit(&[]));
    assert!(
        err.contains("1 example(s) (task parity: 1) share content"),
        "{err}"
    );
    let out = audit(&["--task", "tones", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tasks"].as_object().unwrap().len(), 1, "{v:#}");
    assert_eq!(v["tasks"]["tones"]["leaks"][0]["leaking"], 0, "{v:#}");
    let out = audit(&["--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tasks"]["parity"]["leaks"][0]["leaking"], 1, "{v:#}");
    let err = expect_failure(&audit(&["--task", "nope"]));
    assert!(
        err.contains("no task \"nope\"; the config's tasks: tones, parity"),
        "{err}"
    );
}
