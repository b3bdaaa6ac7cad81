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
    bin
}

pub fn earshot<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(earshot_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("spawn earshot")
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
