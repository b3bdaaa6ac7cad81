//! Text normalisation shared by scoring (exact match, normalised WER/CER) and the leak audit
//! (the same normalised target on two sides of a split); text from plugins and files made
//! safe to print.

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

/// Whether printing `c` could move the cursor, change the terminal's state or reorder the
/// text around it: C0 and C1 controls, DEL, and Unicode's bidirectional formatting marks.
fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Text that came from a plugin, made safe to print on a terminal or in a log: every unsafe
/// character (see [`is_unsafe_char`]) is written as a visible `\u{..}` escape, and the text
/// is cut at about `max_bytes`, saying how much was left out.
pub fn display_text(s: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_bytes) + 16);
    for (i, c) in s.char_indices() {
        if out.len() >= max_bytes {
            out.push_str(&format!("... ({} more bytes)", s.len() - i));
            break;
        }
        if is_unsafe_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// A serialized JSON value made safe for a terminal without changing what it decodes to:
/// the unsafe characters JSON allows raw inside strings (DEL, C1 controls, bidi marks; C0
/// controls are already escaped by serde_json) are written as `\uXXXX` escapes.
pub fn terminal_safe_json(json: String) -> String {
    // Raw newlines, tabs and carriage returns in serialized JSON are its own whitespace
    // (serde_json escapes them inside strings): they stay.
    let unsafe_in_json = |c: char| is_unsafe_char(c) && !matches!(c, '\n' | '\r' | '\t');
    if !json.chars().any(unsafe_in_json) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if unsafe_in_json(c) {
            // All of these are in the Basic Multilingual Plane: one \uXXXX each.
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}
