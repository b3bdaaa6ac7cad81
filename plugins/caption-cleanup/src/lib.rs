//! Caption post-processor: cut at the first stop string or special token, drop a trailing
//! unfinished sentence, normalise whitespace.

use earshot_plugin_sdk::*;

struct Cleanup;

/// Byte offset of the first special token such as `<|im_end|>`, `</s>` or `<s>`.
fn first_special(text: &str) -> Option<usize> {
    let mut best: Option<usize> = None;
    let mut consider = |i: usize| best = Some(best.map_or(i, |b: usize| b.min(i)));
    if let Some(i) = text.find("<|") {
        if text[i..].contains("|>") {
            consider(i);
        }
    }
    for tok in ["</s>", "<s>", "<unk>"] {
        if let Some(i) = text.find(tok) {
            consider(i);
        }
    }
    best
}

fn clean(raw: &str, stops: &[String]) -> String {
    let mut end = raw.len();
    for s in stops.iter().filter(|s| !s.is_empty()) {
        if let Some(i) = raw.find(s.as_str()) {
            end = end.min(i);
        }
    }
    if let Some(i) = first_special(raw) {
        end = end.min(i);
    }
    let text = raw[..end].split_whitespace().collect::<Vec<_>>().join(" ");
    let ends_sentence = |c: char| matches!(c, '.' | '!' | '?' | '。' | '！' | '？');
    if text.ends_with(ends_sentence) {
        return text;
    }
    // Unfinished last sentence: keep up to the last sentence end, if there is one.
    match text.rfind(ends_sentence) {
        Some(i) => {
            let cut = i + text[i..].chars().next().map_or(1, |c| c.len_utf8());
            text[..cut].to_string()
        }
        None => text,
    }
}

impl Plugin for Cleanup {
    fn info() -> PluginInfo {
        info(
            "caption-cleanup",
            env!("CARGO_PKG_VERSION"),
            &[Role::CaptionPostProcessor],
            "Cuts at stop strings/special tokens, drops an unfinished last sentence, normalises whitespace",
        )
    }

    fn process(
        raw: String,
        stop_strings: Vec<String>,
        _metadata: Vec<KeyValue>,
    ) -> Result<String, PluginError> {
        Ok(clean(&raw, &stop_strings))
    }
}

export_plugin!(Cleanup);
