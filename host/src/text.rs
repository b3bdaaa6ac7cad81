//! Text normalisation shared by scoring (exact match, normalised WER/CER) and the leak audit
//! (the same normalised target on two sides of a split).

/// Lower-case, punctuation deleted, whitespace collapsed and stripped (jiwer's
/// ToLowerCase + RemovePunctuation + RemoveMultipleSpaces + Strip): the form exact match and
/// normalised WER/CER compare.
pub fn normalize_text(text: &str) -> String {
    let lower: String = text
        .to_lowercase()
        .chars()
        .filter(|&c| !is_punctuation_category(c))
        .collect();
    lower.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Unicode general category P (what jiwer's RemovePunctuation deletes).
pub fn is_punctuation_category(c: char) -> bool {
    use unicode_categories::UnicodeCategories;
    c.is_punctuation()
}
