//! Examples from a dataset adapter: the dataset opened with its split checks and warnings,
//! and each example's audio (a path beneath the dataset root, or inline bytes) decoded.

use std::path::{Component, Path, PathBuf};

use super::error::{io, PipelineError, Result};
use crate::audio::{self, Segment};
use crate::config::RunConfig;
use crate::plugins::{AudioSource, DatasetAdapter, Example, PluginHost};

/// The run config's dataset adapter opened on its root, its warnings logged, and each of
/// `splits` checked to exist (an error lists the splits there are).
pub fn open_dataset(
    host: &PluginHost,
    config: &RunConfig,
    splits: &[&str],
) -> Result<DatasetAdapter> {
    let data = &config.data;
    let adapter = DatasetAdapter::open(host, &data.adapter, &data.root, &data.options)?;
    for w in &adapter.dataset.warnings {
        tracing::warn!("dataset: {w}");
    }
    for split in splits {
        adapter
            .require_split(split)
            .map_err(|cause| PipelineError::Dataset {
                root: data.root.clone(),
                cause,
            })?;
    }
    Ok(adapter)
}

/// Opens an audio path from an (untrusted) adapter beneath `root` with the rule the plugin's
/// own /data view follows: no `..`, no absolute path, and no symbolic link that leads out
/// of the root (links that stay inside it are followed). Returns the file and the path to
/// name it by.
pub fn open_beneath(root: &Path, rel: &str) -> Result<(std::fs::File, PathBuf)> {
    let p = Path::new(rel);
    if p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(PipelineError::LeavesRoot(rel.to_string()));
    }
    let shown = root.join(p);
    let dir = cap_std::fs::Dir::open_ambient_dir(root, cap_std::ambient_authority())
        .map_err(io(root, "cannot open the dataset root"))?;
    let mut options = cap_std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        // A FIFO in the root would otherwise block the open until a writer came.
        use cap_std::fs::OpenOptionsExt;
        options.custom_flags(crate::files::OPEN_NONBLOCK);
    }
    let file = dir.open_with(p, &options).map_err(|cause| {
        if cause.kind() == std::io::ErrorKind::NotFound {
            PipelineError::Io {
                path: shown.clone(),
                action: "cannot open",
                cause,
            }
        } else {
            PipelineError::OutsideRoot {
                path: shown.clone(),
                root: root.to_path_buf(),
                cause,
            }
        }
    })?;
    let file = file.into_std();
    crate::files::ensure_regular(&file).map_err(|cause| PipelineError::Io {
        path: shown.clone(),
        action: "cannot open",
        cause,
    })?;
    Ok((file, shown))
}

/// How an example's audio is named in output and errors.
pub fn audio_label(ex: &Example, root: &Path) -> String {
    match &ex.audio {
        AudioSource::Path(rel) => root.join(rel).display().to_string(),
        AudioSource::Inline(b) => format!("<{} inline bytes>", b.len()),
    }
}

/// The 16 kHz mono samples of `segment` of an example's audio (a file beneath `root`, or
/// inline bytes), refused past `max_audio_s` seconds.
pub fn load_example_audio(
    ex: &Example,
    root: &Path,
    segment: Segment,
    max_audio_s: f64,
) -> Result<Vec<f32>> {
    let (encoded, shown): (audio::Encoded, PathBuf) = match &ex.audio {
        AudioSource::Path(rel) => {
            let (file, shown) = open_beneath(root, rel)?;
            (file.into(), shown)
        }
        AudioSource::Inline(bytes) => (
            bytes.clone().into(),
            PathBuf::from(format!("example {}: inline audio", ex.id)),
        ),
    };
    let decoded = audio::decode_file_mono(encoded, &shown, segment, Some(max_audio_s))?;
    Ok(audio::to_16k(&shown, decoded)?)
}

/// The segment of its audio an example asks for.
pub fn example_segment(ex: &Example) -> Segment {
    Segment {
        start: ex.start_s,
        end: ex.end_s,
    }
}

/// The part of an example's segment that its first encoder window covers, and one sample
/// more (to know whether the clip goes on): all that training decodes.
pub fn first_window_segment(ex: &Example) -> Segment {
    let start = ex.start_s.unwrap_or(0.0);
    let first_window_end = start + crate::mel::WINDOW_S + 1e-3;
    Segment {
        start: ex.start_s,
        end: Some(
            ex.end_s
                .map_or(first_window_end, |e| e.min(first_window_end)),
        ),
    }
}
