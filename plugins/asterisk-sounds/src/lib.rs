//! Dataset adapter for Asterisk's voice prompts (Debian `asterisk-core-sounds-<lang>-wav`,
//! CC-BY-SA-3.0): one professional speaker reading telephone-system prompts ("Please enter
//! your password followed by the pound key."), digits, letters and the phonetic alphabet,
//! with the text of every prompt in the package's list `core-sounds-<lang>.txt` (Debian
//! ships it gzipped in `asterisk-core-sounds-<lang>`; `.txt` and `.txt.gz` both read).
//! Each line of the list is `<name>: <text>`, `<name>` the clip's path below the audio
//! folder without `.wav` (`digits/7`, `vm-intro`).
//!
//! Each clip is an example with metadata `transcript` (the text without its bracketed or
//! parenthesised notes: `at [@]` -> `at`, `... (simple tone sound plays)` -> `...`),
//! `language_code` (from the list's name), `prompt` (the name), `folder` (`digits`,
//! `letters`, ... or `prompts` for the top level) and `seconds`. Entries whose whole text is
//! a note (`[this is a simple beep tone]`, `(1 second of silence)`) are not speech and are
//! left out; so are clips longer than `max_seconds` (training hears one 30 s window), names
//! without a clip and clips without a name, each reported in a warning.
//!
//! Splits `train`, `valid` and `test` by content (the SDK's `ContentGroups`): clips with the
//! same audio bytes, the same normalised transcript, or the same first six words of a
//! transcript of eight words or more (the conference menus come in near-identical variants)
//! form one group, and a group falls on one side by a seeded hash. So no split hears a
//! recording, a sentence or a near-copy of a sentence of another.
//!
//! Options (JSON, all optional): {"transcripts": "core-sounds-en.txt.gz" (default: the one
//! `core-sounds-*.txt[.gz]` at the root), "audio_dir": "en_US_f_Allison" (default: the
//! root), "caption": "{transcript}", "test_fraction": 0.2, "valid_fraction": 0.1, "seed": 0,
//! "max_seconds": 30.0, "max_per_split": null}.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use earshot_plugin_sdk::*;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Options {
    transcripts: Option<String>,
    audio_dir: String,
    caption: String,
    test_fraction: f64,
    valid_fraction: f64,
    seed: u64,
    max_seconds: f64,
    max_per_split: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            transcripts: None,
            audio_dir: String::new(),
            caption: "{transcript}".into(),
            test_fraction: 0.2,
            valid_fraction: 0.1,
            seed: 0,
            max_seconds: 30.0,
            max_per_split: None,
        }
    }
}

/// The largest transcript list read (Asterisk's English one is 60 kB unpacked).
const MAX_LIST_BYTES: u64 = 16 << 20;

/// A path inside the dataset root: relative, no `..`, no empty or absolute parts.
fn safe_relative(what: &str, rel: &str) -> Result<(), PluginError> {
    let bad = rel.starts_with('/')
        || rel.contains('\\')
        || rel
            .split('/')
            .any(|p| p == ".." || p.is_empty() && !rel.is_empty());
    if bad {
        return Err(error(
            ErrorCode::InvalidInput,
            format!("{what}: {rel:?} is not a plain path inside the dataset root"),
        ));
    }
    Ok(())
}

fn under_root(rel: &str) -> String {
    if rel.is_empty() || rel == "." {
        DATA_ROOT.to_string()
    } else {
        format!("{DATA_ROOT}/{rel}")
    }
}

/// The transcript list's name: the option, or the one `core-sounds-*.txt[.gz]` at the root.
fn find_list(o: &Options) -> Result<String, PluginError> {
    if let Some(t) = &o.transcripts {
        safe_relative("transcripts", t)?;
        return Ok(t.clone());
    }
    let mut found = root_files(|n| {
        n.starts_with("core-sounds-") && (n.ends_with(".txt") || n.ends_with(".txt.gz"))
    })?;
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(error(
            ErrorCode::NotFound,
            "no core-sounds-<lang>.txt[.gz] at the dataset root; name the transcript list with the \"transcripts\" option",
        )),
        _ => Err(error(
            ErrorCode::InvalidInput,
            format!(
                "several transcript lists at the dataset root ({}); pick one with the \"transcripts\" option",
                found.join(", ")
            ),
        )),
    }
}

/// The list's text, gunzipped when its name ends in `.gz`, at most [`MAX_LIST_BYTES`].
fn read_list(name: &str) -> Result<String, PluginError> {
    let path = under_root(name);
    let file =
        std::fs::File::open(&path).map_err(|e| error(ErrorCode::Io, format!("{name}: {e}")))?;
    let mut bytes = Vec::new();
    let read = if name.ends_with(".gz") {
        flate2::read::GzDecoder::new(file)
            .take(MAX_LIST_BYTES + 1)
            .read_to_end(&mut bytes)
    } else {
        file.take(MAX_LIST_BYTES + 1).read_to_end(&mut bytes)
    };
    read.map_err(|e| error(ErrorCode::InvalidInput, format!("{name}: {e}")))?;
    if bytes.len() as u64 > MAX_LIST_BYTES {
        return Err(error(
            ErrorCode::InvalidInput,
            format!("{name}: more than {MAX_LIST_BYTES} bytes of text"),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|e| error(ErrorCode::InvalidInput, format!("{name}: not UTF-8: {e}")))
}

/// `core-sounds-en.txt.gz` -> `en`.
fn language_of(list: &str) -> String {
    let file = list.rsplit('/').next().unwrap_or(list);
    file.strip_prefix("core-sounds-")
        .and_then(|r| r.split('.').next())
        .filter(|c| !c.is_empty())
        .unwrap_or("und")
        .to_string()
}

/// The spoken text of a list entry: bracketed and parenthesised notes removed, whitespace
/// collapsed; None when nothing with a letter or digit is left (the entry is a note only).
fn spoken(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '[' | '(' => depth += 1,
            ']' | ')' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    let said = out.split_whitespace().collect::<Vec<_>>().join(" ");
    said.chars().any(char::is_alphanumeric).then_some(said)
}

/// `(name, text)` per entry of the list, in its order; comments (`;`) and blank lines
/// skipped, lines without `name: text` reported.
fn entries(list: &str, warnings: &mut Vec<String>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, line) in list.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with(';') {
            continue;
        }
        match line.split_once(':') {
            Some((name, text)) if !name.trim().is_empty() => {
                out.push((name.trim().to_string(), text.trim().to_string()))
            }
            _ => warnings.push(format!("line {}: not `name: text`; left out", i + 1)),
        }
    }
    out
}

/// Seconds of audio in a PCM WAV file, from its header; None when it is not one.
fn wav_seconds(bytes: &[u8]) -> Option<f64> {
    if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return None;
    }
    let mut at = 12;
    let mut byte_rate = None;
    while at + 8 <= bytes.len() {
        let id = &bytes[at..at + 4];
        let size = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().ok()?) as usize;
        let body = at + 8;
        if id == b"fmt " && size >= 16 && body + 16 <= bytes.len() {
            byte_rate = Some(u32::from_le_bytes(
                bytes[body + 8..body + 12].try_into().ok()?,
            ));
        } else if id == b"data" {
            let rate = byte_rate.filter(|&r| r > 0)?;
            let data = size.min(bytes.len() - body);
            return Some(data as f64 / rate as f64);
        }
        at = body.checked_add(size)?.checked_add(size & 1)?;
    }
    None
}

/// Every `.wav` below `dir` (relative to the root), as names without the extension,
/// relative to `dir`.
fn walk(dir: &str, rel: &str, out: &mut BTreeSet<String>) -> Result<(), PluginError> {
    let joined = match (dir.is_empty(), rel.is_empty()) {
        (_, true) => dir.to_string(),
        (true, false) => rel.to_string(),
        (false, false) => format!("{dir}/{rel}"),
    };
    let abs = under_root(&joined);
    let listing =
        std::fs::read_dir(&abs).map_err(|e| error(ErrorCode::Io, format!("listing {abs}: {e}")))?;
    for e in listing.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let path = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(dir, &path, out)?;
        } else if let Some(stem) = path.strip_suffix(".wav") {
            out.insert(stem.to_string());
        }
    }
    Ok(())
}

/// At most ten names, then how many more.
fn some(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(10)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 10 {
        s.push_str(&format!(" and {} more", names.len() - 10));
    }
    s
}

type Splits = BTreeMap<String, Vec<Example>>;

fn build(o: &Options) -> Result<(Splits, Vec<String>), PluginError> {
    if let Some(problem) = split_fractions_problem(o.test_fraction, o.valid_fraction) {
        return Err(error(ErrorCode::InvalidInput, problem));
    }
    if o.max_seconds.is_nan() || o.max_seconds <= 0.0 {
        return Err(error(
            ErrorCode::InvalidInput,
            format!("max_seconds: {} is not a positive number", o.max_seconds),
        ));
    }
    safe_relative("audio_dir", &o.audio_dir)?;
    let audio_dir = o.audio_dir.trim_end_matches('/').trim_start_matches("./");
    let audio_dir = if audio_dir == "." { "" } else { audio_dir };
    let list_name = find_list(o)?;
    let code = language_of(&list_name);
    let mut warnings = Vec::new();
    let listed = entries(&read_list(&list_name)?, &mut warnings);
    if listed.is_empty() {
        return Err(error(
            ErrorCode::InvalidInput,
            format!("{list_name}: no `name: text` entries"),
        ));
    }
    let mut clips = BTreeSet::new();
    walk(audio_dir, "", &mut clips)?;
    let (mut notes, mut missing, mut long) = (Vec::new(), Vec::new(), Vec::new());
    let mut seen = BTreeSet::new();
    let mut groups = ContentGroups::default();
    let mut examples = Vec::new();
    for (name, text) in listed {
        if !seen.insert(name.clone()) {
            warnings.push(format!("{list_name}: {name} listed twice; the first kept"));
            continue;
        }
        let Some(said) = spoken(&text) else {
            notes.push(name);
            continue;
        };
        if !clips.contains(&name) {
            missing.push(name);
            continue;
        }
        let rel = if audio_dir.is_empty() {
            format!("{name}.wav")
        } else {
            format!("{audio_dir}/{name}.wav")
        };
        let bytes = std::fs::read(under_root(&rel))
            .map_err(|e| error(ErrorCode::Io, format!("reading {rel}: {e}")))?;
        let seconds = wav_seconds(&bytes);
        if seconds.is_some_and(|s| s > o.max_seconds) {
            long.push(format!("{name} ({:.1} s)", seconds.unwrap_or_default()));
            continue;
        }
        let target = o
            .caption
            .replace("{transcript}", &said)
            .replace("{language_code}", &code);
        let normal = normalized_text(&said);
        let mut keys = vec![
            format!("audio:{}", audio_content_hash(&bytes)),
            format!("text:{normal}"),
        ];
        let words: Vec<&str> = normal.split(' ').collect();
        if words.len() >= 8 {
            keys.push(format!("lead:{}", words[..6].join(" ")));
        }
        groups.add(&keys);
        let folder = match name.rsplit_once('/') {
            Some((f, _)) => f.to_string(),
            None => "prompts".to_string(),
        };
        let kv = |k: &str, v: String| KeyValue {
            key: k.into(),
            value: v,
        };
        let mut metadata = vec![
            kv("transcript", said),
            kv("language_code", code.clone()),
            kv("prompt", name.clone()),
            kv("folder", folder),
        ];
        if let Some(s) = seconds {
            metadata.push(kv("seconds", format!("{s:.3}")));
        }
        examples.push(Example {
            id: name,
            audio: AudioSource::Path(rel),
            start_s: None,
            end_s: None,
            target: Some(target),
            references: Vec::new(),
            metadata,
        });
    }
    if examples.is_empty() {
        return Err(error(
            ErrorCode::NotFound,
            format!(
                "no entry of {list_name} has a .wav clip under {} (set \"audio_dir\" to the folder holding the clips)",
                if audio_dir.is_empty() { "the root" } else { audio_dir }
            ),
        ));
    }
    if !notes.is_empty() {
        warnings.push(format!(
            "{} entries are notes, not speech; left out: {}",
            notes.len(),
            some(&notes)
        ));
    }
    if !missing.is_empty() {
        warnings.push(format!(
            "{} listed names have no .wav clip; left out: {}",
            missing.len(),
            some(&missing)
        ));
    }
    if !long.is_empty() {
        warnings.push(format!(
            "{} clips are longer than max_seconds {}; left out: {}",
            long.len(),
            o.max_seconds,
            some(&long)
        ));
    }
    let unlisted: Vec<String> = clips.difference(&seen).cloned().collect();
    if !unlisted.is_empty() {
        warnings.push(format!(
            "{} clips are not in {list_name}; left out: {}",
            unlisted.len(),
            some(&unlisted)
        ));
    }
    let held = [("test", o.test_fraction), ("valid", o.valid_fraction)];
    let sides = groups.assign(o.seed, &held, "train");
    let mut splits: Splits = ["train", "valid", "test"]
        .iter()
        .map(|s| (s.to_string(), Vec::new()))
        .collect();
    for (example, side) in examples.into_iter().zip(sides) {
        splits.get_mut(side).unwrap().push(example);
    }
    if let Some(cap) = o.max_per_split {
        for examples in splits.values_mut() {
            let n = examples.len();
            if n > cap {
                let keep: BTreeSet<usize> = (0..cap).map(|k| k * n / cap).collect();
                let all = std::mem::take(examples);
                *examples = all
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, e)| keep.contains(&i).then_some(e))
                    .collect();
            }
        }
    }
    Ok((splits, warnings))
}

struct AsteriskSounds;

impl Plugin for AsteriskSounds {
    fn info() -> PluginInfo {
        info(
            "asterisk-sounds",
            env!("CARGO_PKG_VERSION"),
            &[Role::DatasetAdapter],
            "Asterisk's voice prompts: one speaker's telephone prompts, digits and letters with their text, split by content",
        )
    }

    fn open(options: String) -> Result<DatasetInfo, PluginError> {
        let o: Options = parse_options(&options)?;
        let (splits, warnings) = build(&o)?;
        Ok(DatasetInfo {
            splits: hold_splits(splits),
            warnings,
        })
    }

    fn read(split: String, start: u64, max: u32) -> Result<Batch, PluginError> {
        read_held(&split, start, max)
    }
}

export_plugin!(AsteriskSounds);
