use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::common::{SamplingArgs, TraceArgs};
use crate::models::llm::{generate_ids, load_llm};
use crate::models::Runtime;
use crate::sampler::Sampler;

#[derive(Debug, Args)]
#[command(
    after_help = "The prompt is tokenized as given: special tokens such as <|im_start|> are \
parsed, and no BOS is added unless the model's metadata asks for one. Prints the continuation \
on stdout.\n\nExample:\n  earshot generate \\\n    --llm ~/.cache/earshot/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \\\n    --prompt 'The sky is' --max-tokens 8"
)]
pub struct GenerateArgs {
    /// LLM: a GGUF file, or a Hugging Face folder (config.json, safetensors, tokenizer.json)
    #[arg(long, value_name = "PATH")]
    pub llm: PathBuf,
    /// Prompt text
    #[arg(long)]
    pub prompt: String,
    /// Maximum number of new tokens
    #[arg(
        long,
        default_value_t = 64,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub trace: TraceArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let mut sampler = Sampler::new(args.sampling.params())?;
    let rt = Runtime::best_available();
    let llm =
        load_llm(&args.llm, &rt).with_context(|| format!("loading {}", args.llm.display()))?;
    let ids = llm.tokenizer.encode(&args.prompt)?;
    anyhow::ensure!(!ids.is_empty(), "the prompt is empty");
    let new = generate_ids(
        &llm.model,
        &ids,
        args.max_tokens,
        llm.tokenizer.special.eos,
        &mut sampler,
        args.trace.trace(),
    )?;
    let text = llm.tokenizer.decode(&new)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    Ok(())
}
