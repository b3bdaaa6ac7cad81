//! The prompt-template plugin's pieces, tokenized: the one path from an example's metadata
//! (and target) to token ids, for training and captioning alike.

use super::error::Result;

use crate::models::llm::{ChatTokenizer, DATA_CLOSE, DATA_OPEN};
use crate::plugins::PromptTemplate;

/// Token ids of one example's text pieces: `before` the audio, `after` it, and the
/// `target` the LLM should produce (empty when captioning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextPieces {
    pub before: Vec<u32>,
    pub after: Vec<u32>,
    pub target: Vec<u32>,
}

/// A rendered, tokenized prompt and the strings that end a caption.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub pieces: TextPieces,
    pub stop_strings: Vec<String>,
}

/// The template rendered for `metadata` and tokenized; with `target`, the target is formatted
/// by the template and tokenized too (training). The text before the audio starts the
/// sequence (special tokens as the tokenizer adds them); the rest continue it.
///
/// `metadata` and `target` are the dataset's text: the template may write control tokens
/// (its chat markup), the dataset may not. A control token the dataset's text spells is
/// tokenized as the text it is ([`ChatTokenizer::mark_data`]), so an adapter cannot close the
/// user turn, add a system turn or put an end-of-turn inside a target.
pub fn render(
    template: &mut PromptTemplate,
    tokenizer: &ChatTokenizer,
    metadata: &[(String, String)],
    options: &str,
    target: Option<&str>,
) -> Result<Prompt> {
    let _span = tracing::debug_span!("render prompt").entered();
    let metadata: Vec<(String, String)> = metadata
        .iter()
        .map(|(k, v)| (tokenizer.mark_data(k), tokenizer.mark_data(v)))
        .collect();
    let rendered = template.render(&metadata, options)?;
    let target = match target {
        Some(t) => {
            let formatted = template.format_target(&tokenizer.mark_data(t), &metadata, options)?;
            tokenizer.encode_piece(&formatted)?
        }
        None => Vec::new(),
    };
    Ok(Prompt {
        pieces: TextPieces {
            before: tokenizer.encode(&rendered.before_audio)?,
            after: tokenizer.encode_piece(&rendered.after_audio)?,
            target,
        },
        // A template may build a stop string from metadata: it is matched against the
        // caption's text, where the marks have no place.
        stop_strings: rendered
            .stop_strings
            .into_iter()
            .map(|s| s.replace([DATA_OPEN, DATA_CLOSE], ""))
            .collect(),
    })
}
