use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use super::plugin::SandboxArgs;
use super::printer::{self, PhaseProgress};
use crate::config::RunConfig;
use crate::pipeline::audit::{AuditOptions, AuditReport};
use crate::pipeline::open_dataset;
use crate::plugins::{DatasetAdapter, PluginHost};
use crate::text::{display_text, terminal_safe_json};

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
    /// Find examples that two splits share: the same audio bytes, the same decoded audio, or
    /// (for text targets) the same normalised target
    #[command(
        after_help = "Reads every example of the run config's dataset through its adapter (any \
adapter, third-party included) and compares each split with the ones before it: the training \
split first, then the config's valid and test splits, then the adapter's other splits (or --split, in the \
order given). An example of a later split that shares content with an earlier one leaks: its \
score measures memory, not hearing. Target text is compared when data.text-targets = true \
(transcription) or --text-targets; a label task's targets are shared by design. A config \
with [[task]] entries is audited task by task (each task's own dataset and text-targets; \
--task NAME: that one).\n\n\
Exit status: 0 no leak; 1 leaks found (counts and the first offenders are printed), or the \
dataset could not be read.\n\n\
Example:\n  earshot dataset audit configs/cpu-smollm2-tones.toml"
    )]
    Audit {
        /// Run config (TOML)
        #[arg(
            value_name = "CONFIG",
            required_unless_present = "config_flag",
            conflicts_with = "config_flag"
        )]
        config: Option<PathBuf>,
        /// The run config (the same as CONFIG)
        #[arg(long = "config", id = "config_flag", value_name = "CONFIG")]
        config_flag: Option<PathBuf>,
        /// Override a config value (repeatable)
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Compare these splits, in this order (repeatable; default: the training split, the
        /// valid and test splits, then every other split the adapter lists)
        #[arg(long = "split", value_name = "NAME")]
        splits: Vec<String>,
        /// Compare audio bytes only, without decoding every example
        #[arg(long)]
        no_decode: bool,
        /// Also compare normalised targets (as data.text-targets = true)
        #[arg(long)]
        text_targets: bool,
        /// With a multi-task config ([[task]]): audit this task only (default: every task)
        #[arg(long, value_name = "NAME")]
        task: Option<String>,
        /// The report as one JSON object (a multi-task config: {"tasks": {NAME: report}})
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: DatasetArgs) -> Result<()> {
    match args.command {
        DatasetCommand::List {
            adapter,
            root,
            options,
            split,
            limit,
            batch,
            sandbox,
        } => list(adapter, root, options, split, limit, batch, sandbox),
        DatasetCommand::Audit {
            config,
            config_flag,
            set,
            splits,
            no_decode,
            text_targets,
            task,
            json,
        } => {
            let path = config
                .or(config_flag)
                .ok_or_else(|| anyhow::anyhow!("no run config given (CONFIG or --config)"))?;
            let options = AuditArgs {
                splits,
                decoded: !no_decode,
                text_targets,
            };
            audit(&path, &set, task.as_deref(), &options, json)
        }
    }
}

fn list(
    adapter: PathBuf,
    root: PathBuf,
    options: String,
    split: Option<String>,
    limit: Option<u64>,
    batch: u32,
    sandbox: SandboxArgs,
) -> Result<()> {
    anyhow::ensure!(batch > 0, "--batch must be at least 1");
    let host = sandbox.host()?;
    let mut ds = DatasetAdapter::open(&host, &adapter, &root, &options)?;
    for w in &ds.dataset.warnings {
        printer::warning(w);
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

/// What `dataset audit` compares, whatever the task.
struct AuditArgs {
    splits: Vec<String>,
    decoded: bool,
    text_targets: bool,
}

/// `dataset audit`: reads the config's dataset (each task's, for a multi-task config) and
/// prints what its splits share.
fn audit(
    path: &std::path::Path,
    set: &[String],
    task: Option<&str>,
    args: &AuditArgs,
    json: bool,
) -> Result<()> {
    let config = RunConfig::load(path, set)?;
    let multi = config.is_multi_task();
    let tasks = match task {
        Some(name) => vec![config.task(name)?],
        None => config.tasks()?,
    };
    let mut out = std::io::stdout().lock();
    let mut reports = serde_json::Map::new();
    let mut leaks: Vec<(String, usize)> = Vec::new();
    for (i, task) in tasks.into_iter().enumerate() {
        if multi {
            printer::notice(&format!("task {}", task.name));
        }
        let report = audit_task(&task.config, args)?;
        if report.leaking() > 0 {
            leaks.push((task.name.clone(), report.leaking()));
        }
        if json && multi {
            reports.insert(task.name, serde_json::to_value(&report)?);
        } else if json {
            writeln!(
                out,
                "{}",
                terminal_safe_json(serde_json::to_string(&report)?)
            )?;
        } else {
            if multi {
                if i > 0 {
                    writeln!(out)?;
                }
                writeln!(out, "task {}", task.name)?;
            }
            write_audit(&mut out, &report)?;
        }
    }
    if json && multi {
        let v = serde_json::json!({ "tasks": reports });
        writeln!(out, "{}", terminal_safe_json(v.to_string()))?;
    }
    out.flush()?;
    let leaking: usize = leaks.iter().map(|(_, n)| n).sum();
    if leaking > 0 {
        let which = if multi {
            let named: Vec<String> = leaks.iter().map(|(t, n)| format!("{t}: {n}")).collect();
            format!(" (task {})", named.join(", task "))
        } else {
            String::new()
        };
        anyhow::bail!(
            "{leaking} example(s){which} share content with an earlier split: scores on those \
             splits measure memory, not hearing"
        );
    }
    Ok(())
}

/// One task's audit: its dataset through its adapter, its splits in order.
fn audit_task(config: &RunConfig, args: &AuditArgs) -> Result<AuditReport> {
    let host = PluginHost::new(config.plugins.sandbox, PluginHost::default_cache_dir());
    let mut ds = open_dataset(&host, config, &[])?;
    let splits = if args.splits.is_empty() {
        audit_order(config, &ds.dataset.splits)
    } else {
        for s in &args.splits {
            ds.require_split(s)?;
        }
        args.splits.clone()
    };
    let options = AuditOptions {
        decoded: args.decoded,
        text_targets: args.text_targets || config.data.text_targets,
        max_audio_s: config.data.max_audio_s,
    };
    let mut progress: Option<(String, PhaseProgress)> = None;
    let report = crate::pipeline::audit::audit(
        &mut ds,
        &config.data.root,
        &splits,
        options,
        &mut |split, done| {
            if progress.as_ref().is_none_or(|(s, _)| s != split) {
                let phase = format!("auditing {}", display_text(split, 256));
                progress = Some((split.to_string(), PhaseProgress::new(phase, "example(s)")));
            }
            if let Some(line) = progress.as_mut().and_then(|(_, p)| p.line(done, None)) {
                printer::progress(&line);
            }
        },
    )?;
    Ok(report)
}

/// The training split first, then validation and test, then the adapter's other splits.
pub fn audit_order(config: &RunConfig, listed: &[String]) -> Vec<String> {
    let mut order: Vec<String> = config
        .data
        .run_splits()
        .into_iter()
        .filter(|s| listed.iter().any(|l| l == s))
        .map(String::from)
        .collect();
    for s in listed {
        if !order.contains(s) {
            order.push(s.clone());
        }
    }
    order
}

fn write_audit(out: &mut impl Write, report: &AuditReport) -> std::io::Result<()> {
    let sizes: Vec<String> = report
        .splits
        .iter()
        .map(|(s, n)| format!("{} {n}", display_text(s, 256)))
        .collect();
    writeln!(out, "splits: {} (compared in this order)", sizes.join(", "))?;
    let kinds: Vec<&str> = report.compared.iter().map(|k| k.describe()).collect();
    writeln!(out, "compared: {}", kinds.join(", "))?;
    for l in &report.leaks {
        let by: Vec<String> = l
            .by_kind
            .iter()
            .map(|(k, n)| format!("{n} by {}", k.describe()))
            .collect();
        writeln!(
            out,
            "{}: {} of {} example(s) share content with an earlier split{}",
            display_text(&l.split, 256),
            l.leaking,
            l.examples,
            if by.is_empty() {
                String::new()
            } else {
                format!(" ({})", by.join(", "))
            }
        )?;
    }
    if !report.first.is_empty() {
        writeln!(out, "first offenders:")?;
        for o in &report.first {
            writeln!(
                out,
                "  {} example {}: {} as {} example {}",
                display_text(&o.split, 256),
                display_text(&o.id, 256),
                o.shared.describe(),
                display_text(&o.with_split, 256),
                display_text(&o.with_id, 256)
            )?;
        }
    }
    if !report.unreadable.is_empty() {
        writeln!(
            out,
            "{} example(s) could not be read in full (compared by what could be), e.g. {}: {}",
            report.unreadable.len(),
            display_text(&report.unreadable[0].0, 256),
            display_text(&report.unreadable[0].1, 1024)
        )?;
    }
    let leaking = report.leaking();
    writeln!(
        out,
        "verdict: {}",
        if leaking == 0 {
            "no example shares content with an earlier split".to_string()
        } else {
            format!("{leaking} example(s) leak")
        }
    )
}
