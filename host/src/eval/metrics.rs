//! Caption and transcription metrics, computed as the references do: BLEU-1..4, ROUGE-L and
//! CIDEr-D as pycocoevalcap 1.2 computes them (after its PTB tokenisation), WER and CER as
//! jiwer 4 defines them, and exact match after normalisation. Tested against values the
//! reference implementations produced (`../shared/oracle/metrics/`).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

/// pycocoevalcap's PTBTokenizer, as Rust: lower-case; split punctuation off words (a
/// hyphen or an apostrophe inside a word stays); split English clitics (`it's` -> `it 's`,
/// `don't` -> `do n't`); drop the punctuation tokens it drops (quotes, brackets, `.` `?` `!`
/// `,` `:` `;` `-` `--` `...`). Tokens are joined by single spaces.
pub fn ptb_tokenize(text: &str) -> String {
    let lower = text.to_lowercase();
    let mut tokens: Vec<String> = Vec::new();
    for chunk in lower.split_whitespace() {
        split_chunk(chunk, &mut tokens);
    }
    tokens.retain(|t| !is_dropped_punctuation(t));
    tokens.join(" ")
}

/// Characters that separate from a word when they lead or trail it.
fn is_edge_punct(c: char) -> bool {
    c.is_ascii_punctuation() || is_unicode_punct(c)
}

/// Non-ASCII punctuation (Unicode category P: dashes, quotes, guillemets, ...).
fn is_unicode_punct(c: char) -> bool {
    !c.is_ascii() && is_punctuation_category(c)
}

/// What PTBTokenizer leaves as separate tokens that pycocoevalcap then removes: a token made
/// only of punctuation, except clitics (`'s`).
fn is_dropped_punctuation(t: &str) -> bool {
    !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_punctuation() || is_unicode_punct(c))
}

const CLITICS: [&str; 6] = ["'s", "'re", "'ve", "'ll", "'d", "'m"];

/// Splits one whitespace-free chunk into tokens: leading and trailing punctuation apart (each
/// character its own token), then clitics off the word, and punctuation inside the word that
/// is not a hyphen, apostrophe, period between letters/digits, slash or ampersand apart too.
fn split_chunk(chunk: &str, out: &mut Vec<String>) {
    let chars: Vec<char> = chunk.chars().collect();
    let mut start = 0;
    let mut end = chars.len();
    while start < end && is_edge_punct(chars[start]) && !starts_clitic(&chars[start..end]) {
        out.push(chars[start].to_string());
        start += 1;
    }
    let mut trailing = Vec::new();
    while end > start && is_edge_punct(chars[end - 1]) {
        // A trailing apostrophe of a plural possessive ("players'") stays a separate token.
        trailing.push(chars[end - 1].to_string());
        end -= 1;
    }
    if start < end {
        let word: String = chars[start..end].iter().collect();
        split_inner(&word, out);
    }
    out.extend(trailing.into_iter().rev());
}

fn starts_clitic(chars: &[char]) -> bool {
    let s: String = chars.iter().collect();
    CLITICS.iter().any(|c| s == *c)
}

/// A word that may hold clitics and inner punctuation.
fn split_inner(word: &str, out: &mut Vec<String>) {
    // Inner punctuation other than joiners splits the word ("a,b" -> "a , b").
    let joiner = |c: char| matches!(c, '-' | '\'' | '.' | '/' | '&' | '_');
    let mut piece = String::new();
    for c in word.chars() {
        if (c.is_ascii_punctuation() || is_unicode_punct(c)) && !joiner(c) {
            if !piece.is_empty() {
                split_clitics(&std::mem::take(&mut piece), out);
            }
            out.push(c.to_string());
        } else {
            piece.push(c);
        }
    }
    if !piece.is_empty() {
        split_clitics(&piece, out);
    }
}

fn split_clitics(word: &str, out: &mut Vec<String>) {
    if let Some(base) = word.strip_suffix("n't").filter(|b| !b.is_empty()) {
        out.push(base.to_string());
        out.push("n't".to_string());
        return;
    }
    for c in CLITICS {
        if let Some(base) = word.strip_suffix(c).filter(|b| !b.is_empty()) {
            out.push(base.to_string());
            out.push(c.to_string());
            return;
        }
    }
    out.push(word.to_string());
}

/// A candidate caption and its references, already tokenized (space-separated tokens).
pub struct Scored<'a> {
    pub candidate: &'a str,
    pub references: &'a [String],
}

/// Corpus and per-example values of one metric.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MetricValues {
    pub corpus: f64,
    pub per_example: Vec<f64>,
}

type Ngram<'a> = Vec<&'a str>;

fn ngram_counts<'a>(words: &[&'a str], n: usize) -> HashMap<Ngram<'a>, usize> {
    let mut counts = HashMap::new();
    for k in 1..=n {
        for w in words.windows(k) {
            *counts.entry(w.to_vec()).or_insert(0) += 1;
        }
    }
    counts
}

/// BLEU-1..4 as pycocoevalcap's `BleuScorer.compute_score(option="closest")`: clipped n-gram
/// counts against the per-n-gram maximum over references, the reference length closest to
/// the candidate's (shorter on ties), the brevity penalty, and its smoothing constants
/// (1e-15 and 1e-9). Per example from its own counts; corpus from the pooled counts.
pub fn bleu(items: &[Scored]) -> [MetricValues; 4] {
    const TINY: f64 = 1e-15;
    const SMALL: f64 = 1e-9;
    let mut per: [Vec<f64>; 4] = Default::default();
    let (mut total_test, mut total_ref) = (0usize, 0usize);
    let mut total_guess = [0usize; 4];
    let mut total_correct = [0usize; 4];
    for item in items {
        let cand: Vec<&str> = item.candidate.split_whitespace().collect();
        let mut max_ref: HashMap<Ngram, usize> = HashMap::new();
        let mut ref_lens = Vec::new();
        for r in item.references {
            let words: Vec<&str> = r.split_whitespace().collect();
            ref_lens.push(words.len());
            for (g, c) in ngram_counts(&words, 4) {
                let e = max_ref.entry(g).or_insert(0);
                *e = (*e).max(c);
            }
        }
        let test_len = cand.len();
        let ref_len = ref_lens
            .iter()
            .map(|&l| (l.abs_diff(test_len), l))
            .min()
            .map_or(0, |(_, l)| l);
        let mut guess = [0usize; 4];
        let mut correct = [0usize; 4];
        for (k, g) in guess.iter_mut().enumerate() {
            *g = test_len.saturating_sub(k);
        }
        for (g, c) in ngram_counts(&cand, 4) {
            correct[g.len() - 1] += c.min(max_ref.get(&g).copied().unwrap_or(0));
        }
        let scores = bleu_from(test_len, ref_len, &guess, &correct, TINY, SMALL);
        for k in 0..4 {
            per[k].push(scores[k]);
            total_guess[k] += guess[k];
            total_correct[k] += correct[k];
        }
        total_test += test_len;
        total_ref += ref_len;
    }
    let corpus = bleu_from(
        total_test,
        total_ref,
        &total_guess,
        &total_correct,
        TINY,
        SMALL,
    );
    std::array::from_fn(|k| MetricValues {
        corpus: corpus[k],
        per_example: per[k].clone(),
    })
}

fn bleu_from(
    test_len: usize,
    ref_len: usize,
    guess: &[usize; 4],
    correct: &[usize; 4],
    tiny: f64,
    small: f64,
) -> [f64; 4] {
    let mut out = [0.0; 4];
    let mut product = 1.0;
    for k in 0..4 {
        product *= (correct[k] as f64 + tiny) / (guess[k] as f64 + small);
        out[k] = product.powf(1.0 / (k + 1) as f64);
    }
    let ratio = (test_len as f64 + tiny) / (ref_len as f64 + small);
    if ratio < 1.0 {
        for v in &mut out {
            *v *= (1.0 - 1.0 / ratio).exp();
        }
    }
    out
}

/// ROUGE-L as pycocoevalcap's `Rouge` (beta 1.2): the longest common subsequence with each
/// reference, the best precision and the best recall combined into an F-measure; corpus =
/// mean of the examples.
pub fn rouge_l(items: &[Scored]) -> MetricValues {
    const BETA: f64 = 1.2;
    let per: Vec<f64> = items
        .iter()
        .map(|item| {
            // `split(" ")`: an empty candidate is one empty token.
            let cand: Vec<&str> = item.candidate.split(' ').collect();
            let (mut prec, mut rec) = (0.0f64, 0.0f64);
            for r in item.references {
                let reference: Vec<&str> = r.split(' ').collect();
                let l = lcs(&reference, &cand) as f64;
                prec = prec.max(l / cand.len() as f64);
                rec = rec.max(l / reference.len() as f64);
            }
            if prec != 0.0 && rec != 0.0 {
                (1.0 + BETA * BETA) * prec * rec / (rec + BETA * BETA * prec)
            } else {
                0.0
            }
        })
        .collect();
    MetricValues {
        corpus: mean(&per),
        per_example: per,
    }
}

fn lcs(a: &[&str], b: &[&str]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    for x in a {
        let mut cur = vec![0usize; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                prev[j + 1].max(cur[j])
            };
        }
        prev = cur;
    }
    prev[b.len()]
}

/// CIDEr-D as pycocoevalcap's `Cider`: n = 1..4 TF-IDF vectors with document frequencies
/// from the references of the examples scored together, clipped products, a Gaussian
/// length penalty (sigma 6; "length" counted as pycocoevalcap does, in bigrams), mean over
/// references and n, x10; corpus = mean of the examples.
pub fn cider_d(items: &[Scored]) -> MetricValues {
    const SIGMA: f64 = 6.0;
    let cooked_refs: Vec<Vec<HashMap<Ngram, usize>>> = items
        .iter()
        .map(|i| {
            i.references
                .iter()
                .map(|r| ngram_counts(&r.split_whitespace().collect::<Vec<_>>(), 4))
                .collect()
        })
        .collect();
    let mut df: HashMap<&Ngram, f64> = HashMap::new();
    for refs in &cooked_refs {
        let distinct: HashSet<&Ngram> = refs.iter().flat_map(|r| r.keys()).collect();
        for g in distinct {
            *df.entry(g).or_insert(0.0) += 1.0;
        }
    }
    let ref_len = (items.len() as f64).ln();
    let per: Vec<f64> = items
        .iter()
        .zip(&cooked_refs)
        .map(|(item, refs)| {
            let cand = ngram_counts(&item.candidate.split_whitespace().collect::<Vec<_>>(), 4);
            let (v_h, n_h, l_h) = tf_idf(&cand, &df, ref_len);
            let mut score = [0.0f64; 4];
            for r in refs {
                let (v_r, n_r, l_r) = tf_idf(r, &df, ref_len);
                let delta = l_h as f64 - l_r as f64;
                for n in 0..4 {
                    let mut val: f64 = v_h[n]
                        .iter()
                        .map(|(g, &h)| {
                            let r = v_r[n].get(g).copied().unwrap_or(0.0);
                            h.min(r) * r
                        })
                        .sum();
                    if n_h[n] != 0.0 && n_r[n] != 0.0 {
                        val /= n_h[n] * n_r[n];
                    }
                    score[n] += val * (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
                }
            }
            mean(&score) / refs.len().max(1) as f64 * 10.0
        })
        .collect();
    MetricValues {
        corpus: mean(&per),
        per_example: per,
    }
}

/// CIDEr's TF-IDF vectors per n, their norms, and pycocoevalcap's "length" (the number of
/// bigrams: it counts where `n == 1` with n the n-gram length minus one).
type TfIdf<'a> = ([HashMap<Ngram<'a>, f64>; 4], [f64; 4], usize);

fn tf_idf<'a>(
    counts: &HashMap<Ngram<'a>, usize>,
    df: &HashMap<&Ngram, f64>,
    ref_len: f64,
) -> TfIdf<'a> {
    let mut vec: [HashMap<Ngram, f64>; 4] = Default::default();
    let mut norm = [0.0f64; 4];
    let mut length = 0usize;
    for (g, &tf) in counts {
        let d = df.get(g).copied().unwrap_or(0.0).max(1.0).ln();
        let n = g.len() - 1;
        let v = tf as f64 * (ref_len - d);
        vec[n].insert(g.clone(), v);
        norm[n] += v * v;
        if n == 1 {
            length += tf;
        }
    }
    (vec, norm.map(f64::sqrt), length)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Edit operations of an alignment of a hypothesis with its reference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EditCounts {
    pub hits: usize,
    pub substitutions: usize,
    pub deletions: usize,
    pub insertions: usize,
}

impl EditCounts {
    pub fn errors(&self) -> usize {
        self.substitutions + self.deletions + self.insertions
    }

    /// Reference units: hits + substitutions + deletions.
    pub fn reference_len(&self) -> usize {
        self.hits + self.substitutions + self.deletions
    }

    /// Errors per reference unit (WER/CER); 0 for an empty reference and hypothesis.
    pub fn rate(&self) -> f64 {
        match self.reference_len() {
            0 if self.insertions == 0 => 0.0,
            0 => f64::INFINITY,
            n => self.errors() as f64 / n as f64,
        }
    }

    pub fn add(&mut self, o: &EditCounts) {
        self.hits += o.hits;
        self.substitutions += o.substitutions;
        self.deletions += o.deletions;
        self.insertions += o.insertions;
    }
}

/// A minimum-edit alignment of `hyp` with `reference` (Levenshtein, unit costs), counted.
/// Among alignments of equal cost the backtrace prefers a hit or substitution, then a
/// deletion, then an insertion.
pub fn align<T: PartialEq>(reference: &[T], hyp: &[T]) -> EditCounts {
    let (n, m) = (reference.len(), hyp.len());
    let mut d = vec![vec![0usize; m + 1]; n + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=n {
        for j in 1..=m {
            let sub = d[i - 1][j - 1] + usize::from(reference[i - 1] != hyp[j - 1]);
            d[i][j] = sub.min(d[i - 1][j] + 1).min(d[i][j - 1] + 1);
        }
    }
    let (mut i, mut j) = (n, m);
    let mut c = EditCounts::default();
    while i > 0 || j > 0 {
        if i > 0 && j > 0 {
            let same = reference[i - 1] == hyp[j - 1];
            if d[i][j] == d[i - 1][j - 1] + usize::from(!same) {
                if same {
                    c.hits += 1;
                } else {
                    c.substitutions += 1;
                }
                i -= 1;
                j -= 1;
                continue;
            }
        }
        if i > 0 && d[i][j] == d[i - 1][j] + 1 {
            c.deletions += 1;
            i -= 1;
        } else {
            c.insertions += 1;
            j -= 1;
        }
    }
    c
}

/// How text is prepared before WER/CER.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsrNormalization {
    /// jiwer's defaults: WER on words split at spaces (multiple spaces collapsed, ends
    /// stripped); CER on the stripped characters, spaces included. Case and punctuation kept.
    Raw,
    /// Lower-case, Unicode punctuation (category P) deleted, spaces collapsed, stripped.
    Normalized,
}

use crate::text::is_punctuation_category;
pub use crate::text::normalize_text;

fn prepare(text: &str, norm: AsrNormalization) -> String {
    match norm {
        AsrNormalization::Raw => text.to_string(),
        AsrNormalization::Normalized => normalize_text(text),
    }
}

/// Word alignment counts of `hyp` against `reference`.
pub fn word_edits(reference: &str, hyp: &str, norm: AsrNormalization) -> EditCounts {
    let (r, h) = (prepare(reference, norm), prepare(hyp, norm));
    let r: Vec<&str> = r.split_whitespace().collect();
    let h: Vec<&str> = h.split_whitespace().collect();
    align(&r, &h)
}

/// Character alignment counts (spaces are characters).
pub fn char_edits(reference: &str, hyp: &str, norm: AsrNormalization) -> EditCounts {
    let (r, h) = (prepare(reference, norm), prepare(hyp, norm));
    let r: Vec<char> = r.trim().chars().collect();
    let h: Vec<char> = h.trim().chars().collect();
    align(&r, &h)
}

/// WER or CER per pair and over the corpus (total edits / total reference units).
pub fn error_rate(
    pairs: &[(&str, &str)],
    edits: fn(&str, &str, AsrNormalization) -> EditCounts,
    norm: AsrNormalization,
) -> (MetricValues, Vec<EditCounts>) {
    let counts: Vec<EditCounts> = pairs.iter().map(|(r, h)| edits(r, h, norm)).collect();
    let mut total = EditCounts::default();
    for c in &counts {
        total.add(c);
    }
    (
        MetricValues {
            corpus: total.rate(),
            per_example: counts.iter().map(EditCounts::rate).collect(),
        },
        counts,
    )
}
