//! The CLI's output under snapshot tests (insta): every subcommand's `--help`, and the human
//! and `--json` output of the inspection commands on fixtures. A changed table, help text or
//! JSON shape fails here until its snapshot (`tests/snapshots/`) is reviewed and accepted
//! (`cargo insta review`, or `INSTA_UPDATE=always` then `git diff`). Paths that differ between
//! machines are redacted; nothing here depends on time.

use std::path::Path;
use std::process::Output;

use earshot_tests::*;

/// stdout, then stderr and the exit status when there is anything to say.
fn shown(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.is_empty() {
        s.push_str("--- stderr ---\n");
        s.push_str(&stderr);
    }
    if out.status.code() != Some(0) {
        s.push_str(&format!("--- exit status {:?} ---\n", out.status.code()));
    }
    s
}

/// Settings that replace this machine's paths with stable names.
fn redacted(tmp: Option<&Path>) -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    let mut paths = vec![
        (repo_root().display().to_string(), "[REPO]"),
        (models_dir().display().to_string(), "[MODELS]"),
        (data_dir().display().to_string(), "[DATA]"),
        (test_home().display().to_string(), "[EARSHOT_HOME]"),
    ];
    if let Some(t) = tmp {
        paths.push((t.display().to_string(), "[TMP]"));
    }
    // Longest first, so a path inside another is replaced whole.
    paths.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    for (path, name) in paths {
        s.add_filter(&regex_escape(&path), name);
    }
    s.set_prepend_module_to_snapshot(false);
    s
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if "\\.+*?()|[]{}^$#&-~".contains(c) {
                vec!['\\', c]
            } else {
                vec![c]
            }
        })
        .collect()
}

/// The subcommands a `--help` text lists under "Commands:" (`help` aside).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| {
            // A command's line starts at two spaces; continuation lines are indented further.
            let rest = l.strip_prefix("  ")?;
            if rest.starts_with(' ') {
                return None;
            }
            rest.split_whitespace().next().map(String::from)
        })
        .filter(|c| c != "help")
        .collect()
}

#[test]
fn every_help_text() {
    let mut todo = vec![Vec::<String>::new()];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        let mut args = path.clone();
        args.push("--help".into());
        let out = earshot(&args);
        let text = expect_success(&out);
        let name = if path.is_empty() {
            "help__earshot".to_string()
        } else {
            format!("help__{}", path.join("__"))
        };
        redacted(None).bind(|| insta::assert_snapshot!(name, text));
        seen += 1;
        for sub in subcommands(&text) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
    }
    // earshot, its 15 commands and their subcommands (plugin, dataset, cache, import).
    assert!(seen >= 20, "only {seen} help texts found");
}

/// `earshot ARGS...` (each a path or a string), its output kept as snapshot NAME with this
/// machine's paths redacted.
macro_rules! snapshot {
    ($name:literal; $($arg:expr),+ $(,)?) => {{
        let out = shown(&earshot([$(std::ffi::OsStr::new(&$arg)),+]));
        redacted(None).bind(|| insta::assert_snapshot!($name, out));
    }};
}

#[test]
fn audio_info_human_and_json() {
    let audio = repo_root().join("tests/fixtures/audio/speech.mp3");
    snapshot!("audio_info"; "audio-info", audio);
    snapshot!("audio_info_json"; "audio-info", "--json", audio);
}

#[test]
fn inspect_the_default_models() {
    snapshot!("inspect_whisper"; "inspect", default_whisper());
    snapshot!("inspect_gguf"; "inspect", default_gguf());
}

#[test]
fn dataset_list_human_and_error_lines() {
    let root = repo_root().join("tests/fixtures/jsonl");
    snapshot!("dataset_list"; "dataset", "list", "--adapter", first_party("jsonl"), "--root", root,
        "--limit", "2");
}

#[test]
fn prompt_pieces_and_target() {
    snapshot!("prompt"; "prompt", "--template", first_party("chatml"),
        "--meta", "instruction=Who is speaking?", "--target", "A man.");
}

#[test]
fn plugin_check_human_and_json() {
    snapshot!("plugin_check"; "plugin", "check", first_party("chatml"));
    snapshot!("plugin_check_json"; "plugin", "check", "--json", first_party("soundfont"));
}

/// Hand-written predictions (captions and references, attributes in the captions).
const PREDICTIONS: &str = r#"{"id": "a", "caption": "A piano note in the low register.", "references": ["A piano note in the low register."], "metadata": {"family": "piano", "register": "low"}}
{"id": "b", "caption": "A organ note in the high register.", "references": ["A guitar note in the high register."], "metadata": {"family": "guitar", "register": "high"}}
{"id": "c", "caption": "A piano note in the middle register.", "references": ["A piano note in the middle register.", "A piano note, middle register."], "metadata": {"family": "piano", "register": "middle"}}
{"id": "d", "caption": "A bass note in the low register.", "references": ["A bass note in the middle register."], "metadata": {"family": "bass", "register": "middle"}}
{"id": "e", "caption": "A reed note.", "references": ["A reed note in the high register."], "metadata": {"family": "reed", "register": "high"}}
"#;
#[test]
fn eval_predictions_human_brief_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("captions.jsonl");
    std::fs::write(&file, PREDICTIONS).unwrap();
    let s = redacted(Some(tmp.path()));
    let args = |extra: &[&str]| {
        let mut a: Vec<std::ffi::OsString> = vec![
            "eval".into(),
            "--predictions".into(),
            file.clone().into(),
            "--attribute".into(),
            "family=piano,organ,guitar,bass,reed".into(),
            "--attribute".into(),
            "register=low,middle,high".into(),
        ];
        a.extend(extra.iter().map(|e| e.into()));
        a
    };
    let human = shown(&earshot(args(&[])));
    s.bind(|| insta::assert_snapshot!("eval_predictions", human));
    let brief = shown(&earshot(args(&["--brief"])));
    s.bind(|| insta::assert_snapshot!("eval_predictions_brief", brief));
    let json = shown(&earshot(args(&["--json"])));
    s.bind(|| insta::assert_snapshot!("eval_predictions_json", json));
}

#[test]
fn compare_two_runs() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, lr, losses) in [
        ("lr1e-3", "1e-3", [3.0, 2.0, 1.5, 1.2]),
        ("lr3e-3", "3e-3", [3.0, 1.6, 1.1, 0.9]),
    ] {
        let run = tmp.path().join(name);
        std::fs::create_dir_all(&run).unwrap();
        let metrics: String = losses
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{{\"step\":{},\"loss\":{l}}}\n", i + 1))
            .collect();
        std::fs::write(run.join("metrics.jsonl"), metrics).unwrap();
        std::fs::write(
            run.join("eval.jsonl"),
            format!(
                "{{\"step\":2,\"eval_loss\":{}}}\n{{\"step\":4,\"eval_loss\":{}}}\n",
                losses[1] + 0.2,
                losses[3] + 0.3
            ),
        )
        .unwrap();
        std::fs::write(
            run.join("config.toml"),
            format!("[train]\nlr = {lr}\nsteps = 4\nrun-dir = \"{name}\"\n"),
        )
        .unwrap();
    }
    let png = tmp.path().join("compare.png");
    let out = shown(&earshot([
        "compare".as_ref(),
        tmp.path().join("lr1e-3").as_os_str(),
        tmp.path().join("lr3e-3").as_os_str(),
        "--out".as_ref(),
        png.as_os_str(),
    ]));
    assert!(png.is_file());
    redacted(Some(tmp.path())).bind(|| insta::assert_snapshot!("compare", out));
}
