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
    Ct2 {
        /// Folder holding model.bin (and tokenizer.json)
        dir: PathBuf,
        /// Output folder (written atomically: OUT.partial, then renamed)
        #[arg(long, value_name = "OUT_DIR")]
        out: PathBuf,
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
    }
}
