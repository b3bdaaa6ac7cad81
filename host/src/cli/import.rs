use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(subcommand)]
    pub format: ImportFormat,
}

#[derive(Debug, Subcommand)]
pub enum ImportFormat {
    /// Convert a CTranslate2 Whisper model (faster-whisper's format: model.bin, float16 or
    /// float32) to a Hugging Face layout folder (model.safetensors + config.json + tokenizer)
    #[command(
        after_help = "Example:\n  earshot import ct2 ~/.cache/earshot/models/whisper-tiny.en-ct2 --out whisper-tiny.en-hf"
    )]
    Ct2 {
        /// Folder holding model.bin (and tokenizer.json)
        dir: PathBuf,
        /// Output folder (written atomically: OUT.partial, then renamed)
        #[arg(long, value_name = "OUT_DIR")]
        out: PathBuf,
    },
    /// Convert a Llama-family GGUF file to a Hugging Face layout folder (f32 safetensors,
    /// config.json, tokenizer.json), undoing llama.cpp's Q/K row permutation
    #[command(
        after_help = "Example:\n  earshot import gguf \\\n    ~/.cache/earshot/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2-hf"
    )]
    Gguf {
        /// The .gguf file
        file: PathBuf,
        /// Output folder (written atomically: OUT.partial, then renamed)
        #[arg(long, value_name = "OUT_DIR")]
        out: PathBuf,
        /// Split the weights over this many safetensors files (with an index)
        #[arg(long, default_value_t = 1)]
        shards: usize,
    },
}

pub fn run(args: ImportArgs) -> Result<()> {
    match args.format {
        ImportFormat::Ct2 { dir, out } => {
            let summary = crate::models::ct2::import_whisper(&dir, &out)?;
            println!(
                "imported {} tensors (encoder {} layers, decoder {} layers, d_model {}, {} mel bins) -> {}",
                summary.tensors,
                summary.encoder_layers,
                summary.decoder_layers,
                summary.d_model,
                summary.n_mels,
                out.display()
            );
            Ok(())
        }
        ImportFormat::Gguf { file, out, shards } => {
            let summary = crate::models::llm::export_gguf_to_hf(&file, &out, shards)?;
            println!(
                "exported {} tensors in {} shard(s) -> {}",
                summary.tensors,
                summary.shards,
                out.display()
            );
            Ok(())
        }
    }
}
