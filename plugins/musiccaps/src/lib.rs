//! MusicCaps dataset adapter for the public CSV (ytid, start_s, end_s,
//! audioset_positive_labels, aspect_list, caption, author_id, is_balanced_subset,
//! is_audioset_eval). Splits: `test` (the rows with is_audioset_eval), `valid` (a seeded
//! `valid_fraction` of the other clips, by YouTube id) and `train` (the rest).
//!
//! Options (JSON, all optional):
//!   {"csv": "musiccaps-public.csv",
//!    "audio_pattern": "{ytid}.wav",   // where a clip's audio is, relative to the root
//!    "clipped": true,                 // files hold just the 10 s clip; false: whole
//!                                     // recordings, cut with start_s/end_s
//!    "valid_fraction": 0.1,           // share of the non-eval clips held out for valid
//!    "seed": 0}                       // which of them
//! Malformed rows are reported with their line number; rows whose audio file is missing
//! are reported and skipped. Neither stops the run.

use std::cell::RefCell;

use earshot_plugin_sdk::*;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Options {
    csv: String,
    audio_pattern: String,
    clipped: bool,
    valid_fraction: f64,
    seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            csv: "musiccaps-public.csv".into(),
            audio_pattern: "{ytid}.wav".into(),
            clipped: true,
            valid_fraction: 0.1,
            seed: 0,
        }
    }
}

const COLUMNS: [&str; 9] = [
    "ytid",
    "start_s",
    "end_s",
    "audioset_positive_labels",
    "aspect_list",
    "caption",
    "author_id",
    "is_balanced_subset",
    "is_audioset_eval",
];

thread_local! {
    static SPLITS: RefCell<Option<Splits>> = const { RefCell::new(None) };
}

struct Splits {
    train: Vec<Example>,
    valid: Vec<Example>,
    test: Vec<Example>,
}

/// FNV-1a of the seed and a YouTube id, in [0, 1): which clips go to valid.
fn unit_hash(seed: u64, id: &str) -> f64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x0000_0100_0000_01b3);
    for b in id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % 1_000_000) as f64 / 1_000_000.0
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim() {
        "True" | "true" | "1" => Some(true),
        "False" | "false" | "0" => Some(false),
        _ => None,
    }
}

struct MusicCaps;

impl Plugin for MusicCaps {
    fn info() -> PluginInfo {
        info(
            "musiccaps",
            env!("CARGO_PKG_VERSION"),
            &[Role::DatasetAdapter],
            "Google MusicCaps (public CSV + audio files found by ytid)",
        )
    }

    fn open(options: String) -> Result<DatasetInfo, PluginError> {
        let o: Options = parse_options(&options)?;
        if !(0.0..1.0).contains(&o.valid_fraction) {
            return Err(error(
                ErrorCode::InvalidInput,
                format!("valid_fraction: {} is not in [0, 1)", o.valid_fraction),
            ));
        }
        if !o.audio_pattern.contains("{ytid}") {
            return Err(error(
                ErrorCode::InvalidInput,
                "audio_pattern must contain {ytid}",
            ));
        }
        let path = format!("{DATA_ROOT}/{}", o.csv);
        let file = std::fs::File::open(&path)
            .map_err(|e| error(ErrorCode::NotFound, format!("{}: {e}", o.csv)))?;
        let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(file);
        let headers = reader
            .headers()
            .map_err(|e| error(ErrorCode::InvalidInput, format!("{}: header: {e}", o.csv)))?
            .clone();
        let col = |name: &str| headers.iter().position(|h| h.trim() == name);
        let mut idx = [0usize; 9];
        for (i, name) in COLUMNS.iter().enumerate() {
            idx[i] = col(name).ok_or_else(|| {
                error(
                    ErrorCode::InvalidInput,
                    format!("{}: no column {name:?}", o.csv),
                )
            })?;
        }
        let mut splits = Splits {
            train: Vec::new(),
            valid: Vec::new(),
            test: Vec::new(),
        };
        let mut warnings = Vec::new();
        for record in reader.records() {
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    let line = e.position().map_or(0, |p| p.line());
                    warnings.push(format!("{}:{line}: unreadable row ({e}); skipped", o.csv));
                    continue;
                }
            };
            let line = record.position().map_or(0, |p| p.line());
            if record.len() != headers.len() {
                warnings.push(format!(
                    "{}:{line}: {} fields, expected {}; skipped",
                    o.csv,
                    record.len(),
                    headers.len()
                ));
                continue;
            }
            let f = |i: usize| record.get(idx[i]).unwrap_or("").to_string();
            let ytid = f(0);
            let (start, end) = (f(1).trim().parse::<f64>(), f(2).trim().parse::<f64>());
            let (Ok(start), Ok(end)) = (start, end) else {
                warnings.push(format!(
                    "{}:{line}: start_s/end_s are not numbers; skipped",
                    o.csv
                ));
                continue;
            };
            let Some(is_eval) = parse_bool(&f(8)) else {
                warnings.push(format!(
                    "{}:{line}: is_audioset_eval is {:?}, not True/False; skipped",
                    o.csv,
                    f(8)
                ));
                continue;
            };
            if ytid.trim().is_empty() || ytid.contains('/') || ytid.contains("..") {
                warnings.push(format!("{}:{line}: bad ytid {ytid:?}; skipped", o.csv));
                continue;
            }
            let audio = o.audio_pattern.replace("{ytid}", &ytid);
            if std::fs::metadata(format!("{DATA_ROOT}/{audio}")).is_err() {
                warnings.push(format!(
                    "{}:{line}: audio {audio} not found; skipped",
                    o.csv
                ));
                continue;
            }
            let metadata = [0usize, 1, 2, 3, 4, 6, 7, 8]
                .iter()
                .map(|&i| KeyValue {
                    key: COLUMNS[i].into(),
                    value: f(i),
                })
                .collect();
            let example = Example {
                id: ytid,
                audio: AudioSource::Path(audio),
                start_s: (!o.clipped).then_some(start),
                end_s: (!o.clipped).then_some(end),
                target: Some(f(5)),
                references: Vec::new(),
                metadata,
            };
            // A YouTube id is one recording: all its rows fall on one side.
            if is_eval {
                splits.test.push(example);
            } else if unit_hash(o.seed, &example.id) < o.valid_fraction {
                splits.valid.push(example);
            } else {
                splits.train.push(example);
            }
        }
        SPLITS.with(|s| *s.borrow_mut() = Some(splits));
        Ok(DatasetInfo {
            splits: vec!["train".into(), "valid".into(), "test".into()],
            warnings,
        })
    }

    fn read(split: String, start: u64, max: u32) -> Result<Batch, PluginError> {
        SPLITS.with(|s| {
            let s = s.borrow();
            let s = s
                .as_ref()
                .ok_or_else(|| error(ErrorCode::InvalidInput, "read before open"))?;
            let examples = match split.as_str() {
                "train" => &s.train,
                "valid" => &s.valid,
                "test" => &s.test,
                other => {
                    return Err(error(
                        ErrorCode::NotFound,
                        format!("no split {other:?} (have: train, valid, test)"),
                    ))
                }
            };
            Ok(page(examples, start, max))
        })
    }
}

export_plugin!(MusicCaps);
