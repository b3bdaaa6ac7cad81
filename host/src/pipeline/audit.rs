//! The leak audit: examples that two splits share by content, for any dataset adapter
//! (third-party included). Three kinds of sharing:
//! - the same audio bytes (the file's or the inline bytes, and the same segment),
//! - the same decoded audio (16 kHz samples of the segment: a re-encoded or renamed copy),
//! - the same normalised target text (lower-case, punctuation deleted, spaces collapsed),
//!   counted only for text targets (`data.text-targets`: transcription), since a label task's
//!   targets are shared across splits by design.
//!
//! An example of a later split that shares content with an earlier one leaks: a score on the
//! later split then measures memory, not hearing. Splits are compared in the order given
//! (the training split first).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::error::{io, Result};
use super::examples::{example_segment, load_example_audio, open_beneath};
use crate::plugins::{AudioSource, DatasetAdapter, Example, PAGE_SIZE};

/// What the audit compares.
#[derive(Debug, Clone, Copy)]
pub struct AuditOptions {
    /// Also decode every example and compare the samples (finds copies in other files).
    pub decoded: bool,
    /// Compare normalised targets (text targets: transcription).
    pub text_targets: bool,
    /// The longest audio one example may decode to (`data.max-audio-s`).
    pub max_audio_s: f64,
}

/// A way two examples can be the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Shared {
    AudioBytes,
    DecodedAudio,
    TargetText,
}

impl Shared {
    pub fn describe(self) -> &'static str {
        match self {
            Shared::AudioBytes => "the same audio bytes",
            Shared::DecodedAudio => "the same decoded audio",
            Shared::TargetText => "the same normalised target",
        }
    }
}

/// One leaking example and the earlier example it shares content with.
#[derive(Debug, Clone, Serialize)]
pub struct Offender {
    pub split: String,
    pub id: String,
    pub shared: Shared,
    pub with_split: String,
    pub with_id: String,
}

/// Per later split: how many of its examples share content with an earlier split.
#[derive(Debug, Clone, Serialize)]
pub struct SplitLeaks {
    pub split: String,
    pub examples: usize,
    /// Examples sharing content with an earlier split, by any kind.
    pub leaking: usize,
    /// The same, by kind.
    pub by_kind: BTreeMap<Shared, usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// (split, examples read) in the order compared.
    pub splits: Vec<(String, usize)>,
    pub leaks: Vec<SplitLeaks>,
    /// The first offenders, in split order.
    pub first: Vec<Offender>,
    /// Examples whose audio could not be read or decoded (compared by what could be).
    pub unreadable: Vec<(String, String)>,
    pub compared: Vec<Shared>,
}

impl AuditReport {
    pub fn leaking(&self) -> usize {
        self.leaks.iter().map(|l| l.leaking).sum()
    }
}

/// How many offenders the report keeps.
pub const MAX_OFFENDERS: usize = 20;

/// Compares examples split by split as they are read: what `earshot dataset audit` and the
/// check at the start of `train` share.
pub struct LeakFinder {
    options: AuditOptions,
    /// content key -> (split index, id) of the first example that had it.
    seen: HashMap<(Shared, String), (usize, String)>,
    /// Keys of the split being read, recorded when it ends: examples within one split may
    /// share content freely.
    own: Vec<((Shared, String), String)>,
    current: Option<SplitLeaks>,
    report: AuditReport,
}

impl LeakFinder {
    pub fn new(options: AuditOptions) -> Self {
        Self {
            options,
            seen: HashMap::new(),
            own: Vec::new(),
            current: None,
            report: AuditReport {
                splits: Vec::new(),
                leaks: Vec::new(),
                first: Vec::new(),
                unreadable: Vec::new(),
                compared: [
                    Some(Shared::AudioBytes),
                    options.decoded.then_some(Shared::DecodedAudio),
                    options.text_targets.then_some(Shared::TargetText),
                ]
                .into_iter()
                .flatten()
                .collect(),
            },
        }
    }

    /// Starts the next split (splits are compared in the order they are started).
    pub fn begin_split(&mut self, split: &str) {
        self.end_split();
        self.current = Some(SplitLeaks {
            split: split.to_string(),
            examples: 0,
            leaking: 0,
            by_kind: BTreeMap::new(),
        });
    }

    fn end_split(&mut self) {
        let Some(leaks) = self.current.take() else {
            return;
        };
        let index = self.report.splits.len();
        for (key, id) in self.own.drain(..) {
            self.seen.entry(key).or_insert((index, id));
        }
        self.report
            .splits
            .push((leaks.split.clone(), leaks.examples));
        if index > 0 {
            self.report.leaks.push(leaks);
        }
    }

    /// An example the adapter refused (over a bound): listed as unreadable.
    pub fn unreadable(&mut self, what: String) {
        let split = self.current.as_ref().map(|c| c.split.clone());
        self.report
            .unreadable
            .push((split.unwrap_or_default(), what));
    }

    /// Compares one example of the current split with the earlier splits.
    pub fn add(&mut self, ex: &Example, root: &Path) {
        let Some(current) = self.current.as_mut() else {
            return;
        };
        current.examples += 1;
        let index = self.report.splits.len();
        let (keys, problem) = content_keys(ex, root, self.options);
        if let Some(p) = problem {
            self.report
                .unreadable
                .push((current.split.clone(), format!("example {}: {p}", ex.id)));
        }
        let mut leaked = false;
        for key in keys {
            if let Some((with, with_id)) = self.seen.get(&key).filter(|(i, _)| *i < index) {
                *current.by_kind.entry(key.0).or_default() += 1;
                if !leaked && self.report.first.len() < MAX_OFFENDERS {
                    self.report.first.push(Offender {
                        split: current.split.clone(),
                        id: ex.id.clone(),
                        shared: key.0,
                        with_split: self.report.splits[*with].0.clone(),
                        with_id: with_id.clone(),
                    });
                }
                leaked = true;
            }
            self.own.push((key, ex.id.clone()));
        }
        current.leaking += usize::from(leaked);
    }

    pub fn finish(mut self) -> AuditReport {
        self.end_split();
        self.report
    }
}

/// Reads every example of `splits` (in that order) through the adapter and compares them.
/// `progress(split, examples read)` is called as it goes.
pub fn audit(
    adapter: &mut DatasetAdapter,
    root: &Path,
    splits: &[String],
    options: AuditOptions,
    progress: &mut dyn FnMut(&str, usize),
) -> Result<AuditReport> {
    let mut finder = LeakFinder::new(options);
    for split in splits {
        finder.begin_split(split);
        let mut pages = adapter.pages(split, PAGE_SIZE);
        let mut read = 0;
        while let Some(page) = pages.next_page()? {
            for ex in page {
                match ex {
                    Ok(ex) => finder.add(&ex, root),
                    Err(bad) => finder.unreadable(bad.to_string()),
                }
                read += 1;
                progress(split, read);
            }
        }
    }
    Ok(finder.finish())
}

/// The content keys of one example, and what could not be read (its audio keys are then
/// missing; the text key is still compared).
fn content_keys(
    ex: &Example,
    root: &Path,
    options: AuditOptions,
) -> (Vec<(Shared, String)>, Option<String>) {
    let mut keys = Vec::new();
    let mut problem = None;
    let segment = format!("{:?}-{:?}", ex.start_s, ex.end_s);
    match audio_bytes_hash(ex, root) {
        Ok(h) => keys.push((Shared::AudioBytes, format!("{h}|{segment}"))),
        Err(e) => problem = Some(e),
    }
    if options.decoded && problem.is_none() {
        match load_example_audio(ex, root, example_segment(ex), options.max_audio_s) {
            Ok(samples) => {
                let mut h = Sha256::new();
                for s in &samples {
                    h.update(s.to_le_bytes());
                }
                keys.push((Shared::DecodedAudio, hex::encode(h.finalize())));
            }
            Err(e) => problem = Some(format!("{e:#}")),
        }
    }
    if options.text_targets {
        if let Some(t) = ex.target.as_deref().map(crate::text::normalize_text) {
            if !t.is_empty() {
                keys.push((Shared::TargetText, t));
            }
        }
    }
    (keys, problem)
}

/// sha256 of the example's audio bytes (a file beneath the root, read with the same rule
/// as decoding, or the inline bytes).
fn audio_bytes_hash(ex: &Example, root: &Path) -> std::result::Result<String, String> {
    let mut h = Sha256::new();
    match &ex.audio {
        AudioSource::Inline(bytes) => h.update(bytes),
        AudioSource::Path(rel) => {
            let (mut file, shown) = open_beneath(root, rel).map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = file
                    .read(&mut buf)
                    .map_err(io(&shown, "cannot read"))
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
        }
    }
    Ok(hex::encode(h.finalize()))
}
