//! What to caption: files, raw samples, or a dataset split read a chunk at a time (a split can
//! be endless or hold inline audio, so it is never collected whole).

use std::path::{Path, PathBuf};

use crate::pipeline::examples::audio_label;
use crate::plugins::{BadExample, Example, PluginError, SplitPages, PAGE_SIZE};

/// Where a caption item's audio comes from.
#[derive(Clone)]
pub enum AudioInput {
    /// An audio file (any format the decoder reads).
    File(PathBuf),
    /// A dataset example: a path beneath the dataset root or inline bytes, maybe a segment.
    Example(Box<Example>),
    /// 16 kHz mono samples.
    Samples(Vec<f32>),
    /// A file's or an example's audio already decoded (16 kHz mono, within the length limit)
    /// with the segment it came from, which stays part of the encoder cache key: evaluation
    /// decodes a clip once for its loss, its caption and the report's player.
    Decoded {
        samples: Vec<f32>,
        span: super::SourceSpan,
    },
    /// An example the adapter returned over a per-example bound: it has no audio to use and
    /// fails alone with this error (silence and shuffling leave it as it is).
    Rejected(BadExample),
}

/// One thing to caption.
pub struct CaptionItem {
    pub id: String,
    /// How the audio is named in output and errors.
    pub audio: String,
    pub input: AudioInput,
    /// Passed to the prompt template and the post-processor.
    pub metadata: Vec<(String, String)>,
    /// The example's target first, then its other references (dataset items).
    pub references: Vec<String>,
}

impl CaptionItem {
    pub fn file(path: PathBuf) -> Self {
        Self {
            id: path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string(),
            audio: path.display().to_string(),
            input: AudioInput::File(path),
            metadata: Vec::new(),
            references: Vec::new(),
        }
    }

    pub fn samples(id: &str, samples: Vec<f32>, metadata: Vec<(String, String)>) -> Self {
        Self {
            id: id.to_string(),
            audio: format!("<{} samples>", samples.len()),
            input: AudioInput::Samples(samples),
            metadata,
            references: Vec::new(),
        }
    }

    /// A dataset example, its audio named beneath `root`.
    pub fn example(ex: Example, root: &Path) -> Self {
        // An adapter that repeats its target among the references would count it twice
        // (CIDEr-D's document frequencies, BLEU's clipping): each text once, target first.
        let mut references: Vec<String> = Vec::with_capacity(ex.references.len() + 1);
        for r in ex.target.iter().chain(&ex.references) {
            if !references.contains(r) {
                references.push(r.clone());
            }
        }
        Self {
            id: ex.id.clone(),
            audio: audio_label(&ex, root),
            metadata: ex.metadata.clone(),
            references,
            input: AudioInput::Example(Box::new(ex)),
        }
    }
}

impl CaptionItem {
    /// An example refused for breaking a per-example bound: captioning reports its error.
    pub fn rejected(bad: BadExample) -> Self {
        Self {
            id: bad.id.clone(),
            audio: "<not read: the example breaks a bound>".into(),
            input: AudioInput::Rejected(bad),
            metadata: Vec::new(),
            references: Vec::new(),
        }
    }
}

/// Items read a chunk at a time.
pub enum ItemSource<'a> {
    Files(std::vec::IntoIter<PathBuf>),
    Split {
        pages: SplitPages<'a>,
        root: PathBuf,
    },
}

impl ItemSource<'_> {
    /// Up to `n` items; empty at the end.
    pub fn next_chunk(&mut self, n: usize) -> Result<Vec<CaptionItem>, PluginError> {
        match self {
            ItemSource::Files(files) => Ok(files.by_ref().take(n).map(CaptionItem::file).collect()),
            ItemSource::Split { pages, root } => {
                let Some(examples) = pages.next_page_of(n.min(PAGE_SIZE as usize) as u32)? else {
                    return Ok(Vec::new());
                };
                Ok(examples
                    .into_iter()
                    .map(|ex| match ex {
                        Ok(ex) => CaptionItem::example(ex, root),
                        Err(bad) => CaptionItem::rejected(bad),
                    })
                    .collect())
            }
        }
    }
}
