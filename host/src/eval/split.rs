//! Captioning a dataset split for evaluation, three ways: with its audio, with the audio
//! replaced by silence, and with the audio shuffled between examples (the listening check:
//! a model that ignores its audio scores the same on all three).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Prediction, Report};
use crate::caption::{
    AudioInput, CaptionError, CaptionItem, CaptionSettings, Captioner, ItemSource, Result,
};
use crate::dist::World;
use crate::models::nonfinite::NonFiniteTrace;
use crate::pipeline::layout::project_windows;
use crate::pipeline::loss::caption_loss;
use crate::plugins::{DatasetAdapter, PAGE_SIZE};

/// Clips longer than this are kept (and embedded in the report) cut to it, so the page
/// stays loadable.
pub const MAX_EMBEDDED_CLIP_S: f64 = 10.0;
/// At most this many bytes of audio kept for one report page; later rows show no player.
pub const MAX_EMBEDDED_AUDIO_BYTES: usize = 64 << 20;

/// What the model hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hearing {
    /// Each example's own audio.
    Real,
    /// One second of silence (any silence up to 30 s gives the same log-mel window).
    Silence,
    /// Another example's audio, by a seeded random permutation of the split without fixed
    /// points.
    Shuffled,
}

/// One line of captioning output, for `--save-predictions` (as `earshot caption` writes).
pub type Line = serde_json::Value;

/// A split captioned one way.
pub struct SplitCaptions {
    pub predictions: Vec<Prediction>,
    /// Items whose captioning failed.
    pub failed: usize,
    /// One output line per item (as `earshot caption` writes).
    pub lines: Vec<Line>,
    /// Teacher-forced cross-entropy per target token against each item's first reference,
    /// on the first encoder window as training computes it; none without references.
    pub loss: Option<f64>,
    /// Example id -> the first [`MAX_EMBEDDED_CLIP_S`] seconds of what the model heard, in
    /// split order while they fit the report's [`MAX_EMBEDDED_AUDIO_BYTES`] (as 16-bit
    /// WAV); empty unless asked for.
    pub heard: BTreeMap<String, Vec<f32>>,
}

/// The split captioned as `hearing` says, and its loss heard the same way; with
/// `keep_heard`, the start of each clip for the report's players. Each clip is decoded once.
/// `progress(done)` is called after each chunk.
///
/// Under `mpirun -np N`, every rank reads the split in the same chunks and rank r captions
/// the r-th chunk of each round of N; rank 0 gathers the results in split order and gets
/// the captions (the other ranks get `None`). Each chunk is the batch one process would
/// caption and the losses are summed in chunk order, so the result is the single process's.
#[allow(clippy::too_many_arguments)]
pub fn caption_split(
    captioner: &mut Captioner,
    dataset: &mut DatasetAdapter,
    split: &str,
    settings: &CaptionSettings,
    hearing: Hearing,
    keep_heard: bool,
    world: &World,
    progress: &mut dyn FnMut(usize),
) -> Result<Option<SplitCaptions>> {
    let root = captioner.config.data.root.clone();
    let mut items = ItemSource::Split {
        pages: dataset.pages(split, PAGE_SIZE),
        root,
    };
    // Shuffled: the whole split first, so each example can get the audio of one far from it
    // (neighbours in a split are often the same source: the same preset, speaker, album).
    let mut shuffled = if hearing == Hearing::Shuffled {
        let mut all = Vec::new();
        loop {
            let chunk = items.next_chunk(settings.batch_size)?;
            if chunk.is_empty() {
                break;
            }
            all.extend(chunk);
        }
        shuffle_audio(&mut all, SHUFFLE_SEED);
        Some(all.into_iter())
    } else {
        None
    };
    let mut merged = Merged::default();
    loop {
        let mut round = Vec::with_capacity(world.size());
        for _ in 0..world.size() {
            round.push(match &mut shuffled {
                Some(all) => all.by_ref().take(settings.batch_size).collect(),
                None => items.next_chunk(settings.batch_size)?,
            });
        }
        // Rank 0's reading decides the end (no rank waits for one that stopped), and whether
        // the report still has room for players.
        if !world.root_says(!round[0].is_empty()) {
            break;
        }
        let keep_now = world.root_says(keep_heard && !merged.heard_full());
        let mine = std::mem::take(&mut round[world.rank()]);
        let share = match mine.is_empty() {
            true => ChunkShare::default(),
            false => caption_chunk(captioner, mine, settings, hearing, keep_now)?,
        };
        if world.size() == 1 {
            merged.absorb(share);
        } else if let Some(parts) = world.gather_bytes(&share.to_bytes()?)? {
            for bytes in parts {
                merged.absorb(ChunkShare::from_bytes(&bytes)?);
            }
        }
        if world.is_root() {
            progress(merged.captions.lines.len());
        }
    }
    if !world.is_root() {
        return Ok(None);
    }
    let Merged {
        mut captions,
        loss_sum,
        loss_tokens,
        ..
    } = merged;
    captions.loss = (loss_tokens > 0).then(|| loss_sum / loss_tokens as f64);
    Ok(Some(captions))
}

/// The captions of one chunk, as one rank sends them to rank 0.
#[derive(Default, Serialize, Deserialize)]
struct ChunkShare {
    predictions: Vec<Prediction>,
    failed: usize,
    lines: Vec<Line>,
    /// The chunk's summed loss, as f64 bits (exact through the JSON header).
    loss_sum_bits: u64,
    loss_tokens: usize,
    /// (example id, samples) of the start of each clip heard, when asked for; the samples
    /// travel after the header.
    heard: Vec<(String, usize)>,
    #[serde(skip)]
    heard_samples: Vec<f32>,
}

impl ChunkShare {
    /// A length-prefixed JSON header, then the heard samples (f32, little-endian).
    fn to_bytes(&self) -> Result<Vec<u8>> {
        let header = serde_json::to_vec(self)
            .map_err(|e| CaptionError::Share(format!("cannot write them as JSON: {e}")))?;
        let mut out = Vec::with_capacity(8 + header.len() + 4 * self.heard_samples.len());
        out.extend((header.len() as u64).to_le_bytes());
        out.extend(header);
        for x in &self.heard_samples {
            out.extend(x.to_le_bytes());
        }
        Ok(out)
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |why: &str| CaptionError::Share(why.to_string());
        let len = bytes
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
            .ok_or_else(|| bad("too short"))?;
        let header = bytes.get(8..8 + len).ok_or_else(|| bad("truncated"))?;
        let mut share: Self = serde_json::from_slice(header).map_err(|e| bad(&e.to_string()))?;
        let samples = &bytes[8 + len..];
        if !samples.len().is_multiple_of(4)
            || samples.len() / 4 != share.heard.iter().map(|h| h.1).sum::<usize>()
        {
            return Err(bad("the heard samples do not match their lengths"));
        }
        share.heard_samples = samples
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(share)
    }
}

/// The chunks' results put together on rank 0, in split order.
struct Merged {
    captions: SplitCaptions,
    loss_sum: f64,
    loss_tokens: usize,
    heard_bytes: usize,
}

impl Default for Merged {
    fn default() -> Self {
        Self {
            captions: SplitCaptions {
                predictions: Vec::new(),
                failed: 0,
                lines: Vec::new(),
                loss: None,
                heard: BTreeMap::new(),
            },
            loss_sum: 0.0,
            loss_tokens: 0,
            heard_bytes: 0,
        }
    }
}

impl Merged {
    /// The report's players are full: no later clip gets one.
    fn heard_full(&self) -> bool {
        self.heard_bytes >= MAX_EMBEDDED_AUDIO_BYTES
    }

    fn absorb(&mut self, share: ChunkShare) {
        let c = &mut self.captions;
        c.predictions.extend(share.predictions);
        c.failed += share.failed;
        c.lines.extend(share.lines);
        self.loss_sum += f64::from_bits(share.loss_sum_bits);
        self.loss_tokens += share.loss_tokens;
        let mut at = 0;
        for (id, n) in share.heard {
            let samples = &share.heard_samples[at..at + n];
            at += n;
            if self.heard_full() {
                break;
            }
            if self.heard_bytes + 2 * n > MAX_EMBEDDED_AUDIO_BYTES {
                // Full: no later clip either, so the players are the split's first clips.
                self.heard_bytes = MAX_EMBEDDED_AUDIO_BYTES;
                break;
            }
            self.heard_bytes += 2 * n;
            self.captions.heard.insert(id, samples.to_vec());
        }
    }
}

/// Captions one chunk heard as `hearing` says, with its loss; with `keep_heard`, the start
/// of each clip as heard.
fn caption_chunk(
    captioner: &mut Captioner,
    mut chunk: Vec<CaptionItem>,
    settings: &CaptionSettings,
    hearing: Hearing,
    keep_heard: bool,
) -> Result<ChunkShare> {
    let clip_samples = (MAX_EMBEDDED_CLIP_S * crate::audio::SAMPLE_RATE as f64) as usize;
    if hearing == Hearing::Silence {
        for item in &mut chunk {
            if !matches!(item.input, AudioInput::Rejected(_)) {
                item.input = AudioInput::Samples(vec![0.0; crate::audio::SAMPLE_RATE as usize]);
            }
        }
    } else {
        captioner.decode_in_place(&mut chunk);
    }
    let mut share = ChunkShare::default();
    if keep_heard {
        for item in &chunk {
            let (AudioInput::Decoded { samples, .. } | AudioInput::Samples(samples)) = &item.input
            else {
                continue;
            };
            let start = &samples[..samples.len().min(clip_samples)];
            share.heard.push((item.id.clone(), start.len()));
            share.heard_samples.extend_from_slice(start);
        }
    }
    let (sum, tokens) = chunk_loss(captioner, &chunk)?;
    share.loss_sum_bits = sum.to_bits();
    share.loss_tokens = tokens;
    let results = captioner.caption(&chunk, settings, false, &mut |_| {})?;
    for (item, result) in chunk.into_iter().zip(results) {
        share.lines.push(record(&item, &result));
        match result {
            Ok(captions) => {
                if item.references.is_empty() {
                    tracing::warn!("example {}: no references; not scored", item.id);
                    continue;
                }
                share.predictions.push(Prediction {
                    id: item.id,
                    caption: joined(&captions),
                    references: item.references,
                    metadata: item.metadata,
                });
            }
            Err(_) => share.failed += 1,
        }
    }
    Ok(share)
}

/// The chunk's summed cross-entropy over its target tokens, and how many there are. Items
/// without a reference, or whose audio or prompt fails (captioning reports those), are left
/// out.
fn chunk_loss(captioner: &mut Captioner, chunk: &[CaptionItem]) -> Result<(f64, usize)> {
    let mut pieces = Vec::with_capacity(chunk.len());
    let mut audio = Vec::with_capacity(chunk.len());
    for item in chunk {
        let Some(target) = item.references.first() else {
            continue;
        };
        let mut prepare = || -> Result<_> {
            let (samples, span) = captioner.item_samples(item)?;
            let encoded = captioner.clips.encode_samples(&samples, span, Some(1))?;
            let projected = project_windows(&captioner.projector, &encoded)?;
            let prompt = captioner.render_prompt(&item.metadata, Some(target))?;
            Ok((prompt.pieces, projected))
        };
        match prepare() {
            Ok((p, a)) => {
                pieces.push(p);
                audio.push(a);
            }
            Err(e) => tracing::debug!("example {}: no loss: {e:#}", item.id),
        }
    }
    if pieces.is_empty() {
        return Ok((0.0, 0));
    }
    let out = caption_loss(
        &captioner.llm.model,
        &pieces,
        &audio,
        Some(captioner.prefixes()),
        NonFiniteTrace::default(),
    )?;
    Ok((out.value()? * out.target_tokens as f64, out.target_tokens))
}

/// The shuffle's seed: the listening check is the same on every run.
const SHUFFLE_SEED: u64 = 0x5eed;

/// Gives each item the audio of another, by a random cyclic permutation (Sattolo's
/// algorithm): no item keeps its own audio unless there is only one. Rejected examples (no
/// audio, see [`AudioInput::Rejected`]) keep their error and lend nothing.
pub fn shuffle_audio(items: &mut [CaptionItem], seed: u64) {
    let mut usable: Vec<&mut CaptionItem> = items
        .iter_mut()
        .filter(|i| !matches!(i.input, AudioInput::Rejected(_)))
        .collect();
    shuffle_usable(&mut usable, seed);
}

fn shuffle_usable(items: &mut [&mut CaptionItem], seed: u64) {
    use rand::{Rng, SeedableRng};
    let n = items.len();
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in (1..n).rev() {
        let j = rng.random_range(0..i);
        perm.swap(i, j);
    }
    let inputs: Vec<AudioInput> = items.iter().map(|i| i.input.clone()).collect();
    for (item, &from) in items.iter_mut().zip(&perm) {
        item.input = inputs[from].clone();
    }
}

/// A caption per window joined into one text.
fn joined(captions: &[crate::caption::WindowCaption]) -> String {
    captions
        .iter()
        .map(|c| c.text.trim())
        .collect::<Vec<_>>()
        .join(" ")
}

fn record(item: &CaptionItem, result: &crate::caption::ItemResult) -> Line {
    match result {
        Ok(captions) => serde_json::json!({
            "id": item.id, "audio": item.audio, "caption": joined(captions),
            "references": item.references,
            "metadata": metadata_object(&item.metadata),
        }),
        Err(e) => serde_json::json!({"id": item.id, "audio": item.audio, "error": e}),
    }
}

/// What a model that does not hear would score, beside silence and shuffled audio: naming
/// an allowed value at random, naming the training split's most common value, and giving the
/// training split's most common target for every example.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Baselines {
    /// Attribute -> expected accuracy of a uniformly random allowed value.
    pub uniform: BTreeMap<String, f64>,
    /// Attribute -> the training split's most common value, and its accuracy here.
    pub majority: BTreeMap<String, MajorityBaseline>,
    /// The training split's most common target as every caption, scored like the real ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub constant: Option<ConstantBaseline>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MajorityBaseline {
    pub value: String,
    pub accuracy: f64,
    pub ci95: [f64; 2],
}

#[derive(Debug, Clone, Serialize)]
pub struct ConstantBaseline {
    pub target: String,
    pub cider_d: f64,
    pub wer: f64,
    pub cer: f64,
}

/// What the baselines need of one training example.
#[derive(Debug, Clone)]
pub struct TrainingExample {
    pub metadata: Vec<(String, String)>,
    pub target: Option<String>,
}

/// The baselines of `report` (the real audio's), from the training split's examples and the
/// attributes scored.
pub fn baselines(
    training: &[TrainingExample],
    report: &Report,
    attributes: &crate::eval::AttributeSpec,
) -> Baselines {
    let mut out = Baselines::default();
    for (name, allowed) in attributes {
        if !allowed.is_empty() {
            out.uniform.insert(name.clone(), 1.0 / allowed.len() as f64);
        }
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for ex in training {
            if let Some((_, v)) = ex.metadata.iter().find(|(k, _)| k == name) {
                *counts.entry(v.as_str()).or_default() += 1;
            }
        }
        // Most common; ties to the first in order, so the choice is stable.
        let Some((value, _)) = counts
            .iter()
            .fold(None, |best: Option<(&str, usize)>, (v, &n)| match best {
                Some((_, m)) if m >= n => best,
                _ => Some((v, n)),
            })
        else {
            continue;
        };
        let (mut right, mut n) = (0, 0);
        for ex in &report.per_example {
            if let Some(expected) = ex.attributes.get(name).and_then(|a| a.expected.as_ref()) {
                n += 1;
                right += usize::from(expected.eq_ignore_ascii_case(value));
            }
        }
        out.majority.insert(
            name.clone(),
            MajorityBaseline {
                value: value.to_string(),
                accuracy: right as f64 / n.max(1) as f64,
                ci95: crate::eval::wilson_ci95(right, n),
            },
        );
    }
    let mut targets: BTreeMap<&str, usize> = BTreeMap::new();
    for ex in training {
        if let Some(t) = &ex.target {
            *targets.entry(t.as_str()).or_default() += 1;
        }
    }
    let common = targets
        .iter()
        .fold(None, |best: Option<(&str, usize)>, (t, &n)| match best {
            Some((_, m)) if m >= n => best,
            _ => Some((t, n)),
        });
    if let (Some((target, _)), false) = (common, report.per_example.is_empty()) {
        let constant: Vec<crate::eval::Prediction> = report
            .per_example
            .iter()
            .map(|e| crate::eval::Prediction {
                id: e.id.clone(),
                caption: target.to_string(),
                references: e.references.clone(),
                metadata: Vec::new(),
            })
            .collect();
        let scored = crate::eval::score(&constant, 0, &crate::eval::AttributeSpec::new());
        out.constant = Some(ConstantBaseline {
            target: target.to_string(),
            cider_d: scored.scores.cider_d,
            wer: scored.scores.wer,
            cer: scored.scores.cer,
        });
    }
    out
}

/// Scores of the split heard each way, and whether the real audio is clearly better.
#[derive(Debug, Clone, Serialize)]
pub struct ListeningCheck {
    pub silence: Report,
    pub shuffled: Report,
    /// The primary score (mean attribute accuracy when attributes are scored, else
    /// CIDEr-D) with real audio, silence and shuffled audio.
    pub primary: String,
    pub real_score: f64,
    pub silence_score: f64,
    pub shuffled_score: f64,
    /// The primary score of the training split's most common value (attributes) or target
    /// (CIDEr-D), and of a uniformly random allowed value (attributes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub majority_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uniform_score: Option<f64>,
    /// The strongest of silence, shuffled, majority and uniform, and its score.
    pub best_baseline: String,
    pub best_baseline_score: f64,
    /// Eval loss (cross-entropy per target token) each way; a model that uses its audio
    /// has the lowest with the real audio.
    pub real_loss: Option<f64>,
    pub silence_loss: Option<f64>,
    pub shuffled_loss: Option<f64>,
    pub baselines: Baselines,
    /// Real audio beats every baseline by at least [`CLEAR_MARGIN`].
    pub clearly_better: bool,
}

/// How much better (absolute) real audio must score than the best baseline.
pub const CLEAR_MARGIN: f64 = 0.05;

/// The primary score of a report: mean attribute accuracy, or CIDEr-D without attributes.
pub fn primary_score(report: &Report) -> (String, f64) {
    if report.attributes.is_empty() {
        ("CIDEr-D".into(), report.scores.cider_d)
    } else {
        let n = report.attributes.len() as f64;
        (
            "attribute accuracy".into(),
            report.attributes.values().map(|a| a.accuracy).sum::<f64>() / n,
        )
    }
}

/// Compares the real report with silence, shuffled audio and the baselines (the verdict is
/// on the primary score; the losses are shown beside it).
pub fn listening_check(
    real: &Report,
    silence: Report,
    shuffled: Report,
    baselines: Baselines,
) -> ListeningCheck {
    let (primary, real_score) = primary_score(real);
    let silence_score = primary_score(&silence).1;
    let shuffled_score = primary_score(&shuffled).1;
    let mean_over_attributes = |values: Vec<f64>| {
        (!real.attributes.is_empty() && values.len() == real.attributes.len())
            .then(|| values.iter().sum::<f64>() / values.len() as f64)
    };
    let (majority_score, uniform_score) = if real.attributes.is_empty() {
        (baselines.constant.as_ref().map(|c| c.cider_d), None)
    } else {
        let attr = |f: &dyn Fn(&str) -> Option<f64>| {
            mean_over_attributes(real.attributes.keys().filter_map(|a| f(a)).collect())
        };
        (
            attr(&|a| baselines.majority.get(a).map(|m| m.accuracy)),
            attr(&|a| baselines.uniform.get(a).copied()),
        )
    };
    let (best_baseline, best_baseline_score) = [
        ("silence", Some(silence_score)),
        ("shuffled audio", Some(shuffled_score)),
        ("majority", majority_score),
        ("uniform", uniform_score),
    ]
    .into_iter()
    .filter_map(|(name, s)| s.map(|s| (name, s)))
    .fold(("silence", silence_score), |best, (name, s)| {
        if s > best.1 {
            (name, s)
        } else {
            best
        }
    });
    ListeningCheck {
        clearly_better: real_score >= best_baseline_score + CLEAR_MARGIN,
        real_loss: real.eval_loss,
        silence_loss: silence.eval_loss,
        shuffled_loss: shuffled.eval_loss,
        silence,
        shuffled,
        primary,
        real_score,
        silence_score,
        shuffled_score,
        majority_score,
        uniform_score,
        best_baseline: best_baseline.to_string(),
        best_baseline_score,
        baselines,
    }
}

/// Metadata as a JSON object (what `earshot eval --predictions` reads back).
pub fn metadata_object(metadata: &[(String, String)]) -> serde_json::Value {
    serde_json::Value::Object(
        metadata
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(item: &CaptionItem) -> usize {
        match &item.input {
            AudioInput::Samples(s) => s.len(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn shuffled_audio_is_a_permutation_without_fixed_points() {
        for n in [2usize, 3, 8, 191] {
            let mut items: Vec<CaptionItem> = (0..n)
                .map(|i| CaptionItem::samples(&i.to_string(), vec![0.0; i + 1], Vec::new()))
                .collect();
            shuffle_audio(&mut items, 7);
            let mut seen: Vec<usize> = items.iter().map(marker).collect();
            for (i, &m) in seen.iter().enumerate() {
                assert_ne!(m, i + 1, "n = {n}: item {i} kept its audio");
            }
            seen.sort_unstable();
            assert_eq!(seen, (1..=n).collect::<Vec<_>>(), "n = {n}");
            if n > 8 {
                // Not a rotation: neighbours do not simply hand their audio on.
                let next = items
                    .iter()
                    .enumerate()
                    .filter(|(i, it)| marker(it) == *i)
                    .count();
                assert!(
                    next < n / 4,
                    "n = {n}: {next} items got their neighbour's audio"
                );
            }
        }
    }
}
