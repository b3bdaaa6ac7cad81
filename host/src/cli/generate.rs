use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::common::TraceArgs;
use crate::models::llm::{generate_ids, load_llm};
use crate::models::Runtime;
use crate::sampler::{Sampler, SamplingParams};

#[derive(Debug, Args)]
#[command(
    after_help = "The prompt is tokenized as given: special tokens such as <|im_start|> are \
parsed, and no BOS is added unless the model's metadata asks for one. Prints the continuation \
on stdout. Example:\n  earshot generate --llm model.gguf --prompt $'<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'"
)]
pub struct GenerateArgs {
    /// LLM: a GGUF file, or a Hugging Face folder (config.json, safetensors, tokenizer.json)
    #[arg(long, value_name = "PATH")]
    pub llm: PathBuf,
    /// Prompt text
    #[arg(long)]
    pub prompt: String,
    /// Maximum number of new tokens
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens when sampling
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches p when sampling
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Random seed for sampling
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub trace: TraceArgs,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let mut sampler = Sampler::new(SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    })?;
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
