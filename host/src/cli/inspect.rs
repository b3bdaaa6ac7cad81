use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::models::llm::ChatTokenizer;
use crate::models::weights::{ModelError, WeightStore};
use crate::models::whisper::safetensors_files;
use crate::models::Runtime;

#[derive(Debug, Args)]
#[command(
    after_help = "PATH may be a GGUF file, a .safetensors file, a Hugging Face layout folder \
(config.json + safetensors) or a CTranslate2 folder (model.bin). Every tensor is checked for \
NaN/Inf: the exit status is non-zero if any holds one, and each offending tensor is named.\n\nExample:\n  earshot inspect \\\n    ~/.cache/earshot/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
)]
pub struct InspectArgs {
    /// Model file or folder
    pub path: PathBuf,
}

struct Summary {
    architecture: String,
    tensors: usize,
    params: usize,
    by_dtype: BTreeMap<String, usize>,
    special: Vec<String>,
    files: Vec<PathBuf>,
}

pub fn run(args: InspectArgs) -> Result<()> {
    inspect(&args).map_err(|e| {
        // Damaged weights (a truncated or invalid file, non-finite values) exit with their
        // own status, so scripts can tell them from a wrong path.
        let damaged = e.chain().any(|c| {
            matches!(
                c.downcast_ref::<ModelError>(),
                Some(ModelError::Format { .. } | ModelError::NonFinite { .. })
            )
        });
        if damaged {
            super::exit::Exit::integrity(format!("{e:#}"))
        } else {
            e
        }
    })
}

fn inspect(args: &InspectArgs) -> Result<()> {
    let rt = Runtime::cpu();
    let p = &args.path;
    let (summary, store) = if p.is_dir() && p.join("model.bin").is_file() {
        inspect_ct2(p)?
    } else if p.is_dir() {
        inspect_hf_dir(p, &rt)?
    } else if p.extension().is_some_and(|e| e == "safetensors") {
        let store = WeightStore::from_safetensors(std::slice::from_ref(p), &rt.device)?;
        let mut s = summarise(&store);
        s.architecture = "unknown (bare safetensors file)".into();
        s.files = vec![p.clone()];
        (s, store)
    } else if p.is_file() {
        inspect_gguf(p, &rt)?
    } else {
        bail!(
            "{}: {}",
            p.display(),
            crate::files::neither_file_nor_folder(p)
        );
    };
    println!("path: {}", p.display());
    println!("architecture: {}", summary.architecture);
    println!("tensors: {}", summary.tensors);
    println!("parameters: {}", summary.params);
    for (dtype, n) in &summary.by_dtype {
        println!("tensors_{dtype}: {n}");
    }
    for s in &summary.special {
        println!("{s}");
    }
    for f in &summary.files {
        println!(
            "sha256 {}: {}",
            f.file_name().unwrap_or_default().to_string_lossy(),
            crate::pipeline::sha256_files(std::slice::from_ref(f))?
        );
    }
    store.verify_finite()?;
    println!("all tensors finite: yes");
    Ok(())
}

fn summarise(store: &WeightStore) -> Summary {
    let mut by_dtype = BTreeMap::new();
    let mut params = 0;
    for (_, t) in store.iter() {
        *by_dtype
            .entry(format!("{:?}", t.dtype()).to_lowercase())
            .or_insert(0) += 1;
        params += t.elem_count();
    }
    Summary {
        architecture: String::new(),
        tensors: store.len(),
        params,
        by_dtype,
        special: Vec::new(),
        files: Vec::new(),
    }
}

fn special_lines(tok: &ChatTokenizer) -> Vec<String> {
    let name = |id: Option<u32>| match id {
        Some(id) => format!(
            "{id} {:?}",
            tok.tokenizer.id_to_token(id).unwrap_or_default()
        ),
        None => "none".into(),
    };
    vec![
        format!("bos_token: {}", name(tok.special.bos)),
        format!("eos_token: {}", name(tok.special.eos)),
        format!("add_bos_token: {}", tok.special.add_bos),
        format!("special_tokens: {}", tok.special.control.len()),
    ]
}

fn inspect_gguf(path: &Path, rt: &Runtime) -> Result<(Summary, WeightStore)> {
    // Stored (quantized) dtypes from the header; values checked after dequantization.
    let mut f = crate::files::open(path).with_context(|| format!("{}", path.display()))?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).map_err(|e| {
        ModelError::Format {
            path: path.to_path_buf(),
            format: "GGUF",
            reason: e.to_string(),
        }
    })?;
    let mut by_dtype = BTreeMap::new();
    let mut params = 0;
    for info in content.tensor_infos.values() {
        *by_dtype
            .entry(format!("{:?}", info.ggml_dtype).to_lowercase())
            .or_insert(0) += 1;
        params += info.shape.elem_count();
    }
    let (store, config, meta) =
        crate::models::llm::read_gguf(path, rt, crate::models::llm::GgufBlocks::Skip)?;
    let tok = ChatTokenizer::from_gguf(path, &meta)?;
    let mut special = special_lines(&tok);
    special.insert(
        0,
        format!(
            "config: {} layers, hidden {}, {} heads ({} kv), vocab {}, context {}",
            config.num_hidden_layers,
            config.hidden_size,
            config.num_attention_heads,
            config.n_kv_heads(),
            config.vocab_size,
            config.max_position_embeddings
        ),
    );
    let arch = meta
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    Ok((
        Summary {
            architecture: arch,
            tensors: content.tensor_infos.len(),
            params,
            by_dtype,
            special,
            files: vec![path.to_path_buf()],
        },
        store,
    ))
}

fn inspect_hf_dir(dir: &Path, rt: &Runtime) -> Result<(Summary, WeightStore)> {
    let files = safetensors_files(dir)?;
    let store = WeightStore::from_safetensors(&files, &rt.device)?;
    let mut s = summarise(&store);
    let cfg: serde_json::Value = crate::files::read_to_string(&dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    s.architecture = cfg["model_type"].as_str().unwrap_or("unknown").to_string();
    if dir.join("tokenizer.json").is_file() {
        if let Ok(tok) = ChatTokenizer::from_hf_dir(dir) {
            s.special = special_lines(&tok);
        }
    }
    s.files = files;
    Ok((s, store))
}

fn inspect_ct2(dir: &Path) -> Result<(Summary, WeightStore)> {
    let bin = dir.join("model.bin");
    let model = crate::models::ct2::Ct2Model::read(&bin)?;
    let mut tensors = std::collections::HashMap::new();
    for (name, v) in &model.vars {
        if v.dims.is_empty() || !v.dtype.is_float() {
            continue;
        }
        let t = candle_core::Tensor::from_raw_buffer(
            &v.bytes,
            v.dtype,
            &v.dims,
            &candle_core::Device::Cpu,
        )?;
        tensors.insert(name.clone(), t);
    }
    let store = WeightStore::new(bin.display().to_string(), tensors);
    let mut s = summarise(&store);
    s.architecture = format!("{} (CTranslate2)", model.spec);
    s.files = vec![bin];
    Ok((s, store))
}
