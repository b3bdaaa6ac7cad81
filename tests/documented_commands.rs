//! Documented commands cannot rot: every `earshot` command the README shows and every
//! `--help` example runs, in order, from a copy of the repository's layout (so relative
//! paths mean what they say), against the bundled data and the set-up's models under
//! `~/.cache/earshot` (HOME points at a folder whose models link to the set-up's).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use earshot_tests::*;

/// A working folder laid out like the repository: configs (copied, so run folders land
/// here), configs/data, plugins and tests linked; HOME with ~/.cache/earshot/models; PATH
/// with `earshot`.
fn workspace() -> tempfile::TempDir {
    let w = tempfile::tempdir().unwrap();
    let root = repo_root();
    let link = |from: PathBuf, to: PathBuf| std::os::unix::fs::symlink(from, to).unwrap();
    std::fs::create_dir_all(w.path().join("configs")).unwrap();
    for e in std::fs::read_dir(root.join("configs")).unwrap() {
        let e = e.unwrap();
        if e.path().extension().is_some_and(|x| x == "toml") {
            std::fs::copy(e.path(), w.path().join("configs").join(e.file_name())).unwrap();
        }
    }
    link(root.join("configs/data"), w.path().join("configs/data"));
    link(root.join("plugins"), w.path().join("plugins"));
    link(root.join("tests"), w.path().join("tests"));
    let cache = w.path().join("home/.cache/earshot");
    std::fs::create_dir_all(&cache).unwrap();
    link(models_dir(), cache.join("models"));
    std::fs::create_dir_all(w.path().join("bin")).unwrap();
    link(earshot_bin(), w.path().join("bin/earshot"));
    w
}

/// Runs `script` with bash (-e, -u, pipefail) in the workspace.
fn run(w: &Path, script: &str) -> Output {
    let path = format!(
        "{}:{}",
        w.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(w)
        .env("HOME", w.join("home"))
        .env("PATH", path)
        .env_remove("EARSHOT_HOME")
        .env_remove("RUST_LOG")
        .output()
        .expect("run bash")
}

fn must_succeed(what: &str, script: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{script}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The README's ```sh blocks that run earshot (the first block, the two set-up commands,
/// is what runs this test).
fn readme_blocks() -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```sh") => current = Some(String::new()),
            (Some(_), l) if l.starts_with("```") => blocks.push(current.take().unwrap()),
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    blocks
        .into_iter()
        .filter(|b| b.lines().any(|l| l.trim_start().starts_with("earshot ")))
        .collect()
}

#[test]
fn every_command_in_the_readme_runs() {
    let w = workspace();
    let blocks = readme_blocks();
    assert!(blocks.len() >= 6, "found {} blocks", blocks.len());
    for block in &blocks {
        let out = run(w.path(), block);
        must_succeed("a README command", block, &out);
    }
    // What the commands claim to leave behind.
    for made in [
        "enc.npy",
        "runs/cpu-smollm2-tones/projector.safetensors",
        "runs/positions32/projector.safetensors",
        "runs/tones-all-layers/projector.safetensors",
        "runs/tones-lora/adapter/adapter_model.safetensors",
        "runs/lr3e-3/best",
        "lr-sweep.png",
        "captions.jsonl",
    ] {
        assert!(w.path().join(made).exists(), "{made} was not written");
    }
}

/// Subcommands as `earshot [GROUP] --help` lists them under "Commands:".
fn subcommands(w: &Path, group: &str) -> Vec<String> {
    let out = run(w, &format!("earshot {group} --help"));
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        // "  name  description"; wrapped description lines are indented further.
        .filter(|l| !l[2..].starts_with(' '))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(|c| format!("{group} {c}").trim().to_string())
        .collect()
}

#[test]
fn every_help_ends_with_an_example_that_runs() {
    let w = workspace();
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let mut leaves = Vec::new();
    for top in subcommands(w.path(), "") {
        let nested = subcommands(w.path(), &top);
        if nested.is_empty() {
            leaves.push(top);
        } else {
            leaves.extend(nested);
        }
    }
    assert!(leaves.len() >= 15, "{leaves:?}");
    for cmd in &leaves {
        assert!(
            readme.contains(&format!("earshot {cmd}")),
            "the README never shows `earshot {cmd}`"
        );
        let out = run(w.path(), &format!("earshot {cmd} --help"));
        let help = String::from_utf8_lossy(&out.stdout).to_string();
        let example: String = help
            .lines()
            .skip_while(|l| !l.starts_with("Example"))
            .skip(1)
            .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
            .collect();
        assert!(
            example.contains(&format!("earshot {cmd}")),
            "`earshot {cmd} --help` ends with no example of itself:\n{help}"
        );
        let out = run(w.path(), &example);
        must_succeed(
            &format!("the example of `earshot {cmd} --help`"),
            &example,
            &out,
        );
    }
}
