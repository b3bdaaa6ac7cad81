//! The LLM's tokenizer and special tokens: `tokenizer.json` when the model folder has one,
//! otherwise a byte-level BPE rebuilt from GGUF metadata (vocabulary, merges, token types).
//! Special tokens such as `<|im_start|>` are added tokens, so they encode as single ids.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use aho_corasick::AhoCorasick;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::models::weights::{ModelError, Result};

/// BOS/EOS ids and whether a BOS is prepended to prompts.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    /// Ids of control/special tokens (never part of a caption).
    pub control: Vec<u32>,
}

/// Opens a span of dataset text inside a prompt string ([`ChatTokenizer::mark_data`]). Both
/// marks are Unicode noncharacters, which the standard reserves for a program's internal use.
pub const DATA_OPEN: char = '\u{FDD0}';
/// Closes a span opened by [`DATA_OPEN`].
pub const DATA_CLOSE: char = '\u{FDD1}';

pub struct ChatTokenizer {
    pub tokenizer: Tokenizer,
    pub special: SpecialTokens,
    /// Longest text [`Self::encode`] accepts, in bytes: past it the text cannot fit the
    /// model's context whatever it says, and tokenizing it would cost ~75 bytes of memory a
    /// byte. Set by the loader from the context length ([`Self::limit_to_context`]).
    pub max_text_bytes: usize,
    /// Finds the text of any control token (`<|im_end|>`, `</s>`); `None` when there is none.
    control_text: Option<AhoCorasick>,
    /// The tokenizer with control tokens read as plain text, made the first time dataset
    /// text spells one (rare: a clone costs the vocabulary's memory).
    literal: OnceLock<Tokenizer>,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Format {
        path: path.to_path_buf(),
        format: "tokenizer",
        reason: e.to_string(),
    }
}

/// `text` cut at the data marks into (is dataset text, piece), marks dropped. A span runs
/// from an open mark to the next close mark or the end; a stray close mark is dropped.
fn data_spans(text: &str) -> Vec<(bool, &str)> {
    let mut spans = Vec::new();
    let mut in_data = false;
    let mut start = 0;
    for (at, c) in text.char_indices() {
        let opens = c == DATA_OPEN && !in_data;
        let closes = c == DATA_CLOSE && in_data;
        if c == DATA_OPEN || c == DATA_CLOSE {
            if start < at {
                spans.push((in_data, &text[start..at]));
            }
            start = at + c.len_utf8();
            if opens || closes {
                in_data = opens;
            }
        }
    }
    if start < text.len() {
        spans.push((in_data, &text[start..]));
    }
    spans
}

fn int(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => *x as i64,
        Value::I64(x) => *x,
        Value::Bool(b) => *b as i64,
        _ => return None,
    })
}

impl ChatTokenizer {
    /// Rebuilds the tokenizer of a "gpt2"-type (byte-level BPE) GGUF vocabulary.
    pub fn from_gguf(path: &Path, meta: &HashMap<String, Value>) -> Result<Self> {
        let get = |k: &str| meta.get(k);
        let model = get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(tok_err(
                path,
                format!("tokenizer.ggml.model = {model:?}: only byte-level BPE (\"gpt2\") GGUF vocabularies are supported; use a Hugging Face folder with tokenizer.json"),
            ));
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            let arr = get(k)
                .and_then(|v| v.to_vec().ok())
                .ok_or_else(|| tok_err(path, format!("metadata {k} is missing")))?;
            arr.iter()
                .map(|v| v.to_string().cloned().map_err(|e| tok_err(path, e)))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                let (a, b) = m
                    .split_once(' ')
                    .ok_or_else(|| tok_err(path, format!("bad merge {m:?}")))?;
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<_>>()?;
        let types: Vec<i64> = get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|a| a.iter().filter_map(int).collect())
            .unwrap_or_default();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tok_err(path, e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre = get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok());
        if pre.map(|s| s.as_str()) == Some("smollm") {
            // SmolLM splits digits individually before the GPT-2 byte-level split.
            tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ])));
        } else {
            tokenizer.with_pre_tokenizer(Some(byte_level));
        }
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        // 3 = control, 4 = user-defined (llama.cpp's token types).
        let mut control = Vec::new();
        let added: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(i, &t)| {
                if t == 3 {
                    control.push(i as u32);
                }
                AddedToken::from(tokens[i].clone(), t == 3)
            })
            .collect();
        tokenizer
            .add_special_tokens(added)
            .map_err(|e| tok_err(path, e))?;
        let id = |k: &str| get(k).and_then(int).map(|v| v as u32);
        let special = SpecialTokens {
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos: get("tokenizer.ggml.add_bos_token")
                .and_then(int)
                .map(|v| v != 0)
                .unwrap_or(false),
            control,
        };
        Self::new(path, tokenizer, special)
    }

    /// `dir/tokenizer.json`, with BOS/EOS from `config.json` / `generation_config.json` and
    /// `add_bos_token` from `tokenizer_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = crate::files::read(&path).map_err(|e| tok_err(&path, e))?;
        let tokenizer = Tokenizer::from_bytes(bytes).map_err(|e| tok_err(&path, e))?;
        let read = |name: &str| -> Option<serde_json::Value> {
            crate::files::read_to_string(&dir.join(name))
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
        };
        let tok_cfg = read("tokenizer_config.json").unwrap_or_default();
        let cfg = read("config.json").unwrap_or_default();
        let gen = read("generation_config.json").unwrap_or_default();
        let first_id = |v: &serde_json::Value| -> Option<u32> {
            match v {
                serde_json::Value::Number(n) => n.as_u64().map(|x| x as u32),
                serde_json::Value::Array(a) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
                _ => None,
            }
        };
        let pick = |key: &str| first_id(&gen[key]).or_else(|| first_id(&cfg[key]));
        let control = tokenizer
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        let special = SpecialTokens {
            bos: pick("bos_token_id"),
            eos: pick("eos_token_id"),
            add_bos: tok_cfg["add_bos_token"].as_bool().unwrap_or(false),
            control,
        };
        Self::new(&path, tokenizer, special)
    }

    fn new(path: &Path, tokenizer: Tokenizer, special: SpecialTokens) -> Result<Self> {
        let control: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content.clone())
            .collect();
        let control_text = if control.is_empty() {
            None
        } else {
            Some(AhoCorasick::new(&control).map_err(|e| tok_err(path, e))?)
        };
        Ok(Self {
            tokenizer,
            special,
            max_text_bytes: usize::MAX,
            control_text,
            literal: OnceLock::new(),
        })
    }

    /// Dataset text (an adapter's metadata value or target) made safe to place in a prompt:
    /// when it spells a control token it is wrapped in [`DATA_OPEN`]..[`DATA_CLOSE`], which
    /// [`Self::encode`] reads as plain text, so a dataset cannot end a chat turn, open a
    /// system turn or stop a caption. The marks themselves are removed from the text first:
    /// only the host places them.
    pub fn mark_data(&self, text: &str) -> String {
        let text: String = text
            .chars()
            .filter(|&c| c != DATA_OPEN && c != DATA_CLOSE)
            .collect();
        match &self.control_text {
            Some(control) if control.is_match(&text) => format!("{DATA_OPEN}{text}{DATA_CLOSE}"),
            _ => text,
        }
    }

    /// Bounds the text [`Self::encode`] takes to what `context` tokens could hold: no token
    /// stands for more text bytes than its vocabulary string's UTF-8 length (byte-level BPE
    /// writes one byte as one or two, SentencePiece a space as three), times 4 for
    /// normalizers that shorten text (NFKC ligatures).
    pub fn limit_to_context(&mut self, context: usize) {
        let longest = self
            .tokenizer
            .get_vocab(true)
            .keys()
            .map(|piece| piece.len())
            .max()
            .unwrap_or(1)
            .max(1);
        self.max_text_bytes = context.saturating_mul(longest).saturating_mul(4);
    }

    /// Refuses text too long to fit the context, before tokenizing it.
    fn check_length(&self, text: &str) -> Result<()> {
        if text.len() > self.max_text_bytes {
            return Err(ModelError::Input {
                what: "LLM input".into(),
                reason: format!(
                    "a text of {} bytes cannot fit the model's context (at most {} bytes could); \
                     refused before tokenizing",
                    text.len(),
                    self.max_text_bytes
                ),
            });
        }
        Ok(())
    }

    /// Ids for `text`, special tokens parsed (except in marked dataset text, see
    /// [`Self::mark_data`]), BOS prepended only when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if self.special.add_bos {
            ids.extend(self.special.bos);
        }
        ids.extend(self.encode_piece(text)?);
        Ok(ids)
    }

    /// Ids for `text` exactly as tokenized (no BOS), for prompt pieces and targets. Control
    /// tokens are parsed, except inside marked dataset text ([`Self::mark_data`]), which is
    /// tokenized on its own, as plain text.
    pub fn encode_piece(&self, text: &str) -> Result<Vec<u32>> {
        self.check_length(text)?;
        let tok = |t: &Tokenizer, piece: &str| -> Result<Vec<u32>> {
            Ok(t.encode(piece, false)
                .map_err(|e| tok_err(Path::new("tokenizer"), e))?
                .get_ids()
                .to_vec())
        };
        if !text.contains([DATA_OPEN, DATA_CLOSE]) {
            return tok(&self.tokenizer, text);
        }
        let mut ids = Vec::new();
        for (is_data, piece) in data_spans(text) {
            if is_data {
                let literal = self.literal.get_or_init(|| {
                    let mut t = self.tokenizer.clone();
                    t.set_encode_special_tokens(true);
                    t
                });
                ids.extend(tok(literal, piece)?);
            } else {
                ids.extend(tok(&self.tokenizer, piece)?);
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| tok_err(Path::new("tokenizer"), e))
    }

    pub fn id_of(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_spans_cut_at_the_marks_and_drop_them() {
        let o = DATA_OPEN;
        let c = DATA_CLOSE;
        assert_eq!(data_spans("plain"), vec![(false, "plain")]);
        assert_eq!(
            data_spans(&format!("a{o}b{c}d")),
            vec![(false, "a"), (true, "b"), (false, "d")]
        );
        // An unclosed span runs to the end; a stray close and a nested open are dropped.
        assert_eq!(
            data_spans(&format!("a{c}b{o}c{o}d")),
            vec![(false, "a"), (false, "b"), (true, "c"), (true, "d")]
        );
        assert_eq!(data_spans(&format!("{o}{c}")), vec![]);
    }
}
