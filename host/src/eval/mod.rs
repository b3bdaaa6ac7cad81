//! Evaluation: scores for captions against their references (BLEU-1..4, ROUGE-L, CIDEr-D,
//! WER, CER, exact match) and attribute accuracy (a value named in the caption against the
//! example's metadata), over a predictions file or a split captioned by the
//! [`crate::caption::Captioner`].

pub mod metrics;
pub mod report;
pub mod split;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use metrics::{ptb_tokenize, AsrNormalization, Scored};

/// One caption to score.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Prediction {
    pub id: String,
    pub caption: String,
    /// The target first, then other references.
    pub references: Vec<String>,
    pub metadata: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{path}: cannot read: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{0}: no predictions with references to score")]
    Empty(PathBuf),
}

/// What a predictions file holds: the lines to score and the error lines (`earshot caption`
/// writes `{"id", "audio", "error"}` for an input that failed).
pub struct PredictionsFile {
    pub predictions: Vec<Prediction>,
    pub failed: Vec<String>,
}

/// Reads JSON lines with `caption` and `references` (a string or a list; `earshot caption`
/// output is accepted as is). Lines with an `error` are counted as failed; a line with
/// neither a caption nor an error, or no references, is an error naming the line.
pub fn read_predictions(path: &Path) -> Result<PredictionsFile, EvalError> {
    let text = crate::files::read_to_string(path).map_err(|cause| EvalError::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    let mut out = PredictionsFile {
        predictions: Vec::new(),
        failed: Vec::new(),
    };
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| EvalError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let id = match &v["id"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => format!("line {}", i + 1),
            other => other.to_string(),
        };
        if v.get("error").is_some() && v.get("caption").is_none() {
            out.failed.push(id);
            continue;
        }
        let caption = v["caption"]
            .as_str()
            .ok_or_else(|| bad("no \"caption\" string".into()))?
            .to_string();
        let references: Vec<String> = match &v["references"] {
            serde_json::Value::String(s) => vec![s.clone()],
            serde_json::Value::Array(a) => a
                .iter()
                .map(|r| r.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| bad("\"references\" holds a non-string".into()))?,
            _ => {
                return Err(bad(
                    "no \"references\" (a string or a list of strings)".into()
                ))
            }
        };
        if references.is_empty() {
            return Err(bad("\"references\" is empty".into()));
        }
        let metadata = match &v["metadata"] {
            serde_json::Value::Object(m) => m
                .iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect(),
            _ => Vec::new(),
        };
        out.predictions.push(Prediction {
            id,
            caption,
            references,
            metadata,
        });
    }
    if out.predictions.is_empty() {
        return Err(EvalError::Empty(path.to_path_buf()));
    }
    Ok(out)
}

/// Corpus-level scores.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub bleu_1: f64,
    pub bleu_2: f64,
    pub bleu_3: f64,
    pub bleu_4: f64,
    pub rouge_l: f64,
    pub cider_d: f64,
    /// Against the first reference, after normalisation (lower case, no punctuation).
    pub wer: f64,
    pub cer: f64,
    /// Fraction of captions equal to one of their references after normalisation.
    pub exact_match: f64,
}

impl Scores {
    /// Each corpus score with its display name, in the order tables show them.
    pub fn named(&self) -> [(&'static str, f64); 9] {
        [
            ("BLEU-1", self.bleu_1),
            ("BLEU-2", self.bleu_2),
            ("BLEU-3", self.bleu_3),
            ("BLEU-4", self.bleu_4),
            ("ROUGE-L", self.rouge_l),
            ("CIDEr-D", self.cider_d),
            ("WER", self.wer),
            ("CER", self.cer),
            ("exact match", self.exact_match),
        ]
    }
}

/// One example's scores.
#[derive(Debug, Clone, Serialize)]
pub struct ExampleScores {
    pub id: String,
    pub caption: String,
    pub references: Vec<String>,
    pub bleu_1: f64,
    pub bleu_4: f64,
    pub rouge_l: f64,
    pub cider_d: f64,
    pub wer: f64,
    pub cer: f64,
    pub exact_match: bool,
    /// Attribute name -> (expected, found in the caption).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, AttributeResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttributeResult {
    pub expected: Option<String>,
    /// The one allowed value the caption names; `None` when it names none or several.
    pub found: Option<String>,
    pub correct: bool,
}

/// Accuracy of one attribute and its confusion table (expected -> found -> count; "(none)"
/// when the caption names no value or several).
#[derive(Debug, Clone, Serialize)]
pub struct AttributeScores {
    pub accuracy: f64,
    /// 95% Wilson score interval of the accuracy.
    pub ci95: [f64; 2],
    pub examples: usize,
    pub confusion: BTreeMap<String, BTreeMap<String, usize>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub examples: usize,
    pub failed: usize,
    /// Teacher-forced loss per target token, when the captions were made here (`--config`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    pub scores: Scores,
    /// 95% intervals of the corpus scores, by the key `scores` uses: a bootstrap over
    /// examples for `wer`, `cer` and `cider_d` (CIDEr-D's document frequencies held at the
    /// whole split's), Wilson's for `exact_match`.
    pub ci95: BTreeMap<String, [f64; 2]>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, AttributeScores>,
    pub per_example: Vec<ExampleScores>,
}

/// The 95% Wilson score interval of `successes` out of `n` (a binomial proportion; sound at
/// small n and near 0 or 1, where the normal approximation is not).
pub fn wilson_ci95(successes: usize, n: usize) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    const Z: f64 = 1.959_963_984_540_054;
    let (n, p) = (n as f64, successes as f64 / n as f64);
    let denominator = 1.0 + Z * Z / n;
    let centre = (p + Z * Z / (2.0 * n)) / denominator;
    let half = Z * (p * (1.0 - p) / n + Z * Z / (4.0 * n * n)).sqrt() / denominator;
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

/// Bootstrap resamples behind each interval; the seed keeps a report reproducible.
const BOOTSTRAP_RESAMPLES: usize = 1000;
const BOOTSTRAP_SEED: u64 = 0x00b0_0757;

/// The 95% percentile bootstrap interval of `statistic` over resamples (with replacement) of
/// `n` examples.
pub fn bootstrap_ci95(n: usize, statistic: impl Fn(&[usize]) -> f64) -> [f64; 2] {
    use rand::{Rng, SeedableRng};
    if n == 0 {
        return [f64::NAN, f64::NAN];
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(BOOTSTRAP_SEED);
    let mut sample = vec![0usize; n];
    let mut values: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            for s in sample.iter_mut() {
                *s = rng.random_range(0..n);
            }
            statistic(&sample)
        })
        .collect();
    values.sort_by(|a, b| a.total_cmp(b));
    let at =
        |q: f64| values[((q * (values.len() - 1) as f64).round() as usize).min(values.len() - 1)];
    [at(0.025), at(0.975)]
}

/// Corpus error rate of the resampled examples' edit counts.
fn resampled_rate(counts: &[metrics::EditCounts], sample: &[usize]) -> f64 {
    let mut total = metrics::EditCounts::default();
    for &i in sample {
        total.add(&counts[i]);
    }
    total.rate()
}

/// Lower-cased words (runs of letters and digits).
fn lower_words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

/// Attributes to check: name -> allowed values (e.g. family -> piano, organ ...).
pub type AttributeSpec = BTreeMap<String, Vec<String>>;

/// The one allowed value `caption` names as a whole word (case-insensitive), if exactly one.
pub fn value_named(caption: &str, allowed: &[String]) -> Option<String> {
    let words = lower_words(caption);
    let named: Vec<&String> = allowed
        .iter()
        .filter(|v| {
            let v_words = lower_words(v);
            !v_words.is_empty()
                && words
                    .windows(v_words.len())
                    .any(|w| w == v_words.as_slice())
        })
        .collect();
    match named.as_slice() {
        [one] => Some((*one).clone()),
        _ => None,
    }
}

/// Scores `predictions` (plus `failed` inputs, counted only) and, for each attribute in
/// `attributes`, how often the caption names the example's metadata value.
pub fn score(predictions: &[Prediction], failed: usize, attributes: &AttributeSpec) -> Report {
    let tokenized: Vec<(String, Vec<String>)> = predictions
        .iter()
        .map(|p| {
            (
                ptb_tokenize(&p.caption),
                p.references.iter().map(|r| ptb_tokenize(r)).collect(),
            )
        })
        .collect();
    let items: Vec<Scored> = tokenized
        .iter()
        .map(|(c, r)| Scored {
            candidate: c,
            references: r,
        })
        .collect();
    let bleu = metrics::bleu(&items);
    let rouge = metrics::rouge_l(&items);
    let cider = metrics::cider_d(&items);
    let pairs: Vec<(&str, &str)> = predictions
        .iter()
        .map(|p| (p.references[0].as_str(), p.caption.as_str()))
        .collect();
    let norm = AsrNormalization::Normalized;
    let (wer, word_counts) = metrics::error_rate(&pairs, metrics::word_edits, norm);
    let (cer, char_counts) = metrics::error_rate(&pairs, metrics::char_edits, norm);
    let exact: Vec<bool> = predictions
        .iter()
        .map(|p| {
            let c = metrics::normalize_text(&p.caption);
            p.references.iter().any(|r| metrics::normalize_text(r) == c)
        })
        .collect();
    let per_example: Vec<ExampleScores> = predictions
        .iter()
        .enumerate()
        .map(|(i, p)| ExampleScores {
            id: p.id.clone(),
            caption: p.caption.clone(),
            references: p.references.clone(),
            bleu_1: bleu[0].per_example[i],
            bleu_4: bleu[3].per_example[i],
            rouge_l: rouge.per_example[i],
            cider_d: cider.per_example[i],
            wer: wer.per_example[i],
            cer: cer.per_example[i],
            exact_match: exact[i],
            attributes: attributes
                .iter()
                .map(|(name, allowed)| {
                    let expected = p
                        .metadata
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.clone());
                    let found = value_named(&p.caption, allowed);
                    let correct = expected.is_some()
                        && found
                            .as_ref()
                            .zip(expected.as_ref())
                            .is_some_and(|(f, e)| f.eq_ignore_ascii_case(e));
                    (
                        name.clone(),
                        AttributeResult {
                            expected,
                            found,
                            correct,
                        },
                    )
                })
                .collect(),
        })
        .collect();
    let attributes = attributes
        .keys()
        .map(|name| (name.clone(), attribute_scores(&per_example, name)))
        .collect();
    let n = predictions.len();
    let exact_count = exact.iter().filter(|&&e| e).count();
    let ci95 = BTreeMap::from([
        (
            "wer".to_string(),
            bootstrap_ci95(n, |s| resampled_rate(&word_counts, s)),
        ),
        (
            "cer".to_string(),
            bootstrap_ci95(n, |s| resampled_rate(&char_counts, s)),
        ),
        (
            "cider_d".to_string(),
            bootstrap_ci95(n, |s| {
                s.iter().map(|&i| cider.per_example[i]).sum::<f64>() / s.len() as f64
            }),
        ),
        ("exact_match".to_string(), wilson_ci95(exact_count, n)),
    ]);
    Report {
        ci95,
        eval_loss: None,
        examples: predictions.len(),
        failed,
        scores: Scores {
            bleu_1: bleu[0].corpus,
            bleu_2: bleu[1].corpus,
            bleu_3: bleu[2].corpus,
            bleu_4: bleu[3].corpus,
            rouge_l: rouge.corpus,
            cider_d: cider.corpus,
            wer: wer.corpus,
            cer: cer.corpus,
            exact_match: exact.iter().filter(|&&e| e).count() as f64 / exact.len().max(1) as f64,
        },
        attributes,
        per_example,
    }
}

fn attribute_scores(per_example: &[ExampleScores], name: &str) -> AttributeScores {
    let mut confusion: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let (mut right, mut n) = (0, 0);
    for e in per_example {
        let Some(a) = e.attributes.get(name) else {
            continue;
        };
        let Some(expected) = &a.expected else {
            continue;
        };
        n += 1;
        right += usize::from(a.correct);
        *confusion
            .entry(expected.clone())
            .or_default()
            .entry(a.found.clone().unwrap_or_else(|| "(none)".into()))
            .or_default() += 1;
    }
    AttributeScores {
        accuracy: right as f64 / n.max(1) as f64,
        ci95: wilson_ci95(right, n),
        examples: n,
        confusion,
    }
}

#[cfg(test)]
mod interval_tests {
    use super::*;

    /// Values from statsmodels 0.15 (proportion_confint, method="wilson").
    #[test]
    fn wilson_matches_known_intervals() {
        let close =
            |a: [f64; 2], b: [f64; 2]| (a[0] - b[0]).abs() < 1e-5 && (a[1] - b[1]).abs() < 1e-5;
        // statsmodels proportion_confint(100, 191, method="wilson") = (0.45297, 0.59323)
        assert!(
            close(wilson_ci95(100, 191), [0.45297, 0.59323]),
            "{:?}",
            wilson_ci95(100, 191)
        );
        // statsmodels proportion_confint(0, 10, method="wilson") = (0.0, 0.27753)
        assert!(
            close(wilson_ci95(0, 10), [0.0, 0.27753]),
            "{:?}",
            wilson_ci95(0, 10)
        );
        assert_eq!(wilson_ci95(0, 0), [0.0, 1.0]);
    }

    #[test]
    fn bootstrap_brackets_the_mean_and_narrows_with_n() {
        let values: Vec<f64> = (0..400).map(|i| (i % 2) as f64).collect();
        let mean = |s: &[usize]| s.iter().map(|&i| values[i]).sum::<f64>() / s.len() as f64;
        let small = bootstrap_ci95(40, mean);
        let large = bootstrap_ci95(400, mean);
        assert!(small[0] < 0.5 && 0.5 < small[1], "{small:?}");
        assert!(large[0] < 0.5 && 0.5 < large[1], "{large:?}");
        // The standard error of a mean of 0/1 values is 0.5 / sqrt(n): ~0.079 and ~0.025.
        assert!(
            (small[1] - small[0] - 4.0 * 0.079).abs() < 0.08,
            "{small:?}"
        );
        assert!(
            (large[1] - large[0] - 4.0 * 0.025).abs() < 0.03,
            "{large:?}"
        );
    }
}
