//! Caption post-processor for transcription: the raw text cut at the first stop string, then
//! normalised for scoring: lower case, Unicode punctuation removed, whitespace collapsed.
//! Options: none (it reads no metadata).

use earshot_plugin_sdk::*;
use unicode_categories::UnicodeCategories;

pub fn normalize(raw: &str, stops: &[String]) -> String {
    let cut = stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| raw.find(s.as_str()))
        .min()
        .unwrap_or(raw.len());
    let lowered = raw[..cut].to_lowercase();
    let no_punct: String = lowered
        .chars()
        .map(|c| if c.is_punctuation() { ' ' } else { c })
        .collect();
    no_punct.split_whitespace().collect::<Vec<_>>().join(" ")
}

struct TextNormalize;

impl Plugin for TextNormalize {
    fn info() -> PluginInfo {
        info(
            "text-normalize",
            env!("CARGO_PKG_VERSION"),
            &[Role::CaptionPostProcessor],
            "Transcripts for scoring: cut at stop strings, lower case, no punctuation, single spaces",
        )
    }

    fn process(
        raw: String,
        stops: Vec<String>,
        _metadata: Vec<KeyValue>,
    ) -> Result<String, PluginError> {
        Ok(normalize(&raw, &stops))
    }
}

export_plugin!(TextNormalize);
