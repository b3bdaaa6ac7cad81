//! Loading a Llama-family LLM from a GGUF file (dequantized) or a Hugging Face folder
//! (`config.json`, `model.safetensors` or shards, `tokenizer.json`), with integrity checks.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::Tensor;

use super::llama::{Llama, LlamaConfig};
use super::tokenizer::ChatTokenizer;
use crate::models::packed::PackedMatrix;
use crate::models::weights::{read_json_config, ModelError, Result, WeightStore};
use crate::models::whisper::safetensors_files;
use crate::models::Runtime;

/// Where the LLM comes from.
#[derive(Debug, Clone)]
pub enum LlmSource {
    Gguf(PathBuf),
    HfDir(PathBuf),
}

impl LlmSource {
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Ok(Self::HfDir(path.to_path_buf()))
        } else if path.is_file() {
            Ok(Self::Gguf(path.to_path_buf()))
        } else {
            Err(ModelError::Io {
                path: path.to_path_buf(),
                cause: crate::files::neither_file_nor_folder(path),
            })
        }
    }
}

/// Whether a GGUF load also keeps the Q4_0/Q4_1/Q8_0 blocks that decoding reads (see
/// `models::packed`; only CPU f32 models use them). Training, inspection and export never
/// decode, and skip the copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufBlocks {
    Keep,
    Skip,
}

pub struct LoadedLlm {
    pub model: Llama,
    pub tokenizer: ChatTokenizer,
    pub source: LlmSource,
}

/// Reads the weights (and the tokenizer) of a GGUF file or HF folder, checks them, builds
/// the model; for generating text (GGUF blocks kept for decoding).
pub fn load_llm(path: &Path, rt: &Runtime) -> Result<LoadedLlm> {
    load_llm_with(path, rt, GgufBlocks::Keep)
}

/// As [`load_llm`], choosing whether GGUF blocks are kept (training passes `Skip`).
pub fn load_llm_with(path: &Path, rt: &Runtime, blocks: GgufBlocks) -> Result<LoadedLlm> {
    let source = LlmSource::from_path(path)?;
    let (mut store, config, mut tokenizer) = match &source {
        LlmSource::Gguf(p) => {
            let (store, config, meta) = read_gguf(p, rt, blocks)?;
            let tok = ChatTokenizer::from_gguf(p, &meta)?;
            (store, config, tok)
        }
        LlmSource::HfDir(dir) => {
            let config: LlamaConfig = read_json_config(&dir.join("config.json"))?;
            let store = WeightStore::from_safetensors(&safetensors_files(dir)?, &rt.device)?;
            (store, config, ChatTokenizer::from_hf_dir(dir)?)
        }
    };
    tokenizer.limit_to_context(config.max_position_embeddings);
    store.verify_finite()?;
    super::stack_projections(&mut store, &config)?;
    let model = Llama::load(&store, &config, rt.dtype, &rt.device)?;
    Ok(LoadedLlm {
        model,
        tokenizer,
        source,
    })
}

/// GGUF tensor names -> Hugging Face Llama names.
fn hf_name(gguf: &str) -> String {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return f.to_string();
    }
    if let Some(rest) = gguf.strip_prefix("blk.") {
        if let Some((layer, part)) = rest.split_once('.') {
            let mapped = match part {
                "attn_norm.weight" => "input_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                _ => return gguf.to_string(),
            };
            return format!("model.layers.{layer}.{mapped}");
        }
    }
    gguf.to_string()
}

fn meta_int(meta: &HashMap<String, Value>, key: &str) -> Option<usize> {
    match meta.get(key)? {
        Value::U8(x) => Some(*x as usize),
        Value::U16(x) => Some(*x as usize),
        Value::U32(x) => Some(*x as usize),
        Value::U64(x) => Some(*x as usize),
        Value::I32(x) => Some(*x as usize),
        Value::I64(x) => Some(*x as usize),
        _ => None,
    }
}

fn meta_f64(meta: &HashMap<String, Value>, key: &str) -> Option<f64> {
    match meta.get(key)? {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        _ => None,
    }
}

/// Parses the GGUF header, dequantizes every tensor, derives the config from metadata.
pub fn read_gguf(
    path: &Path,
    rt: &Runtime,
    blocks: GgufBlocks,
) -> Result<(WeightStore, LlamaConfig, HashMap<String, Value>)> {
    let fmt_err = |reason: String| ModelError::Format {
        path: path.to_path_buf(),
        format: "GGUF",
        reason,
    };
    let file = crate::files::open(path).map_err(|cause| ModelError::Io {
        path: path.to_path_buf(),
        cause,
    })?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|e| fmt_err(e.to_string()))?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    if arch != "llama" && arch != "mistral" {
        return Err(fmt_err(format!(
            "architecture {arch:?} is not supported (llama family only)"
        )));
    }
    let mut tensors = HashMap::new();
    let mut packed = Vec::new();
    // Decoding on the CPU in f32 reads these blocks instead of the f32 copies (`packed`).
    let keep_blocks =
        blocks == GgufBlocks::Keep && rt.device.is_cpu() && rt.dtype == candle_core::DType::F32;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let info = &content.tensor_infos[name];
        let bytes =
            info.shape.elem_count() / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let end = content.tensor_data_offset + info.offset + bytes as u64;
        if end > file_len {
            return Err(fmt_err(format!(
                "tensor `{name}` needs bytes up to {end}, the file has {file_len} (truncated)"
            )));
        }
        let q = content
            .tensor(&mut reader, name, &rt.device)
            .map_err(|e| fmt_err(format!("tensor `{name}`: {e}")))?;
        let t: Tensor = q.dequantize(&rt.device)?;
        if keep_blocks {
            if let Some(p) = PackedMatrix::from_qtensor(&q)? {
                packed.push((hf_name(name), p));
            }
        }
        tensors.insert(hf_name(name), t);
    }
    let m = &content.metadata;
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| {
        meta_int(m, &key(k)).ok_or_else(|| fmt_err(format!("metadata {} is missing", key(k))))
    };
    let embed_shape = tensors
        .get("model.embed_tokens.weight")
        .map(|t| t.dims().to_vec())
        .ok_or_else(|| fmt_err("tensor token_embd.weight is missing".into()))?;
    let heads = need("attention.head_count")?;
    let hidden = need("embedding_length")?;
    let config = LlamaConfig {
        vocab_size: embed_shape[0],
        hidden_size: hidden,
        intermediate_size: need("feed_forward_length")?,
        num_hidden_layers: need("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: meta_int(m, &key("attention.head_count_kv")),
        head_dim: meta_int(m, &key("attention.key_length")),
        rms_norm_eps: meta_f64(m, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: meta_f64(m, &key("rope.freq_base")).unwrap_or(10_000.0),
        max_position_embeddings: need("context_length")?,
        sliding_window: meta_int(m, &key("attention.sliding_window")),
        tie_word_embeddings: !tensors.contains_key("lm_head.weight"),
        rope_interleaved: true,
    };
    let mut store = WeightStore::new(path.display().to_string(), tensors);
    for (name, p) in packed {
        store.insert_packed(name, p);
    }
    Ok((store, config, content.metadata))
}

/// Undoes llama.cpp's per-head row permutation of Q/K projections: stored rows are
/// (head, i, half) for HF's (head, half, i), so that rotating halves on the result equals
/// rotating adjacent pairs on the stored weights.
pub fn unpermute_qk(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let hd = out / n_heads;
    Ok(w.reshape((n_heads, hd / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))?)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportSummary {
    pub tensors: usize,
    pub shards: usize,
}

/// `earshot import gguf`: a GGUF Llama-family model to a Hugging Face folder (f32
/// safetensors, optionally in `shards` files with an index, config.json, tokenizer.json,
/// tokenizer_config.json), written to OUT.partial and renamed into place.
pub fn export_gguf_to_hf(gguf: &Path, out_dir: &Path, shards: usize) -> Result<ExportSummary> {
    let rt = Runtime::cpu();
    let (store, mut config, meta) = read_gguf(gguf, &rt, GgufBlocks::Skip)?;
    store.verify_finite()?;
    let tok = ChatTokenizer::from_gguf(gguf, &meta)?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in store.iter() {
        let t = if name.ends_with("self_attn.q_proj.weight") {
            unpermute_qk(t, config.num_attention_heads)?
        } else if name.ends_with("self_attn.k_proj.weight") {
            unpermute_qk(t, config.n_kv_heads())?
        } else {
            t.clone()
        };
        tensors.push((name.clone(), t));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    config.rope_interleaved = false;
    let partial = PathBuf::from(format!("{}.partial", out_dir.display()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| ModelError::Io { path, cause }
    };
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io(&partial))?;
    }
    std::fs::create_dir_all(&partial).map_err(io(&partial))?;
    let shards = shards.max(1);
    let per = tensors.len().div_ceil(shards);
    let mut weight_map = std::collections::BTreeMap::new();
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards)
        };
        let map: HashMap<String, Tensor> = chunk.iter().cloned().collect();
        for (name, _) in chunk {
            weight_map.insert(name.clone(), file.clone());
        }
        crate::models::weights::save_safetensors_pt(&map, &partial.join(&file))?;
    }
    if shards > 1 {
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(
            partial.join("model.safetensors.index.json"),
            index.to_string(),
        )
        .map_err(io(&partial))?;
    }
    let mut cfg = serde_json::to_value(&config).expect("config serialises");
    cfg["model_type"] = "llama".into();
    cfg["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    cfg["bos_token_id"] = tok.special.bos.into();
    cfg["eos_token_id"] = tok.special.eos.into();
    std::fs::write(
        partial.join("config.json"),
        serde_json::to_string_pretty(&cfg).expect("json"),
    )
    .map_err(io(&partial))?;
    tok.tokenizer
        .save(partial.join("tokenizer.json"), false)
        .map_err(|e| ModelError::Format {
            path: partial.join("tokenizer.json"),
            format: "tokenizer",
            reason: e.to_string(),
        })?;
    std::fs::write(
        partial.join("tokenizer_config.json"),
        serde_json::json!({ "add_bos_token": tok.special.add_bos }).to_string(),
    )
    .map_err(io(&partial))?;
    if out_dir.exists() {
        std::fs::remove_dir_all(out_dir).map_err(io(out_dir))?;
    }
    std::fs::rename(&partial, out_dir).map_err(io(out_dir))?;
    Ok(ExportSummary {
        tensors: tensors.len(),
        shards,
    })
}
