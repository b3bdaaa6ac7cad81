//! Dataset adapter for the LibriSpeech layout: `<split>/<speaker>/<chapter>/` folders each
//! holding `<speaker>-<chapter>.trans.txt` (lines `<utterance-id> <TEXT>`) and
//! `<utterance-id>.flac`. Every folder of the dataset root that holds such speaker folders
//! is a split named after it (`dev-clean`, `train-clean-100`, ...); a root that is itself
//! one split folder gives the split `all`. Examples: the audio path, the transcript as the
//! target, metadata `speaker`, `chapter`, `transcript`. A transcript line without its audio,
//! or that does not parse, is a warning naming the file and line.
//! Options (JSON): {"splits": {"train": "train-clean-100", "eval": "dev-clean"}} renames or
//! picks splits; {"lowercase": true} lower-cases the targets (LibriSpeech is upper case).

use std::collections::BTreeMap;

use earshot_plugin_sdk::*;

#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    splits: Option<BTreeMap<String, String>>,
    lowercase: Option<bool>,
}

fn sorted_dirs(abs: &str) -> Result<Vec<String>, PluginError> {
    let mut out: Vec<String> = std::fs::read_dir(abs)
        .map_err(|e| error(ErrorCode::Io, format!("listing {abs}: {e}")))?
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    out.sort();
    Ok(out)
}

fn is_speaker_folder(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_digit())
}

/// The examples of one split folder (`rel` below the root, "" for the root itself).
fn read_split(
    rel: &str,
    lowercase: bool,
    warnings: &mut Vec<String>,
) -> Result<Vec<Example>, PluginError> {
    let join = |a: &str, b: &str| {
        if a.is_empty() {
            b.to_string()
        } else {
            format!("{a}/{b}")
        }
    };
    let mut out = Vec::new();
    for speaker in sorted_dirs(&format!("{DATA_ROOT}/{rel}"))? {
        if !is_speaker_folder(&speaker) {
            continue;
        }
        let sp = join(rel, &speaker);
        for chapter in sorted_dirs(&format!("{DATA_ROOT}/{sp}"))? {
            let ch = join(&sp, &chapter);
            let trans = format!("{ch}/{speaker}-{chapter}.trans.txt");
            let text = match std::fs::read_to_string(format!("{DATA_ROOT}/{trans}")) {
                Ok(t) => t,
                Err(e) => {
                    warnings.push(format!("{trans}: {e}; chapter left out"));
                    continue;
                }
            };
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() {
                    continue;
                }
                let Some((id, said)) = line.split_once(' ') else {
                    warnings.push(format!(
                        "{trans}:{}: no transcript after the id; skipped",
                        i + 1
                    ));
                    continue;
                };
                if !id.starts_with(&format!("{speaker}-{chapter}-"))
                    || !id.chars().all(|c| c.is_ascii_digit() || c == '-')
                {
                    warnings.push(format!(
                        "{trans}:{}: utterance id {id:?} is not {speaker}-{chapter}-N; skipped",
                        i + 1
                    ));
                    continue;
                }
                let audio = format!("{ch}/{id}.flac");
                if std::fs::metadata(format!("{DATA_ROOT}/{audio}")).is_err() {
                    warnings.push(format!(
                        "{trans}:{}: audio {audio} not found; skipped",
                        i + 1
                    ));
                    continue;
                }
                let said = said.trim().to_string();
                let target = if lowercase {
                    said.to_lowercase()
                } else {
                    said.clone()
                };
                let kv = |k: &str, v: &str| KeyValue {
                    key: k.into(),
                    value: v.into(),
                };
                out.push(Example {
                    id: id.to_string(),
                    audio: AudioSource::Path(audio),
                    start_s: None,
                    end_s: None,
                    target: Some(target),
                    references: Vec::new(),
                    metadata: vec![
                        kv("speaker", &speaker),
                        kv("chapter", &chapter),
                        kv("transcript", &said),
                    ],
                });
            }
        }
    }
    Ok(out)
}

struct LibriSpeech;

impl Plugin for LibriSpeech {
    fn info() -> PluginInfo {
        info(
            "librispeech",
            env!("CARGO_PKG_VERSION"),
            &[Role::DatasetAdapter],
            "LibriSpeech layout: speaker/chapter folders with .trans.txt and .flac, a split per top folder",
        )
    }

    fn open(options: String) -> Result<DatasetInfo, PluginError> {
        let o: Options = parse_options(&options)?;
        let lowercase = o.lowercase.unwrap_or(false);
        let mut warnings = Vec::new();
        let top = sorted_dirs(DATA_ROOT)?;
        let folders: BTreeMap<String, String> = match o.splits {
            Some(map) => {
                for (split, folder) in &map {
                    if folder.split('/').any(|c| c == ".." || c.is_empty()) {
                        return Err(error(
                            ErrorCode::InvalidInput,
                            format!("splits.{split}: {folder:?} must be a folder inside the dataset root"),
                        ));
                    }
                }
                map
            }
            None if top.iter().any(|d| is_speaker_folder(d)) => {
                BTreeMap::from([("all".to_string(), String::new())])
            }
            None => top
                .iter()
                .filter(|d| {
                    sorted_dirs(&format!("{DATA_ROOT}/{d}"))
                        .map(|s| s.iter().any(|x| is_speaker_folder(x)))
                        .unwrap_or(false)
                })
                .map(|d| (d.clone(), d.clone()))
                .collect(),
        };
        if folders.is_empty() {
            return Err(error(
                ErrorCode::NotFound,
                "no LibriSpeech split folders (speaker/chapter/*.trans.txt) in the dataset root",
            ));
        }
        let mut splits = BTreeMap::new();
        for (split, folder) in folders {
            splits.insert(split, read_split(&folder, lowercase, &mut warnings)?);
        }
        let names = hold_splits(splits);
        Ok(DatasetInfo {
            splits: names,
            warnings,
        })
    }

    fn read(split: String, start: u64, max: u32) -> Result<Batch, PluginError> {
        read_held(&split, start, max)
    }
}

export_plugin!(LibriSpeech);
