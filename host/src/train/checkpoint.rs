//! Checkpoints: projector weights, optimizer state, step and data position, and a manifest
//! of what they were trained against. Each is a folder written as `.step-N.partial` and
//! renamed into place after every file is synced, so an interrupted write (even kill -9)
//! leaves the previous checkpoint intact and loadable. The last K are kept.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a checkpoint was trained against; a resume against anything else is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub encoder: String,
    pub llm: String,
    pub tokenizer: String,
    pub prompt_template: String,
    pub mel: String,
    pub projector: String,
}

impl Manifest {
    /// Names of the fields that differ from `other`.
    pub fn differences(&self, other: &Manifest) -> Vec<&'static str> {
        let pairs = [
            ("Whisper encoder weights", &self.encoder, &other.encoder),
            ("LLM weights", &self.llm, &other.llm),
            ("tokenizer", &self.tokenizer, &other.tokenizer),
            (
                "prompt-template plugin",
                &self.prompt_template,
                &other.prompt_template,
            ),
            ("mel settings", &self.mel, &other.mel),
            ("projector config", &self.projector, &other.projector),
        ];
        pairs
            .iter()
            .filter(|(_, a, b)| a != b)
            .map(|(n, _, _)| *n)
            .collect()
    }
}

/// sha256 over the files' contents, hex.
pub fn hash_files(paths: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for p in paths {
        let mut f =
            std::fs::File::open(p).with_context(|| format!("{}: cannot read", p.display()))?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// The training position and the settings that determine the data order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub step: usize,
    pub samples_seen: u64,
    pub optimizer_steps: u64,
    pub seed: u64,
    pub batch_size: usize,
    #[serde(default = "one")]
    pub accumulate: usize,
    pub examples: usize,
    pub manifest: Manifest,
}

fn one() -> usize {
    1
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Writes a checkpoint under `dir` and keeps the newest `keep_last`.
pub fn save(
    dir: &Path,
    state: &TrainState,
    projector: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    keep_last: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let name = format!("step-{:08}", state.step);
    let partial = dir.join(format!(".{name}.partial"));
    let done = dir.join(&name);
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    std::fs::create_dir(&partial)?;
    for (map, file) in [
        (projector, "projector.safetensors"),
        (optimizer, "optimizer.safetensors"),
    ] {
        let path = partial.join(file);
        candle_core::safetensors::save(map, &path)?;
        std::fs::File::open(&path)?.sync_all()?;
    }
    write_synced(
        &partial.join("state.json"),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    sync_dir(&partial)?;
    if done.exists() {
        std::fs::remove_dir_all(&done)?;
    }
    std::fs::rename(&partial, &done)?;
    sync_dir(dir)?;
    let mut all = complete(dir)?;
    all.sort();
    let excess = all.len().saturating_sub(keep_last.max(1));
    for (_, old) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(old)?;
    }
    Ok(done)
}

/// Complete checkpoints (folders `step-N` with a state.json) as (step, path); leftovers of
/// interrupted writes (`.step-N.partial`) are ignored.
fn complete(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if e.path().join("state.json").is_file() {
                out.push((n, e.path()));
            }
        }
    }
    Ok(out)
}

/// The newest complete checkpoint under `dir`.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>> {
    Ok(complete(dir)?.into_iter().max().map(|(_, p)| p))
}

pub struct Loaded {
    pub state: TrainState,
    pub projector: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
}

pub fn load(ckpt: &Path, device: &Device) -> Result<Loaded> {
    let state_path = ckpt.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("{}: cannot read", state_path.display()))?;
    let state: TrainState = serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid", state_path.display()))?;
    let read = |f: &str| -> Result<HashMap<String, Tensor>> {
        let p = ckpt.join(f);
        let bytes = std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        let t = candle_core::safetensors::load_buffer(&bytes, device)
            .with_context(|| format!("{}: invalid or truncated", p.display()))?;
        for (name, tensor) in &t {
            if let Some(bad) = crate::models::weights::count_non_finite(name, tensor)? {
                bail!("{}: non-finite values in {bad}", p.display());
            }
        }
        Ok(t)
    };
    Ok(Loaded {
        projector: read("projector.safetensors")?,
        optimizer: read("optimizer.safetensors")?,
        state,
    })
}
