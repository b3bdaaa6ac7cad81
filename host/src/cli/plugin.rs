use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::plugins::{PluginHost, SandboxLimits};

#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Memory cap per plugin instance, in MiB
    #[arg(long, value_name = "MIB", default_value_t = SandboxLimits::default().memory_mib)]
    pub plugin_memory_mib: usize,
    /// Time limit for one plugin call, in seconds
    #[arg(long, value_name = "S", default_value_t = SandboxLimits::default().call_timeout_s)]
    pub plugin_timeout_s: f64,
}

impl SandboxArgs {
    pub fn host(&self) -> Result<PluginHost> {
        let limits = SandboxLimits {
            memory_mib: self.plugin_memory_mib,
            call_timeout_s: self.plugin_timeout_s,
            ..SandboxLimits::default()
        };
        limits.validate().map_err(|e| {
            anyhow::anyhow!(
                "{}",
                e.replace("plugins.sandbox.call-timeout-s", "--plugin-timeout-s")
                    .replace("plugins.sandbox.memory-mib", "--plugin-memory-mib")
            )
        })?;
        Ok(PluginHost::new(limits, PluginHost::default_cache_dir()))
    }
}

#[derive(Debug, Args)]
pub struct PluginArgs {
    #[command(subcommand)]
    pub command: PluginCommand,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Validate a plugin component and print its self-description and roles
    #[command(
        after_help = "Example:\n  earshot plugin check plugins/target/wasm32-wasip2/release/chatml.wasm"
    )]
    Check {
        /// The plugin (.wasm component, built for wasm32-wasip2)
        file: PathBuf,
        /// Print JSON instead of `key: value` lines
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
}

pub fn run(args: PluginArgs) -> Result<()> {
    match args.command {
        PluginCommand::Check {
            file,
            json,
            sandbox,
        } => {
            let info = sandbox.host()?.describe(&file)?;
            if json {
                println!(
                    "{}",
                    crate::text::terminal_safe_json(serde_json::to_string(&info)?)
                );
            } else {
                println!("name: {}", info.name);
                println!("version: {}", info.version);
                println!("api_version: {}", info.api_version);
                println!(
                    "roles: {}",
                    info.roles
                        .iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                println!("description: {}", info.description);
            }
            anyhow::ensure!(
                crate::plugins::SUPPORTED_API_VERSIONS.contains(&info.api_version.as_str()),
                "{}: built for plugin API {}; this earshot supports {}",
                file.display(),
                info.api_version,
                crate::plugins::SUPPORTED_API_VERSIONS.join(", ")
            );
            anyhow::ensure!(
                !info.roles.is_empty(),
                "{}: declares no roles",
                file.display()
            );
            Ok(())
        }
    }
}
