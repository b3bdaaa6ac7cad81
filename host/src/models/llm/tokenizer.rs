//! The LLM's tokenizer and special tokens: `tokenizer.json` when the model folder has one,
//! otherwise a byte-level BPE rebuilt from GGUF metadata (vocabulary, merges, token types).
//! Special tokens such as `<|im_start|>` are added tokens, so they encode as single ids.

use std::collections::HashMap;
use std::path::Path;

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

pub struct ChatTokenizer {
    pub tokenizer: Tokenizer,
    pub special: SpecialTokens,
    /// Longest text [`Self::encode`] accepts, in bytes: past it the text cannot fit the
    /// model's context whatever it says, and tokenizing it would cost ~75 bytes of memory a
    /// byte. Set by the loader from the context length ([`Self::limit_to_context`]).
    pub max_text_bytes: usize,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Format {
        path: path.to_path_buf(),
        format: "tokenizer",
        reason: e.to_string(),
    }
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
        Ok(Self {
            tokenizer,
            special,
            max_text_bytes: usize::MAX,
        })
    }

    /// `dir/tokenizer.json`, with BOS/EOS from `config.json` / `generation_config.json` and
    /// `add_bos_token` from `tokenizer_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| tok_err(&path, e))?;
        let read = |name: &str| -> Option<serde_json::Value> {
            std::fs::read_to_string(dir.join(name))
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
        Ok(Self {
            tokenizer,
            special,
            max_text_bytes: usize::MAX,
        })
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

    /// Ids for `text`, special tokens parsed, BOS prepended only when the model asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.check_length(text)?;
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| tok_err(Path::new("tokenizer"), e))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.special.add_bos {
            ids.extend(self.special.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Ids for `text` exactly as tokenized (no BOS), for prompt pieces and targets.
    pub fn encode_piece(&self, text: &str) -> Result<Vec<u32>> {
        self.check_length(text)?;
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| tok_err(Path::new("tokenizer"), e))?;
        Ok(enc.get_ids().to_vec())
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
