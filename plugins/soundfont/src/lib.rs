//! SoundFont dataset adapter: every recorded sample of a SoundFont 2 file (`.sf2`) as an
//! example with inline WAV audio, labelled by the General MIDI family of the presets that
//! play it, its root key and register. Splits `train`, `valid` and `test` are by groups of
//! presets that share recordings, so no recording of one split is played by a preset of
//! another.
//!
//! Options (JSON, all optional):
//!   {"file": "FluidR3_GM.sf2",           // default: the only *.sf2 in the dataset root
//!    "families": ["piano", "organ", ...], // GM families kept (default: the eight below)
//!    "test_fraction": 0.25,               // share of each family's recordings in test
//!                                         // (old name: eval_fraction)
//!    "valid_fraction": 0.1,               // share in valid (chooses the checkpoint)
//!    "seed": 0,                           // which preset groups are held out
//!    "min_duration_s": 1.0,               // looped samples are played out to this length
//!    "max_duration_s": 4.0,               // longer recordings are cut (with a fade)
//!    "register_bounds": [52, 72],         // root key < 52: low, >= 72: high, else middle
//!    "max_per_family": null,              // cap on each family's recordings per split
//!    "train_transpose": [],               // train also plays each recording this many
//!                                         // semitones up or down (e.g. [-5, 5])
//!    "train_files": [],                   // other SoundFonts (paths in the dataset root)
//!                                         // whose recordings all go to train
//!    "caption": "A {family} note in the {register} register."}
//! Metadata: family, preset, program, root_key, key (the key played), note, register,
//! transpose, duration_s, sample_rate.
//!
//! `train_transpose` plays the training split's recordings at other keys too, as a SoundFont
//! synthesiser plays a sample away from its root key (resampled by 2^(semitones/12), linear
//! interpolation): more notes of the same real recordings, labelled by the key played.
//! valid and test are never transposed, so their figures stay comparable.
//!
//! `train_files` adds the recordings of other General MIDI SoundFonts (other players, other
//! instruments) to `train` only: more timbres per family to learn from, while valid and test
//! stay the main file's held-out presets. Their ids start with the file's name.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::File;

use earshot_plugin_sdk::*;

pub mod render;
pub mod sf2;

use render::{render, transpose, wav_bytes};
use sf2::SoundFont;

/// General MIDI program families, eight programs each (program / 8).
pub const GM_FAMILIES: [&str; 16] = [
    "piano",
    "chromatic percussion",
    "organ",
    "guitar",
    "bass",
    "strings",
    "ensemble",
    "brass",
    "reed",
    "pipe",
    "synth lead",
    "synth pad",
    "synth effects",
    "ethnic",
    "percussive",
    "sound effects",
];

/// The families kept by default: acoustic instrument families a listener can name.
pub const DEFAULT_FAMILIES: [&str; 8] = [
    "piano", "organ", "guitar", "bass", "strings", "brass", "reed", "pipe",
];

/// The widest transposition (two octaves): past it a sample sounds like another instrument.
pub const MAX_TRANSPOSE: i8 = 24;

/// A batch's WAV bytes stay under this, whatever `max` the host asks for.
const MAX_BATCH_BYTES: usize = 8 << 20;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    pub file: Option<String>,
    pub families: Vec<String>,
    #[serde(alias = "eval_fraction")]
    pub test_fraction: f64,
    pub valid_fraction: f64,
    pub seed: u64,
    pub min_duration_s: f64,
    pub max_duration_s: f64,
    pub register_bounds: [u8; 2],
    pub max_per_family: Option<usize>,
    pub train_transpose: Vec<i8>,
    pub train_files: Vec<String>,
    pub caption: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            file: None,
            families: DEFAULT_FAMILIES.iter().map(|s| s.to_string()).collect(),
            test_fraction: 0.25,
            valid_fraction: 0.1,
            seed: 0,
            min_duration_s: 1.0,
            max_duration_s: 4.0,
            register_bounds: [52, 72],
            max_per_family: None,
            train_transpose: Vec::new(),
            train_files: Vec::new(),
            caption: "A {family} note in the {register} register.".into(),
        }
    }
}

impl Options {
    fn check(&self) -> Result<(), String> {
        for f in &self.families {
            if !GM_FAMILIES.contains(&f.as_str()) {
                return Err(format!(
                    "families: unknown GM family {f:?} (known: {})",
                    GM_FAMILIES.join(", ")
                ));
            }
        }
        if self.families.is_empty() {
            return Err("families: empty".into());
        }
        if let Some(problem) = split_fractions_problem(self.test_fraction, self.valid_fraction) {
            return Err(problem);
        }
        let d = (self.min_duration_s, self.max_duration_s);
        if !(d.0 >= 0.0 && d.1 > 0.0 && d.0 <= d.1 && d.1 <= 30.0) {
            return Err(format!(
                "min_duration_s {} / max_duration_s {}: need 0 <= min <= max <= 30",
                d.0, d.1
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for &t in &self.train_transpose {
            if t == 0 || !(-MAX_TRANSPOSE..=MAX_TRANSPOSE).contains(&t) || !seen.insert(t) {
                return Err(format!(
                    "train_transpose: {t} must be a non-zero number of semitones in \
                     -{MAX_TRANSPOSE}..={MAX_TRANSPOSE}, each listed once (0, the recording as it \
                     is, is always played)"
                ));
            }
        }
        if self.register_bounds[0] > self.register_bounds[1] || self.register_bounds[1] > 127 {
            return Err(format!(
                "register_bounds: {:?} must be two MIDI keys, low <= high",
                self.register_bounds
            ));
        }
        Ok(())
    }
}

/// One recording and what it is labelled with.
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    pub sample: usize,
    pub family: String,
    pub preset: String,
    pub program: u16,
    pub root_key: u8,
    pub loops: bool,
    /// Index of the preset group (presets sharing recordings) it belongs to.
    pub group: usize,
    /// Semitones away from the root key it is played at (0: as recorded).
    pub transpose: i8,
    /// Which SoundFont: 0 the main file, i the i-th of `train_files`.
    pub font: usize,
}

impl Recording {
    /// The MIDI key it is played at.
    pub fn key(&self) -> u8 {
        (self.root_key as i16 + self.transpose as i16).clamp(0, 127) as u8
    }
}

pub fn note_name(key: u8) -> String {
    const NAMES: [&str; 12] = [
        "C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B",
    ];
    format!("{}{}", NAMES[key as usize % 12], key as i32 / 12 - 1)
}

pub fn register(key: u8, bounds: [u8; 2]) -> &'static str {
    if key < bounds[0] {
        "low"
    } else if key >= bounds[1] {
        "high"
    } else {
        "middle"
    }
}

fn fnv(seed: u64, s: &str) -> u64 {
    let mut h = 0xcbf29ce484222325u64 ^ seed.wrapping_mul(0x100000001b3);
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The recordings of the kept families' bank-0 presets, and the warnings found on the way.
pub fn recordings(sf: &SoundFont, o: &Options) -> Result<(Vec<Recording>, Vec<String>), String> {
    let mut warnings = Vec::new();
    // sample -> (family, preset index, zone)
    let mut users: BTreeMap<usize, Vec<(usize, &sf2::Zone)>> = BTreeMap::new();
    for (pi, p) in sf.presets.iter().enumerate() {
        let family = GM_FAMILIES[(p.program as usize / 8).min(15)];
        if p.bank != 0 || p.program > 127 || !o.families.iter().any(|f| f == family) {
            continue;
        }
        // Stereo recordings: the left half stands for the pair. (Sample links cannot be
        // trusted for this: FluidR3's all point at sample 0.)
        let has_left = p.zones.iter().any(|z| sf.samples[z.sample].is_left());
        for z in &p.zones {
            let s = &sf.samples[z.sample];
            if s.is_rom() || (has_left && s.is_right()) {
                continue;
            }
            users.entry(z.sample).or_default().push((pi, z));
        }
    }
    // Preset groups: presets joined when they play a common recording (union-find).
    let mut parent: Vec<usize> = (0..sf.presets.len()).collect();
    fn find(parent: &mut [usize], i: usize) -> usize {
        let mut r = i;
        while parent[r] != r {
            r = parent[r];
        }
        parent[i] = r;
        r
    }
    for us in users.values() {
        let first = find(&mut parent, us[0].0);
        for &(pi, _) in &us[1..] {
            let r = find(&mut parent, pi);
            parent[r] = first;
        }
    }
    let mut out = Vec::new();
    for (&sample, us) in &users {
        let families: Vec<&str> = us
            .iter()
            .map(|(pi, _)| GM_FAMILIES[sf.presets[*pi].program as usize / 8])
            .collect();
        if families.iter().any(|f| *f != families[0]) {
            warnings.push(format!(
                "sample '{}' is played by presets of several families ({}); left out",
                sf.samples[sample].name,
                families.join(", ")
            ));
            continue;
        }
        sf.check_sample(sample)?;
        let (pi, zone) = us
            .iter()
            .min_by_key(|(pi, _)| (sf.presets[*pi].program, *pi))
            .copied()
            .unwrap();
        let p = &sf.presets[pi];
        out.push(Recording {
            sample,
            family: families[0].to_string(),
            preset: p.name.clone(),
            program: p.program,
            root_key: zone.root_key,
            loops: zone.loops,
            group: find(&mut parent, pi),
            transpose: 0,
            font: 0,
        });
    }
    if out.is_empty() {
        return Err(format!(
            "no recordings in bank-0 presets of the families {}",
            o.families.join(", ")
        ));
    }
    Ok((out, warnings))
}

/// The splits, in the order groups are dealt to them.
pub const SPLITS: [&str; 3] = ["test", "valid", "train"];

/// Splits recordings by preset group: per family, groups (in a seeded order) go to `test`
/// until it holds `test_fraction` of the family's recordings, then to `valid` until test and
/// valid together hold `test_fraction + valid_fraction`, the rest to `train`. A family's
/// first group after test always goes to `valid` (when `valid_fraction` > 0) if another group
/// is left for `train`, even when test's groups already overshoot both shares; at least one
/// group stays in `train`. So a family of three or more groups is in every split. Then each side is cut to
/// `max_per_family` recordings per family, if set.
pub fn split(
    recs: Vec<Recording>,
    o: &Options,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, Vec<Recording>> {
    let mut by_family: BTreeMap<String, BTreeMap<usize, Vec<Recording>>> = BTreeMap::new();
    for r in recs {
        by_family
            .entry(r.family.clone())
            .or_default()
            .entry(r.group)
            .or_default()
            .push(r);
    }
    let mut sides: BTreeMap<String, Vec<Recording>> =
        SPLITS.iter().map(|s| (s.to_string(), Vec::new())).collect();
    for (family, groups) in by_family {
        let total: usize = groups.values().map(Vec::len).sum();
        let mut order: Vec<Vec<Recording>> = groups.into_values().collect();
        order.sort_by_key(|g| (fnv(o.seed, &g[0].preset), g[0].sample));
        let n_groups = order.len();
        let mut family_sides: [Vec<Recording>; 3] = Default::default();
        let mut side = 0;
        let mut bound = o.test_fraction;
        for (i, g) in order.into_iter().enumerate() {
            // Past this share of the family's recordings, the next split takes over; but
            // valid, when asked for, gets one group of a family that has one to spare (one
            // left for train after it), even when test already overshot both shares: a
            // validation split without a family cannot tell which checkpoint names it best.
            let spare = i + 1 < n_groups;
            while side < 2
                && !(side == 1 && o.valid_fraction > 0.0 && family_sides[1].is_empty() && spare)
                && family_sides[..=side].iter().map(Vec::len).sum::<usize>() as f64
                    >= bound * total as f64
            {
                side += 1;
                bound += if side == 1 { o.valid_fraction } else { 0.0 };
            }
            let last_for_train = i + 1 == n_groups && family_sides[2].is_empty();
            let s = if last_for_train { 2 } else { side };
            family_sides[s].extend(g);
        }
        for (name, recs) in SPLITS.iter().zip(family_sides) {
            let fraction = match *name {
                "test" => o.test_fraction,
                "valid" => o.valid_fraction,
                _ => 0.0,
            };
            if recs.is_empty() && fraction > 0.0 {
                warnings.push(format!(
                    "family {family}: {n_groups} preset group(s), none left for {name}"
                ));
            }
            sides
                .get_mut(*name)
                .unwrap()
                .extend(capped(recs, o.max_per_family));
        }
    }
    if let Some(train) = sides.get_mut("train") {
        let played: Vec<Recording> = train
            .iter()
            .flat_map(|r| {
                o.train_transpose.iter().map(|&t| Recording {
                    transpose: t,
                    ..r.clone()
                })
            })
            .collect();
        train.extend(played);
    }
    for s in sides.values_mut() {
        s.sort_by_key(|r| (r.font, r.sample, r.transpose));
    }
    sides
}

/// At most `cap` recordings, spread evenly over `recs` (deterministic).
fn capped(recs: Vec<Recording>, cap: Option<usize>) -> Vec<Recording> {
    match cap {
        Some(cap) if recs.len() > cap => {
            let n = recs.len();
            (0..cap).map(|i| recs[i * n / cap].clone()).collect()
        }
        _ => recs,
    }
}

pub fn caption(template: &str, r: &Recording, reg: &str) -> String {
    template
        .replace("{family}", &r.family)
        .replace("{register}", reg)
        .replace("{note}", &note_name(r.key()))
        .replace("{preset}", &r.preset)
}

struct State {
    /// The main file first, then `train_files`: (name, file, parsed font).
    fonts: Vec<(String, File, SoundFont)>,
    options: Options,
    splits: BTreeMap<String, Vec<Recording>>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// A path option that must stay inside the dataset root.
fn inside_root(key: &str, f: &str) -> Result<(), PluginError> {
    if f.split('/').any(|c| c == "..") || f.starts_with('/') || f.is_empty() {
        return Err(error(
            ErrorCode::InvalidInput,
            format!("{key}: {f:?} must be a path inside the dataset root"),
        ));
    }
    Ok(())
}

/// Opens and parses one SoundFont beneath the dataset root.
fn open_font(name: &str) -> Result<(File, SoundFont), PluginError> {
    let path = format!("{DATA_ROOT}/{name}");
    let mut file =
        File::open(&path).map_err(|e| error(ErrorCode::NotFound, format!("{name}: {e}")))?;
    let len = file
        .metadata()
        .map_err(|e| error(ErrorCode::Io, format!("{name}: {e}")))?
        .len();
    let font = SoundFont::read(&mut file, len)
        .map_err(|e| error(ErrorCode::InvalidInput, format!("{name}: {e}")))?;
    Ok((file, font))
}

fn find_file(o: &Options) -> Result<String, PluginError> {
    if let Some(f) = &o.file {
        inside_root("file", f)?;
        return Ok(f.clone());
    }
    let mut found = root_files(|n| n.to_ascii_lowercase().ends_with(".sf2"))?;
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(error(
            ErrorCode::NotFound,
            "no .sf2 file in the dataset root (name one with the \"file\" option)",
        )),
        _ => Err(error(
            ErrorCode::InvalidInput,
            format!(
                "several .sf2 files in the dataset root ({}); name one with the \"file\" option",
                found.join(", ")
            ),
        )),
    }
}

fn example(state: &mut State, r: &Recording) -> Result<Example, PluginError> {
    let o = &state.options;
    let (font_name, file, font) = &mut state.fonts[r.font];
    let s = &font.samples[r.sample];
    let points = font
        .read_points(file, r.sample)
        .map_err(|e| error(ErrorCode::InvalidInput, format!("{font_name}: {e}")))?;
    let audio = render(&points, s, r.loops, o.min_duration_s, o.max_duration_s);
    let audio = if r.transpose == 0 {
        audio
    } else {
        transpose(&audio, r.transpose)
    };
    let duration = audio.len() as f64 / s.sample_rate as f64;
    let reg = register(r.key(), o.register_bounds);
    let target = caption(&o.caption, r, reg);
    let kv = |k: &str, v: String| KeyValue {
        key: k.into(),
        value: v,
    };
    let id = match r.transpose {
        0 => format!("{}/{}", r.preset, s.name),
        t => format!("{}/{} {t:+}", r.preset, s.name),
    };
    // Recordings of the other training files name their file.
    let id = match r.font {
        0 => id,
        _ => format!("{}:{id}", font_name.rsplit('/').next().unwrap_or(font_name)),
    };
    Ok(Example {
        id,
        audio: AudioSource::Inline(wav_bytes(&audio, s.sample_rate)),
        start_s: None,
        end_s: None,
        target: Some(target),
        // The target is the one reference; the WIT's `references` are the others.
        references: Vec::new(),
        metadata: vec![
            kv("family", r.family.clone()),
            kv("preset", r.preset.clone()),
            kv("program", r.program.to_string()),
            kv("root_key", r.root_key.to_string()),
            kv("key", r.key().to_string()),
            kv("note", note_name(r.key())),
            kv("register", reg.into()),
            kv("transpose", r.transpose.to_string()),
            kv("duration_s", format!("{duration:.2}")),
            kv("sample_rate", s.sample_rate.to_string()),
        ],
    })
}

struct SoundFontAdapter;

impl Plugin for SoundFontAdapter {
    fn info() -> PluginInfo {
        info(
            "soundfont",
            env!("CARGO_PKG_VERSION"),
            &[Role::DatasetAdapter],
            "SoundFont 2 recordings labelled by General MIDI family and register, split by preset",
        )
    }

    fn open(options: String) -> Result<DatasetInfo, PluginError> {
        let o: Options = parse_options(&options)?;
        o.check().map_err(|e| error(ErrorCode::InvalidInput, e))?;
        let name = find_file(&o)?;
        let (file, font) = open_font(&name)?;
        let (recs, mut warnings) = recordings(&font, &o)
            .map_err(|e| error(ErrorCode::InvalidInput, format!("{name}: {e}")))?;
        let mut splits = split(recs, &o, &mut warnings);
        let mut fonts = vec![(name, file, font)];
        for (i, extra) in o.train_files.iter().enumerate() {
            inside_root("train_files", extra)?;
            let (file, font) = open_font(extra)?;
            let (recs, more) = recordings(&font, &o)
                .map_err(|e| error(ErrorCode::InvalidInput, format!("{extra}: {e}")))?;
            warnings.extend(more.into_iter().map(|w| format!("{extra}: {w}")));
            let train = splits.get_mut("train").expect("a train split");
            for r in recs {
                let r = Recording { font: i + 1, ..r };
                train.extend(o.train_transpose.iter().map(|&t| Recording {
                    transpose: t,
                    ..r.clone()
                }));
                train.push(r);
            }
            train.sort_by_key(|r| (r.font, r.sample, r.transpose));
            fonts.push((extra.clone(), file, font));
        }
        STATE.with(|s| {
            *s.borrow_mut() = Some(State {
                fonts,
                options: o,
                splits,
            })
        });
        Ok(DatasetInfo {
            splits: vec!["train".into(), "valid".into(), "test".into()],
            warnings,
        })
    }

    fn read(split: String, start: u64, max: u32) -> Result<Batch, PluginError> {
        STATE.with(|s| {
            let mut guard = s.borrow_mut();
            let state = guard
                .as_mut()
                .ok_or_else(|| error(ErrorCode::InvalidInput, "read before open"))?;
            let recs = state
                .splits
                .get(&split)
                .ok_or_else(|| {
                    error(
                        ErrorCode::NotFound,
                        format!("no split {split:?} (have: train, valid, test)"),
                    )
                })?
                .clone();
            let from = (start as usize).min(recs.len());
            let mut examples = Vec::new();
            let mut bytes = 0usize;
            let mut next = from;
            while next < recs.len() && examples.len() < max.max(1) as usize {
                let ex = example(state, &recs[next])?;
                if let AudioSource::Inline(b) = &ex.audio {
                    bytes += b.len();
                }
                examples.push(ex);
                next += 1;
                if bytes >= MAX_BATCH_BYTES {
                    break;
                }
            }
            Ok(Batch {
                examples,
                warnings: Vec::new(),
                next: (next < recs.len()).then_some(next as u64),
            })
        })
    }
}

export_plugin!(SoundFontAdapter);
