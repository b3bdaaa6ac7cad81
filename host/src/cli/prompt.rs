use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::plugin::SandboxArgs;
use crate::plugins::PromptTemplate;

#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  earshot prompt --template plugins/target/wasm32-wasip2/release/chatml.wasm \\\n    --meta instruction='Who is speaking?' --target 'A man.'"
)]
pub struct PromptArgs {
    /// The prompt-template plugin (.wasm)
    #[arg(long, value_name = "FILE.wasm")]
    pub template: PathBuf,
    /// Example metadata, repeatable
    #[arg(long = "meta", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub meta: Vec<(String, String)>,
    /// The task's options string (the template's format, usually JSON)
    #[arg(long, default_value = "")]
    pub options: String,
    /// Also format this training target
    #[arg(long)]
    pub target: Option<String>,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

pub fn run(args: PromptArgs) -> Result<()> {
    let host = args.sandbox.host()?;
    let mut t = PromptTemplate::load(&host, &args.template)?;
    let pieces = t
        .render(&args.meta, &args.options)
        .with_context(|| format!("rendering {}", args.template.display()))?;
    let mut v = serde_json::to_value(&pieces)?;
    if let Some(target) = &args.target {
        v["target"] = t.format_target(target, &args.meta, &args.options)?.into();
    }
    println!(
        "{}",
        crate::text::terminal_safe_json(serde_json::to_string_pretty(&v)?)
    );
    Ok(())
}
