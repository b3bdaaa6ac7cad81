use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use super::plugin::SandboxArgs;
use crate::plugins::{terminal_safe_json, DatasetAdapter};

#[derive(Debug, Args)]
pub struct DatasetArgs {
    #[command(subcommand)]
    pub command: DatasetCommand,
}

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Print a dataset's examples as JSON lines, through a dataset-adapter plugin
    #[command(
        after_help = "The adapter runs sandboxed and sees only DIR, read-only, at /data. \
Warnings (bad rows, missing audio) go to stderr; examples, one JSON object per line, to stdout. \
An example over a per-example bound (too many metadata entries, an id, key, value, target or \
reference too long) is an error line {\"id\", \"error\", \"split\"} and the command exits 3; \
a page that breaks the read contract as a whole stops it (exit 1).\n\n\
Example:\n  earshot dataset list --adapter plugins/target/wasm32-wasip2/release/jsonl.wasm \\\n    --root configs/data/tones --limit 3"
    )]
    List {
        /// The dataset-adapter plugin (.wasm)
        #[arg(long, value_name = "FILE.wasm")]
        adapter: PathBuf,
        /// The dataset root
        #[arg(long, value_name = "DIR")]
        root: PathBuf,
        /// The adapter's options string (its format is the adapter's, usually JSON)
        #[arg(long, default_value = "")]
        options: String,
        /// Only this split (default: every split)
        #[arg(long)]
        split: Option<String>,
        /// At most this many examples per split
        #[arg(long)]
        limit: Option<u64>,
        /// Examples fetched per plugin call
        #[arg(long, default_value_t = 512)]
        batch: u32,
        #[command(flatten)]
        sandbox: SandboxArgs,
    },
}

pub fn run(args: DatasetArgs) -> Result<()> {
    let DatasetCommand::List {
        adapter,
        root,
        options,
        split,
        limit,
        batch,
        sandbox,
    } = args.command;
    anyhow::ensure!(batch > 0, "--batch must be at least 1");
    let host = sandbox.host()?;
    let mut ds = DatasetAdapter::open(&host, &adapter, &root, &options)?;
    for w in &ds.dataset.warnings {
        eprintln!("warning: {w}");
    }
    let splits = match split {
        Some(s) => {
            ds.require_split(&s)?;
            vec![s]
        }
        None => ds.dataset.splits.clone(),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut listed, mut bad) = (0u64, 0u64);
    for split in splits {
        let mut emitted = 0u64;
        let mut pages = ds.pages(&split, batch);
        loop {
            let want = match limit {
                Some(l) if emitted >= l => break,
                Some(l) => (l - emitted).min(batch as u64) as u32,
                None => batch,
            };
            let Some(examples) = pages.next_page_of(want)? else {
                break;
            };
            for ex in &examples {
                // An example over a per-example bound is an error line of its own (as in
                // `caption --split`); the rest of its page is listed.
                let mut v = match ex {
                    Ok(ex) => serde_json::to_value(ex)?,
                    Err(e) => {
                        bad += 1;
                        serde_json::json!({"id": e.id, "error": e.to_string()})
                    }
                };
                v["split"] = split.clone().into();
                writeln!(out, "{}", terminal_safe_json(v.to_string()))?;
            }
            emitted += examples.len() as u64;
        }
        listed += emitted;
    }
    out.flush()?;
    if bad > 0 {
        return Err(super::exit::Exit::partial(format!(
            "{bad} of {listed} example(s) break a per-example bound (error lines); the others \
             were listed"
        )));
    }
    Ok(())
}
