use anyhow::Result;
use clap::{Args, Subcommand};

use crate::pipeline::encoder_cache::{entries, EncoderCache};
use crate::plugins::PluginHost;

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Size of the encoder-output and plugin caches
    #[command(after_help = "Example:\n  earshot cache info")]
    Info,
    /// Delete the oldest cache entries until the caches fit in --max-mib (default: delete all)
    #[command(after_help = "Example:\n  earshot cache prune --max-mib 4096")]
    Prune {
        #[arg(long, default_value_t = 0)]
        max_mib: u64,
    },
}

pub fn run(args: CacheArgs) -> Result<()> {
    let dirs = [
        ("encoder", EncoderCache::default_dir()),
        (
            "plugins",
            PluginHost::default_cache_dir().unwrap_or_default(),
        ),
    ];
    match args.command {
        CacheCommand::Info => {
            for (name, dir) in &dirs {
                let e = entries(dir);
                let bytes: u64 = e.iter().map(|(_, s, _)| s).sum();
                println!(
                    "{name}: {} entries, {:.1} MiB in {}",
                    e.len(),
                    bytes as f64 / 1048576.0,
                    dir.display()
                );
            }
        }
        CacheCommand::Prune { max_mib } => {
            let mut all: Vec<_> = dirs.iter().flat_map(|(_, d)| entries(d)).collect();
            all.sort_by_key(|(_, _, t)| *t);
            let mut total: u64 = all.iter().map(|(_, s, _)| s).sum();
            let limit = max_mib * 1048576;
            let mut removed = 0;
            for (p, size, _) in all {
                if total <= limit {
                    break;
                }
                if std::fs::remove_file(&p).is_ok() {
                    total -= size;
                    removed += 1;
                }
            }
            println!(
                "removed {removed} entries; {:.1} MiB left",
                total as f64 / 1048576.0
            );
        }
    }
    Ok(())
}
