//! Checkpoints: projector weights, optimizer state, step and data position, and a manifest
//! of what they were trained against. Each is a folder written as `.step-N.partial` and
//! renamed into place after every file is synced, so an interrupted write (even kill -9)
//! leaves the previous checkpoint intact and loadable. The last K are kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::error::{bad_checkpoint, io, Result, TrainError};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::models::trainable::Trainable;
pub use crate::pipeline::Manifest;

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
    /// A multi-task run's tasks as (name, training examples, weight): the data order
    /// depends on them. Empty for one task (and in checkpoints from before tasks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<(String, usize, f64)>,
}

fn one() -> usize {
    1
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(io(path, "cannot create"))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(path, "cannot write"))
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir, "cannot sync"))
}

/// Where inside a checkpoint write a test may stop the process (as a kill would): set
/// `EARSHOT_TEST_KILL_IN_CHECKPOINT=<stage>@<step>` and the process kills itself with
/// SIGKILL when the write of that step reaches that stage. Nothing else reads the variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStage {
    /// The projector and optimizer files are written and synced; no state.json yet.
    FilesWritten,
    /// state.json too; the folder is still `.step-N.partial`.
    StateWritten,
    /// An older folder of the same step and the new one have traded places; the old one
    /// (now `.step-N.partial`) is not deleted yet.
    Swapped,
    /// The folder is `step-N`; older checkpoints are not pruned yet.
    Renamed,
}

impl WriteStage {
    fn name(self) -> &'static str {
        match self {
            WriteStage::FilesWritten => "files-written",
            WriteStage::StateWritten => "state-written",
            WriteStage::Swapped => "swapped",
            WriteStage::Renamed => "renamed",
        }
    }
}

/// Stops here when the test hook names this stage and step: by returning an error when
/// `stop` says so (in-process tests), or with SIGKILL when the environment says so.
fn reached(stage: WriteStage, step: usize, stop: Option<(WriteStage, usize)>) -> Result<()> {
    if stop == Some((stage, step)) {
        return Err(TrainError::TestStop(stage.name()));
    }
    if let Ok(v) = std::env::var("EARSHOT_TEST_KILL_IN_CHECKPOINT") {
        if v == format!("{}@{step}", stage.name()) {
            // SAFETY: signalling our own process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
    Ok(())
}

/// Atomically replaces the folder `to` with the folder `from` (Linux `renameat2` with
/// `RENAME_EXCHANGE`, then the old one is deleted): at every instant `to` is whole, old or
/// new. Where the filesystem cannot exchange, falls back to delete-then-rename.
fn replace_dir(
    from: &Path,
    to: &Path,
    step: usize,
    stop: Option<(WriteStage, usize)>,
) -> Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| bad_checkpoint(p, "a path with a NUL byte"))
    };
    let (a, b) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths, relative to the working directory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        reached(WriteStage::Swapped, step, stop)?;
        std::fs::remove_dir_all(from).map_err(io(from, "cannot remove"))?;
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
        return Err(io(to, "cannot replace")(err));
    }
    std::fs::remove_dir_all(to).map_err(io(to, "cannot remove"))?;
    std::fs::rename(from, to).map_err(io(to, "cannot rename into place"))
}

/// Writes a checkpoint under `dir` and keeps the newest `keep_last`. The folder appears
/// whole or not at all; a checkpoint of the same step is replaced atomically.
pub fn save(
    dir: &Path,
    state: &TrainState,
    projector: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    keep_last: usize,
) -> Result<PathBuf> {
    save_stopping(dir, state, projector, optimizer, keep_last, None)
}

/// [`save`], stopping with an error at `stop` (stage, step): how in-process tests leave the
/// disk as a kill at that point would.
pub fn save_stopping(
    dir: &Path,
    state: &TrainState,
    projector: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    keep_last: usize,
    stop: Option<(WriteStage, usize)>,
) -> Result<PathBuf> {
    let _span = tracing::debug_span!("checkpoint", step = state.step).entered();
    std::fs::create_dir_all(dir).map_err(io(dir, "cannot create"))?;
    let step = state.step;
    let name = format!("step-{step:08}");
    let partial = dir.join(format!(".{name}.partial"));
    let done = dir.join(&name);
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial, "cannot remove"))?;
    }
    std::fs::create_dir(&partial).map_err(io(&partial, "cannot create"))?;
    for (map, file) in [
        (projector, "projector.safetensors"),
        (optimizer, "optimizer.safetensors"),
    ] {
        let path = partial.join(file);
        candle_core::safetensors::save(map, &path)?;
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path, "cannot sync"))?;
    }
    reached(WriteStage::FilesWritten, step, stop)?;
    write_synced(
        &partial.join("state.json"),
        serde_json::to_string_pretty(state)
            .map_err(|e| bad_checkpoint(&partial, e.to_string()))?
            .as_bytes(),
    )?;
    sync_dir(&partial)?;
    reached(WriteStage::StateWritten, step, stop)?;
    if done.exists() {
        replace_dir(&partial, &done, step, stop)?;
    } else {
        std::fs::rename(&partial, &done).map_err(io(&done, "cannot rename into place"))?;
    }
    sync_dir(dir)?;
    reached(WriteStage::Renamed, step, stop)?;
    let mut all = complete(dir)?;
    all.sort();
    let excess = all.len().saturating_sub(keep_last.max(1));
    for (_, old) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&old).map_err(io(&old, "cannot prune"))?;
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
    for e in std::fs::read_dir(dir)
        .map_err(io(dir, "cannot list"))?
        .flatten()
    {
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

/// The projector file a `--checkpoint` path names, and the checkpoint state (with its
/// manifest) beside it when there is one. Accepted: a `projector.safetensors` file; a
/// checkpoint folder (`checkpoints/step-N`); a folder of checkpoints (`best/`,
/// `checkpoints/`: the newest complete one); a run folder (its final projector, else its
/// newest checkpoint).
pub fn resolve(path: &Path) -> Result<(PathBuf, Option<PathBuf>)> {
    if path.is_file() {
        return Ok((path.to_path_buf(), None));
    }
    if !path.is_dir() {
        return Err(bad_checkpoint(
            path,
            format!(
                "{} (given as a checkpoint)",
                crate::files::neither_file_nor_folder(path)
            ),
        ));
    }
    let projector = path.join("projector.safetensors");
    let state = path.join("state.json");
    if projector.is_file() {
        return Ok((projector, state.is_file().then_some(state)));
    }
    for holder in [path.to_path_buf(), path.join("checkpoints")] {
        if let Some(newest) = latest(&holder)? {
            return Ok((
                newest.join("projector.safetensors"),
                Some(newest.join("state.json")),
            ));
        }
    }
    Err(bad_checkpoint(
        path,
        "holds no projector.safetensors, no step-N checkpoint folder and no checkpoints/ \
         folder; give a projector file, a checkpoint folder (step-N, best) or a run folder",
    ))
}

/// Loads the trained projector that a `--checkpoint` path names (see [`resolve`]) into
/// `projector`, after checking the checkpoint's manifest against `current` (for `purpose`,
/// e.g. "caption"). Returns the projector file.
pub fn load_trained(
    path: &Path,
    trained: &mut Trainable,
    current: &Manifest,
    purpose: &str,
    allow_mismatch: bool,
) -> Result<PathBuf> {
    let (file, state) = resolve(path)?;
    if let Some(state) = state {
        let text = crate::files::read_to_string(&state).map_err(io(&state, "cannot read"))?;
        let saved: TrainState = serde_json::from_str(&text)
            .map_err(|e| bad_checkpoint(&state, format!("not a checkpoint state: {e}")))?;
        saved
            .manifest
            .check(current, path, purpose, allow_mismatch)?;
    }
    trained
        .load_into(&file)
        .map_err(|e| bad_checkpoint(&file, format!("cannot load the trained weights: {e}")))?;
    Ok(file)
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
    let text = crate::files::read_to_string(&state_path).map_err(io(&state_path, "cannot read"))?;
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| bad_checkpoint(&state_path, format!("invalid: {e}")))?;
    let read = |f: &str| -> Result<HashMap<String, Tensor>> {
        let p = ckpt.join(f);
        let bytes = crate::files::read(&p).map_err(io(&p, "cannot read"))?;
        let t = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(|e| bad_checkpoint(&p, format!("invalid or truncated: {e}")))?;
        for (name, tensor) in &t {
            if let Some(bad) = crate::models::weights::count_non_finite(name, tensor)? {
                return Err(bad_checkpoint(&p, format!("non-finite values in {bad}")));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize, samples_seen: u64) -> TrainState {
        let m = String::from("x");
        TrainState {
            step,
            samples_seen,
            optimizer_steps: step as u64,
            seed: 0,
            batch_size: 1,
            accumulate: 1,
            examples: 1,
            tasks: Vec::new(),
            manifest: Manifest {
                encoder: m.clone(),
                llm: m.clone(),
                tokenizer: m.clone(),
                prompt_template: m.clone(),
                mel: m.clone(),
                projector: m,
                encoder_layers: None,
                lora: None,
            },
        }
    }

    fn tensors(v: f32) -> HashMap<String, Tensor> {
        HashMap::from([("w".to_string(), Tensor::new(&[v, v], &Device::Cpu).unwrap())])
    }

    fn saved_value(ckpt: &Path) -> (u64, f32) {
        let l = load(ckpt, &Device::Cpu).unwrap();
        let w: Vec<f32> = l.projector["w"].to_vec1().unwrap();
        (l.state.samples_seen, w[0])
    }

    #[test]
    fn saving_the_same_step_twice_replaces_it_whole_at_every_point() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let first = save(dir, &state(3, 30), &tensors(1.0), &tensors(0.0), 3).unwrap();
        assert_eq!(saved_value(&first), (30, 1.0));
        // A second save of step 3 replaces the first.
        save(dir, &state(3, 31), &tensors(2.0), &tensors(0.0), 3).unwrap();
        assert_eq!(saved_value(&latest(dir).unwrap().unwrap()), (31, 2.0));
        // Stopped (as a kill would) at each point of a third save of step 3: step 3 is
        // always a whole checkpoint, the old one or the new one.
        for (stage, expect) in [
            (WriteStage::FilesWritten, (31, 2.0)),
            (WriteStage::StateWritten, (31, 2.0)),
            (WriteStage::Swapped, (32, 3.0)),
            (WriteStage::Renamed, (32, 3.0)),
        ] {
            save(dir, &state(3, 31), &tensors(2.0), &tensors(0.0), 3).unwrap();
            let r = save_stopping(
                dir,
                &state(3, 32),
                &tensors(3.0),
                &tensors(0.0),
                3,
                Some((stage, 3)),
            );
            assert!(r.is_err(), "{stage:?}");
            let newest = latest(dir).unwrap().unwrap();
            assert!(newest.ends_with("step-00000003"), "{stage:?}");
            assert_eq!(saved_value(&newest), expect, "{stage:?}");
        }
        // The leftover of a stopped write never counts and is cleared by the next save.
        save(dir, &state(4, 40), &tensors(4.0), &tensors(0.0), 3).unwrap();
        save(dir, &state(3, 33), &tensors(5.0), &tensors(0.0), 3).unwrap();
        let names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".partial")), "{names:?}");
        assert_eq!(saved_value(&latest(dir).unwrap().unwrap()), (40, 4.0));
    }
}
