use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use crate::config::RunConfig;
use crate::dist::World;
use crate::models::whisper::WhisperEncoder;
use crate::models::Runtime;
use crate::pipeline::clip::{mel_settings, ClipEncoder};
use crate::pipeline::encoder_cache::{entries, EncoderCache};
use crate::pipeline::examples::open_dataset;
use crate::pipeline::manifest::encoder_identity_of;
use crate::plugins::{PluginHost, PAGE_SIZE};

use super::printer::{self, PhaseProgress};

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
    /// Encode the clips of a run config's splits into the encoder cache ahead of train,
    /// caption and eval; `mpirun -np N earshot cache fill CONFIG` shares the clips out over
    /// N ranks
    #[command(
        after_help = "What is encoded: each clip's first 30 s window as training \
reads it and, for a clip longer than one window, every window as caption and eval read it. \
Entries already in the cache are kept. Under mpirun or srun, rank r encodes every N-th clip \
from the r-th into the shared cache (its writes are atomic), so a large dataset is encoded \
once, in parallel, and leaves the cache one process leaves. Clips that fail (a file that does \
not decode, over data.max-audio-s, over a bound) are named in warnings and counted; the \
status is then 3.\n\nExample:\n  earshot cache fill configs/cpu-smollm2-tones.toml"
    )]
    Fill(FillArgs),
}

#[derive(Debug, Args)]
pub struct FillArgs {
    /// Run config whose dataset to encode (every task's, for a multi-task config)
    pub config: PathBuf,
    /// A split to encode (repeatable; default: the config's train, valid and test splits)
    #[arg(long = "split", value_name = "NAME")]
    pub splits: Vec<String>,
    /// Override a config value (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

pub fn run(args: CacheArgs) -> Result<()> {
    if let CacheCommand::Fill(fill_args) = &args.command {
        return super::common::on_this_rank(|world| fill(fill_args, world));
    }
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
        CacheCommand::Fill(_) => unreachable!("handled above"),
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

/// `cache fill`: this rank's share of every split's clips into the encoder cache; rank 0
/// prints what all ranks did.
fn fill(args: &FillArgs, world: &World) -> Result<()> {
    let config = RunConfig::load(&args.config, &args.set)?;
    let rt = Runtime::best_available();
    let whisper = &config.models.whisper;
    let encoder = WhisperEncoder::load_dir(whisper, &rt).map_err(|cause| {
        crate::pipeline::error::PipelineError::LoadModel {
            what: "Whisper",
            path: whisper.clone(),
            cause: Box::new(cause),
        }
    })?;
    let settings = mel_settings(&config, &encoder);
    let identity = encoder_identity_of(&config, &settings)?;
    let mut clips = ClipEncoder::with_default_cache(encoder, rt, settings, &identity)?;
    let host = PluginHost::new(config.plugins.sandbox, PluginHost::default_cache_dir());
    let (rank, size) = (world.rank(), world.size());
    let (mut listed, mut failed) = (0usize, 0usize);
    for task in config.tasks()? {
        let data = &task.config.data;
        let splits: Vec<String> = match args.splits.is_empty() {
            true => data.run_splits().into_iter().map(String::from).collect(),
            false => args.splits.clone(),
        };
        let names: Vec<&str> = splits.iter().map(String::as_str).collect();
        let mut adapter = open_dataset(&host, &task.config, &names)?;
        for split in &splits {
            let mut examples = Vec::new();
            let mut pages = adapter.pages(split, PAGE_SIZE);
            while let Some(page) = pages.next_page()? {
                for ex in page {
                    match ex {
                        Ok(ex) => examples.push(ex),
                        // Counted once, by rank 0 (every rank lists the whole split).
                        Err(bad) if rank == 0 => {
                            tracing::warn!("{split}: {bad}; not encoded");
                            failed += 1;
                        }
                        Err(_) => {}
                    }
                }
            }
            listed += examples.len();
            let mine: Vec<_> = examples.iter().skip(rank).step_by(size).collect();
            let mut progress = PhaseProgress::new(
                match size {
                    1 => format!("encoding {split}"),
                    _ => format!("encoding {split} (rank 0's share)"),
                },
                "clip(s)",
            );
            for (done, ex) in mine.iter().enumerate() {
                if let Err(e) = clips.fill_cache_for_example(ex, &data.root, data.max_audio_s) {
                    tracing::warn!("{split}: example {}: {e:#}; not encoded", ex.id);
                    failed += 1;
                }
                if let Some(line) = progress
                    .line(done + 1, Some(mine.len()))
                    .filter(|_| rank == 0)
                {
                    printer::progress(&line);
                }
            }
        }
    }
    let counts = clips.counts;
    tracing::info!(
        "rank {rank} of {size}: {} window(s) encoded, {} from the cache",
        counts.encoder_runs,
        counts.cache_hits
    );
    let mut sums = [
        counts.encoder_runs as f64,
        counts.cache_hits as f64,
        failed as f64,
    ];
    world.sum_f64(&mut sums);
    if !world.is_root() {
        return Ok(());
    }
    let [encoded, found, failed] = sums.map(|x| x as u64);
    println!(
        "{listed} clip(s): {encoded} window(s) encoded, {found} already in the cache, {failed} \
         failed{}; cache: {}",
        match size {
            1 => String::new(),
            _ => format!(" (over {size} ranks)"),
        },
        EncoderCache::default_dir().display()
    );
    if failed > 0 {
        return Err(super::exit::Exit::partial(format!(
            "{failed} clip(s) could not be encoded (warnings above say why); the others are \
             in the cache"
        )));
    }
    Ok(())
}
