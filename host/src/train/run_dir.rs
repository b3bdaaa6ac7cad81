//! A run folder: the config copy, `metrics.jsonl`, `eval.jsonl`, checkpoints (pruned to the
//! last K), `best/` with `best.json`, plots and the final projector. Starting a run here
//! either resumes the newest checkpoint (dropping records written after it) or, only when
//! asked, replaces an earlier run; an earlier run is never mixed with a new one.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::error::{io, Result, TrainError};
use candle_core::Tensor;

use super::checkpoint::{self, TrainState};
use super::optim::AdamW;
use super::Best;
use crate::config::RunConfig;
use crate::models::trainable::Trainable;

/// Files of a run that a fresh run replaces.
const RUN_FILES: [&str; 5] = [
    "metrics.jsonl",
    "eval.jsonl",
    "best.json",
    "loss.png",
    "update_ratios.png",
];
const RUN_FOLDERS: [&str; 2] = ["best", "checkpoints"];

pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// The folder, created if missing.
    pub fn create(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).map_err(io(path, "cannot create"))?;
        Ok(Self {
            path: path.to_path_buf(),
        })
    }

    pub fn checkpoints(&self) -> PathBuf {
        self.path.join("checkpoints")
    }

    /// Makes room for a fresh run: refused when the folder holds an earlier run, unless
    /// `overwrite`, in which case that run's files are removed.
    pub fn start_fresh(&self, overwrite: bool) -> Result<()> {
        let earlier = ["metrics.jsonl", "checkpoints"]
            .iter()
            .any(|f| self.path.join(f).exists());
        if earlier && !overwrite {
            return Err(TrainError::RunExists(self.path.clone()));
        }
        for f in RUN_FILES {
            let p = self.path.join(f);
            if p.exists() {
                std::fs::remove_file(&p).map_err(io(&p, "cannot remove"))?;
            }
        }
        for d in RUN_FOLDERS {
            let p = self.path.join(d);
            if p.exists() {
                std::fs::remove_dir_all(&p).map_err(io(&p, "cannot remove"))?;
            }
        }
        Ok(())
    }

    /// The newest complete checkpoint, for `--resume`.
    pub fn latest_checkpoint(&self) -> Result<PathBuf> {
        match checkpoint::latest(&self.checkpoints())? {
            Some(c) => Ok(c),
            None => Err(TrainError::NoCheckpoint(self.checkpoints())),
        }
    }

    /// Keeps the records of the steps up to `step` (what a resumed checkpoint covers).
    pub fn truncate_records(&self, step: usize) -> Result<()> {
        truncate_jsonl(&self.path.join("metrics.jsonl"), step)?;
        truncate_jsonl(&self.path.join("eval.jsonl"), step)
    }

    /// The settings this run trains with, for `earshot compare`, `earshot serve RUN_DIR`
    /// and for the record; its paths absolute, so that it reads the same from anywhere.
    pub fn write_config(&self, config: &RunConfig) -> Result<()> {
        let text =
            toml::to_string(&config.with_absolute_paths()).map_err(|e| TrainError::Records {
                path: self.path.join("config.toml"),
                reason: e.to_string(),
            })?;
        write_atomic(&self.path.join("config.toml"), text)
    }

    /// Opens a record file (`metrics.jsonl`, `eval.jsonl`) for appending.
    pub fn append(&self, name: &str) -> Result<File> {
        let p = self.path.join(name);
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .map_err(io(&p, "cannot open"))
    }

    /// The recorded best evaluation, if it is not after `step`.
    pub fn best(&self, step: usize) -> Option<Best> {
        std::fs::read_to_string(self.path.join("best.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .filter(|b: &Best| b.step <= step)
    }

    /// Saves a checkpoint under `checkpoints/` (keeping the last `keep`).
    pub fn save_checkpoint(
        &self,
        keep: usize,
        state: &TrainState,
        trained: &Trainable,
        opt: &AdamW,
    ) -> Result<PathBuf> {
        save_into(&self.checkpoints(), keep, state, trained, opt)
    }

    /// Saves the best checkpoint so far into `best/` and records it in `best.json`.
    pub fn save_best(
        &self,
        best: Best,
        state: &TrainState,
        trained: &Trainable,
        opt: &AdamW,
    ) -> Result<()> {
        save_into(&self.path.join("best"), 1, state, trained, opt)?;
        write_atomic(&self.path.join("best.json"), json(&best))
    }

    /// Redraws loss.png and update_ratios.png.
    pub fn refresh_plots(&self) -> Result<()> {
        super::plots::write_run_plots(&self.path).map(drop)
    }

    /// The trained tensors as `projector.safetensors` (the adapters' too, by PEFT name)
    /// and, with LoRA, the adapters alone in PEFT's layout under `adapter/` (for Python's
    /// `peft`; `base_model` goes into its adapter_config.json).
    pub fn save_final(&self, trained: &Trainable, base_model: &str) -> Result<()> {
        trained.save(&self.path.join("projector.safetensors"))?;
        if let Some(lora) = &trained.lora {
            lora.save_peft(&self.path.join("adapter"), base_model)?;
        }
        Ok(())
    }
}

/// Trained tensors, optimizer state and position into a checkpoint folder under `dir`.
fn save_into(
    dir: &Path,
    keep: usize,
    state: &TrainState,
    trained: &Trainable,
    opt: &AdamW,
) -> Result<PathBuf> {
    let p: HashMap<String, Tensor> = trained.tensors();
    let (o, t) = opt.state();
    let mut st = state.clone();
    st.optimizer_steps = t;
    checkpoint::save(dir, &st, &p, &o, keep)
}

fn write_atomic(path: &Path, text: String) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp, "cannot write"))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp, "cannot write"))?;
    std::fs::rename(&tmp, path).map_err(io(path, "cannot write"))
}

/// Keeps the JSON lines of `path` whose "step" is at most `max_step`.
fn truncate_jsonl(path: &Path, max_step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= max_step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept)
}

/// A record as one JSON line (serializing plain numbers and strings cannot fail).
pub(super) fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).expect("records are plain data")
}
