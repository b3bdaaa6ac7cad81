//! Shared helpers for the integration tests: where the oracle data, fixtures, models and the
//! `earshot` binary are. A missing resource panics with instructions: tests never skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `../shared/oracle` beside the checkout (override with EARSHOT_ORACLE_DIR).
pub fn oracle_dir() -> PathBuf {
    let dir = std::env::var_os("EARSHOT_ORACLE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/oracle"));
    assert!(
        dir.is_dir(),
        "oracle data not found at {} (set EARSHOT_ORACLE_DIR): these tests need it",
        dir.display()
    );
    dir
}

pub fn whisper_oracle(rel: &str) -> PathBuf {
    let p = oracle_dir().join("whisper-tiny-en").join(rel);
    assert!(p.exists(), "missing oracle file {}", p.display());
    p
}

pub fn fixture(rel: &str) -> PathBuf {
    let p = repo_root().join("tests/fixtures").join(rel);
    assert!(p.exists(), "missing fixture {}", p.display());
    p
}

/// The release `earshot` binary next to this test executable (target/<profile>/earshot).
pub fn earshot_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let bin = dir.join(format!("earshot{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --release -p earshot), \
         or run scripts/test.sh which does",
        bin.display()
    );
    // `cargo test -p earshot-tests` rebuilds the library, not the binary: refuse to test a
    // binary older than the host's sources.
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).unwrap();
    let host = repo_root().join("host");
    let manifest = std::fs::metadata(host.join("Cargo.toml"))
        .and_then(|m| m.modified())
        .unwrap();
    let newest = newest_mtime(&host.join("src")).max(manifest);
    assert!(
        built >= newest,
        "{} is older than the host sources: run cargo build --release -p earshot (scripts/test.sh does)",
        bin.display()
    );
    bin
}

fn newest_mtime(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else if p.extension().is_some_and(|e| e == "rs") || p.ends_with("Cargo.toml") {
            entry.metadata().and_then(|m| m.modified()).unwrap()
        } else {
            continue;
        };
        newest = newest.max(t);
    }
    newest
}

pub fn earshot<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    earshot_command()
        .args(args)
        .output()
        .expect("spawn earshot")
}

/// As [`earshot`], killed after `secs` seconds (exit 124, its output so far kept) so that a
/// hang fails the test instead of stalling the suite.
pub fn earshot_with_timeout<S: AsRef<std::ffi::OsStr>>(args: &[S], secs: u32) -> Output {
    Command::new("timeout")
        .args(["--signal=KILL".to_string(), secs.to_string()])
        .arg(earshot_bin())
        .args(args)
        .env("EARSHOT_HOME", test_home())
        .env_remove("RUST_LOG")
        .output()
        .expect("spawn timeout + earshot")
}

pub fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    earshot::npy::read_f32(path).unwrap_or_else(|e| panic!("{e}"))
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The user's `$EARSHOT_HOME` (default ~/.cache/earshot), where scripts/setup.sh put the
/// models; read before [`test_home`] points the variable elsewhere.
fn user_home() -> &'static Path {
    static USER: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    USER.get_or_init(|| {
        std::env::var_os("EARSHOT_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/earshot")
            })
    })
}

/// `$EARSHOT_HOME/models` (default ~/.cache/earshot/models), as laid out by scripts/setup.sh.
pub fn models_dir() -> PathBuf {
    test_home();
    user_home().join("models")
}

/// `$EARSHOT_HOME/data` (default ~/.cache/earshot/data): the recordings scripts/setup.sh
/// fetched.
pub fn data_dir() -> PathBuf {
    user_home().join("data")
}

/// The `EARSHOT_HOME` the tests run under (`target/test-home`): its `models` and `data` link
/// to the set-up's, its caches (encoder outputs, compiled plugins) are the tests' own, never
/// the user's. Set for this process too, so in-process library code uses it.
pub fn test_home() -> PathBuf {
    static HOME: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    HOME.get_or_init(|| {
        let home = repo_root().join("target/test-home");
        std::fs::create_dir_all(&home).unwrap();
        for name in ["models", "data"] {
            let target = user_home().join(name);
            let link = home.join(name);
            if std::fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
                let _ = std::fs::remove_file(&link);
                if let Err(e) = std::os::unix::fs::symlink(&target, &link) {
                    assert!(
                        e.kind() == std::io::ErrorKind::AlreadyExists,
                        "cannot link {} to {}: {e}",
                        link.display(),
                        target.display()
                    );
                }
            }
        }
        std::env::set_var("EARSHOT_HOME", &home);
        home
    })
    .clone()
}

/// A fresh `EARSHOT_HOME` under `dir` with the set-up's models and empty caches, for tests
/// that count what the caches hold.
pub fn fresh_home(dir: &Path) -> PathBuf {
    let home = dir.join("earshot-home");
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::symlink(user_home().join("models"), home.join("models")).unwrap();
    home
}

/// The `earshot` binary as a command, under the tests' own `EARSHOT_HOME`.
pub fn earshot_command() -> Command {
    let mut c = Command::new(earshot_bin());
    c.env("EARSHOT_HOME", test_home()).env_remove("RUST_LOG");
    c
}

fn model_path(rel: &str) -> PathBuf {
    let p = models_dir().join(rel);
    assert!(
        p.exists(),
        "default model file {} is missing: run scripts/setup.sh first",
        p.display()
    );
    p
}

/// The default Whisper tiny.en in Hugging Face layout (imported from CTranslate2 by set-up).
pub fn default_whisper() -> PathBuf {
    model_path("whisper-tiny.en")
}

/// The default Whisper tiny.en in CTranslate2 layout, as downloaded.
pub fn default_whisper_ct2() -> PathBuf {
    model_path("whisper-tiny.en-ct2")
}

/// The default SmolLM2-135M-Instruct Q4_1 GGUF file.
pub fn default_gguf() -> PathBuf {
    model_path("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn smollm_oracle(rel: &str) -> PathBuf {
    let p = oracle_dir().join("smollm2-135m").join(rel);
    assert!(p.exists(), "missing oracle file {}", p.display());
    p
}

/// Relative L2 error ||a - b|| / ||b||.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Asserts a CLI run failed cleanly (exit 1, no panic) and returns its stderr.
pub fn expect_failure(out: &Output) -> String {
    expect_exit(out, 1)
}

/// Exit statuses the CLI documents (`earshot --help`, README): a caption run where some
/// inputs failed, and `inspect` finding damaged weights.
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_PARTIAL: i32 = 3;
pub const EXIT_INTEGRITY: i32 = 4;

/// Asserts a CLI run exited with `code` without panicking and returns its stderr.
pub fn expect_exit(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(code),
        "expected exit {code}; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    stderr
}

/// Asserts a CLI run succeeded and returns its stdout.
pub fn expect_success(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Builds a plugin workspace (`plugins` or `tests/plugins`) for wasm32-wasip2 once per test
/// process and returns its release output folder. Fails loudly if the toolchain lacks the
/// target (scripts/setup.sh adds it).
pub fn plugin_dir(workspace: &str) -> PathBuf {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    if let Some(p) = built.get(workspace) {
        return p.clone();
    }
    let manifest = repo_root().join(workspace).join("Cargo.toml");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(&manifest)
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "building {} for wasm32-wasip2 failed (run scripts/setup.sh, which adds the target):\n{}",
        manifest.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = repo_root()
        .join(workspace)
        .join("target/wasm32-wasip2/release");
    built.insert(workspace.to_string(), dir.clone());
    dir
}

/// A first-party plugin, e.g. `first_party("chatml")`.
pub fn first_party(name: &str) -> PathBuf {
    let p = plugin_dir("plugins").join(format!("{}.wasm", name.replace('-', "_")));
    assert!(p.is_file(), "{} was not built", p.display());
    p
}

/// The Python dataset adapter (plugins/python-jsonl), built by scripts/setup.sh with
/// componentize-py.
pub fn python_plugin() -> PathBuf {
    python_plugin_named("python-jsonl")
}

/// A Python plugin of `plugins/NAME` as scripts/setup.sh builds it, checked to be newer than
/// its source.
pub fn python_plugin_named(name: &str) -> PathBuf {
    let p = repo_root().join(format!(
        "plugins/target/python/{}.wasm",
        name.replace('-', "_")
    ));
    let src = repo_root().join(format!("plugins/{name}/app.py"));
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup.sh (it builds it with componentize-py)",
        p.display()
    );
    let built = std::fs::metadata(&p).and_then(|m| m.modified()).unwrap();
    let edited = std::fs::metadata(&src).and_then(|m| m.modified()).unwrap();
    assert!(
        built >= edited,
        "{} is older than app.py: run scripts/setup.sh",
        p.display()
    );
    p
}

/// A hostile test plugin, e.g. `hostile("infinite-loop")`.
pub fn hostile(name: &str) -> PathBuf {
    let p = plugin_dir("tests/plugins").join(format!("hostile_{}.wasm", name.replace('-', "_")));
    assert!(p.is_file(), "{} was not built", p.display());
    p
}

/// `dir/run.toml`: the default models, the first-party chatml template and jsonl adapter on
/// the dataset at `root`, a 16-position projector, and `train` as the [train] section.
pub fn write_run_config(dir: &Path, root: &Path, train: &str) -> PathBuf {
    let cfg = format!(
        "{}\n[projector]\npositions = 16\n\n[train]\n{train}\n",
        run_config_head(root, "", "")
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, cfg).unwrap();
    path
}

/// The [models], [plugins] and [data] sections of a test run config: the default models, the
/// first-party chatml template and jsonl adapter on the dataset at `root`, with `plugins` and
/// `data` as extra lines of those sections.
pub fn run_config_head(root: &Path, plugins_extra: &str, data_extra: &str) -> String {
    let plugins = plugin_dir("plugins");
    format!(
        r#"
[models]
whisper = "{whisper}"
llm = "{llm}"

[plugins]
prompt-template = "{plugins}/chatml.wasm"
{plugins_extra}

[data]
adapter = "{plugins}/jsonl.wasm"
root = "{root}"
{data_extra}
"#,
        whisper = models_dir().join("whisper-tiny.en").display(),
        llm = default_gguf().display(),
        plugins = plugins.display(),
        root = root.display(),
    )
}

/// The write-up's sampler, the reference the cached decode loop is tested against (and the
/// captioning benchmark's baseline): every new token re-runs the whole sequence, without a
/// KV cache. Returns the generated ids.
pub fn decode_without_cache(
    llm: &impl earshot::models::llm::LanguageModel,
    prompt: &candle_core::Tensor,
    eos: Option<u32>,
    max_tokens: usize,
    sampler: &mut earshot::sampler::Sampler,
) -> earshot::models::weights::Result<Vec<u32>> {
    use candle_core::{DType, Tensor};
    use earshot::models::llm::LogitsAt;
    use earshot::models::nonfinite::NonFiniteTrace;
    let device = llm.device().clone();
    let mut seq = prompt.detach();
    let mut ids = Vec::new();
    while ids.len() < max_tokens {
        let logits = llm.forward(&seq, 0, None, LogitsAt::Last, NonFiniteTrace::default())?;
        let row = logits
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let next = sampler.sample(&row);
        if Some(next) == eos {
            break;
        }
        ids.push(next);
        let e = llm.embed(&Tensor::new(&[next], &device)?.unsqueeze(0)?)?;
        seq = Tensor::cat(&[&seq, &e], 1)?;
    }
    Ok(ids)
}

/// Debian's `chromium`, for tests that load a page the way a browser does. Missing is a
/// failure that says how to get it, never a skip.
pub fn chromium() -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join("chromium");
        if p.is_file() {
            return p;
        }
    }
    panic!("chromium not found: scripts/test.sh installs it (apt-get install chromium, as root)");
}

/// Runs headless Chromium on `page` with `args` (e.g. --dump-dom), stdout as text; a minute
/// at most.
pub fn headless_chromium(page: &Path, args: &[&str]) -> String {
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    headless_chromium_url(&url, args)
}

/// Runs headless Chromium on `url` with `args`, stdout as text; a minute at most.
pub fn headless_chromium_url(url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .arg("60")
        .arg(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--allow-file-access-from-files",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium {args:?} {url}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// `earshot train CONFIG` for `steps` steps into `run` (eval only at the end), then `earshot
/// eval --config CONFIG --checkpoint run/projector.safetensors --json` with the listening
/// check on the config's test split; the same `--set KEY=VALUE` overrides for both. Returns
/// the eval report and eval's stderr.
pub fn train_then_eval(
    config: &Path,
    run: &Path,
    steps: usize,
    sets: &[String],
) -> (serde_json::Value, String) {
    train_run(config, run, steps, sets);
    eval_run(config, run, sets, None)
}

fn with_run_sets(run: &Path, sets: &[String], mut args: Vec<String>) -> Vec<String> {
    let all =
        std::iter::once(format!("train.run-dir=\"{}\"", run.display())).chain(sets.iter().cloned());
    for s in all {
        args.extend(["--set".to_string(), s]);
    }
    args
}

/// `earshot train CONFIG` for `steps` steps into `run` (eval only at the end), with `sets`
/// (`--set KEY=VALUE`). Returns train's stdout.
pub fn train_run(config: &Path, run: &Path, steps: usize, sets: &[String]) -> String {
    let train = with_run_sets(
        run,
        sets,
        vec![
            "train".into(),
            config.display().to_string(),
            "--set".into(),
            format!("train.steps={steps}"),
            "--set".into(),
            "train.eval-every=0".into(),
        ],
    );
    let log = expect_success(&earshot(&train));
    assert!(run.join("projector.safetensors").is_file(), "{log}");
    log
}

/// `earshot eval --config CONFIG --checkpoint run/projector.safetensors --json` with the
/// listening check, on `split` (default: the config's test split), with `sets`. Returns the
/// eval report and eval's stderr.
pub fn eval_run(
    config: &Path,
    run: &Path,
    sets: &[String],
    split: Option<&str>,
) -> (serde_json::Value, String) {
    let mut args = vec![
        "eval".into(),
        "--config".into(),
        config.display().to_string(),
        "--checkpoint".into(),
        run.join("projector.safetensors").display().to_string(),
        "--max-tokens".into(),
        "24".into(),
        "--json".into(),
    ];
    if let Some(split) = split {
        args.extend(["--split".into(), split.to_string()]);
    }
    let out = earshot(with_run_sets(run, sets, args));
    let stdout = expect_success(&out);
    let v = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is one JSON object ({e}): {stdout:.2000}"));
    (v, String::from_utf8_lossy(&out.stderr).to_string())
}

/// The learning check of issue #25: on the split a model was trained on, real audio scores
/// `primary` (an attribute's accuracy, or "cer") at least `bar`, and beats silence,
/// shuffled audio, the training split's majority answer and uniform chance (attributes), or
/// silence, shuffled audio and the most common training target (CER), by `margin`. A
/// projector that ignores the audio cannot: without the audio, captions can only follow
/// the training split's label frequencies.
pub fn assert_learned(v: &serde_json::Value, primary: &str, bar: f64, margin: f64) {
    let check = &v["listening_check"];
    let num = |x: &serde_json::Value, what: &str| -> f64 {
        x.as_f64()
            .unwrap_or_else(|| panic!("{what}: not a number in {v:.3000}"))
    };
    let mut baselines: Vec<(String, f64)> = Vec::new();
    let real;
    if primary == "cer" {
        // Lower is better: compared as 1 - CER.
        real = 1.0 - num(&v["scores"]["cer"], "cer");
        for hearing in ["silence", "shuffled"] {
            let cer = num(&check[hearing]["scores"]["cer"], hearing);
            baselines.push((hearing.into(), 1.0 - cer));
        }
        let constant = num(&check["baselines"]["constant"]["cer"], "constant target");
        baselines.push(("most common training target".into(), 1.0 - constant));
    } else {
        real = num(&v["attributes"][primary]["accuracy"], primary);
        for hearing in ["silence", "shuffled"] {
            let a = &check[hearing]["attributes"][primary]["accuracy"];
            baselines.push((hearing.into(), num(a, hearing)));
        }
        let majority = &check["baselines"]["majority"][primary]["accuracy"];
        baselines.push(("majority".into(), num(majority, "majority")));
        let uniform = &check["baselines"]["uniform"][primary];
        baselines.push(("uniform".into(), num(uniform, "uniform")));
    }
    let shown = |x: f64| {
        if primary == "cer" {
            format!("CER {:.3}", 1.0 - x)
        } else {
            format!("{primary} accuracy {x:.3}")
        }
    };
    let listed: Vec<String> = baselines
        .iter()
        .map(|(name, score)| format!("{name} {}", shown(*score)))
        .collect();
    assert!(
        real >= bar,
        "real audio: {} (needs {}); baselines: {}",
        shown(real),
        shown(bar),
        listed.join(", ")
    );
    for (name, score) in &baselines {
        assert!(
            real >= score + margin,
            "real audio {} does not lead {name} ({}) by {margin}",
            shown(real),
            shown(*score)
        );
    }
}

/// Every example of `split`, read `page` at a time through the adapter's paging.
/// Each example's id and target, in order: what an adapter's golden-value tests compare.
pub fn ids_and_targets(examples: &[earshot::plugins::Example]) -> Vec<(&str, Option<&str>)> {
    examples
        .iter()
        .map(|e| (e.id.as_str(), e.target.as_deref()))
        .collect()
}

/// A page whose examples must all be usable (a first-party adapter's example over a bound is
/// a bug in the adapter), as plain examples.
pub struct UsablePage {
    pub examples: Vec<earshot::plugins::Example>,
    pub next: Option<u64>,
}

pub fn usable(b: earshot::plugins::Batch) -> UsablePage {
    UsablePage {
        examples: b.examples.into_iter().map(|e| e.unwrap()).collect(),
        next: b.next,
    }
}

pub fn read_all(
    ds: &mut earshot::plugins::DatasetAdapter,
    split: &str,
    page: u32,
) -> Vec<earshot::plugins::Example> {
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let b = usable(ds.read(split, start, page).unwrap());
        out.extend(b.examples);
        match b.next {
            Some(n) => start = n,
            None => return out,
        }
    }
}

/// The value of metadata `key` of an example.
pub fn metadata_value<'a>(ex: &'a earshot::plugins::Example, key: &str) -> Option<&'a str> {
    ex.metadata
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The (step, loss) records of a run folder's metrics.jsonl.
pub fn run_losses(run_dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}
