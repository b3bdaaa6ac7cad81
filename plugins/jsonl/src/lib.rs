//! Generic JSON-lines dataset adapter. Every `*.jsonl` file in the dataset root is a split
//! named after the file (`train.jsonl` -> `train`), unless options name the files.
//! Each line is an object:
//!   {"id": "...", "audio": "relative/path.wav", "start": 1.5, "end": 9.0,
//!    "text": "target caption", "references": ["...", "..."], ...other keys -> metadata}
//! `id` defaults to `<split>:<line>`; the target is `text`, `caption` or `target`.
//! Options (JSON): {"files": {"train": "a.jsonl"}, "check_audio": true}.
//! Lines that are not valid, and examples whose audio file is missing, are reported as
//! warnings with file and line number, and skipped.

use std::collections::BTreeMap;

use earshot_plugin_sdk::*;
use serde_json::Value;

#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    files: Option<BTreeMap<String, String>>,
    check_audio: Option<bool>,
}

fn parse_line(v: &Value, split: &str, line: usize) -> Result<Example, String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    let audio = obj
        .get("audio")
        .and_then(|a| a.as_str())
        .ok_or("missing string field \"audio\"")?;
    let num = |k: &str| -> Result<Option<f64>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or(format!("\"{k}\" is not a number")),
        }
    };
    let target = ["text", "caption", "target"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(|v| v.as_str()))
        .map(str::to_string);
    let references = match obj.get("references") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect(),
        Some(_) => return Err("\"references\" is not a list".into()),
    };
    let id = match obj.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => format!("{split}:{line}"),
    };
    let known = [
        "id",
        "audio",
        "start",
        "end",
        "text",
        "caption",
        "target",
        "references",
    ];
    let metadata = obj
        .iter()
        .filter(|(k, _)| !known.contains(&k.as_str()))
        .map(|(k, v)| KeyValue {
            key: k.clone(),
            value: match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            },
        })
        .collect();
    Ok(Example {
        id,
        audio: AudioSource::Path(audio.to_string()),
        start_s: num("start")?,
        end_s: num("end")?,
        target,
        references,
        metadata,
    })
}

struct Jsonl;

impl Plugin for Jsonl {
    fn info() -> PluginInfo {
        info(
            "jsonl",
            env!("CARGO_PKG_VERSION"),
            &[Role::DatasetAdapter],
            "JSON-lines dataset: one example per line, one split per file",
        )
    }

    fn open(options: String) -> Result<DatasetInfo, PluginError> {
        let o: Options = parse_options(&options)?;
        let files = match o.files {
            Some(f) => f,
            None => {
                let mut f = BTreeMap::new();
                let dir = std::fs::read_dir(DATA_ROOT)
                    .map_err(|e| error(ErrorCode::Io, format!("listing the dataset root: {e}")))?;
                for entry in dir.flatten() {
                    let name = entry.file_name().to_string_lossy().to_string();
                    if let Some(stem) = name.strip_suffix(".jsonl") {
                        f.insert(stem.to_string(), name);
                    }
                }
                if f.is_empty() {
                    return Err(error(
                        ErrorCode::NotFound,
                        "no *.jsonl files in the dataset root",
                    ));
                }
                f
            }
        };
        let mut warnings = Vec::new();
        let mut splits = BTreeMap::new();
        for (split, file) in files {
            let text = std::fs::read_to_string(format!("{DATA_ROOT}/{file}"))
                .map_err(|e| error(ErrorCode::NotFound, format!("{file}: {e}")))?;
            let mut examples = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let n = i + 1;
                if line.trim().is_empty() {
                    continue;
                }
                let parsed = serde_json::from_str::<Value>(line)
                    .map_err(|e| e.to_string())
                    .and_then(|v| parse_line(&v, &split, n));
                match parsed {
                    Ok(ex) => {
                        if o.check_audio.unwrap_or(true) {
                            if let AudioSource::Path(p) = &ex.audio {
                                if std::fs::metadata(format!("{DATA_ROOT}/{p}")).is_err() {
                                    warnings.push(format!(
                                        "{file}:{n}: audio file {p} not found; skipped"
                                    ));
                                    continue;
                                }
                            }
                        }
                        examples.push(ex);
                    }
                    Err(e) => warnings.push(format!("{file}:{n}: {e}; skipped")),
                }
            }
            splits.insert(split, examples);
        }
        Ok(DatasetInfo {
            splits: hold_splits(splits),
            warnings,
        })
    }

    fn read(split: String, start: u64, max: u32) -> Result<Batch, PluginError> {
        read_held(&split, start, max)
    }
}

export_plugin!(Jsonl);
