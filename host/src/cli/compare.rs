use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use super::printer;
use crate::train::plots::{plot_losses, RunCurves};

#[derive(Debug, Args)]
#[command(
    after_help = "Reads each run folder's metrics.jsonl, eval.jsonl and config.toml \
(written by `earshot train`). Prints a table of final and best losses with the settings that \
differ between the runs, and overlays their loss curves in one PNG (training loss thin, eval \
loss thick).\n\nExample, a learning-rate sweep:\n  \
CFG=configs/cpu-smollm2-tones.toml\n  \
earshot train $CFG --max-steps 5 --set train.lr=1e-3 --set train.run-dir=runs/lr1e-3\n  \
earshot train $CFG --max-steps 5 --set train.lr=3e-3 --set train.run-dir=runs/lr3e-3\n  \
earshot compare runs/lr1e-3 runs/lr3e-3 --out lr-sweep.png"
)]
pub struct CompareArgs {
    /// Run folders (each run's train.run-dir)
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// The PNG with every run's loss curves
    #[arg(long, default_value = "compare.png")]
    pub out: PathBuf,
}

/// `a.b.c = value` for every leaf of a TOML table.
fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

fn settings(run: &std::path::Path) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(run.join("config.toml")).ok()?;
    let value: toml::Value = toml::from_str(&text).ok()?;
    let mut flat = BTreeMap::new();
    flatten("", &value, &mut flat);
    flat.remove("train.run-dir");
    Some(flat)
}

fn fmt_loss(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.4}"))
}

pub fn run(args: CompareArgs) -> Result<()> {
    let mut runs = Vec::new();
    for dir in &args.runs {
        runs.push((dir.clone(), RunCurves::read(dir)?));
    }
    if runs.iter().all(|(_, c)| c.loss.is_empty()) {
        bail!("none of the runs has a recorded step yet");
    }
    // Short labels: folder names, or whole paths when two runs share a name.
    let names: Vec<String> = args
        .runs
        .iter()
        .map(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| p.display().to_string())
        })
        .collect();
    let unique = names.iter().collect::<std::collections::HashSet<_>>().len() == names.len();
    let labels: Vec<String> = if unique {
        names
    } else {
        args.runs.iter().map(|p| p.display().to_string()).collect()
    };
    // Settings that differ between the runs.
    let all: Vec<Option<BTreeMap<String, String>>> =
        args.runs.iter().map(|r| settings(r)).collect();
    let keys: std::collections::BTreeSet<&String> =
        all.iter().flatten().flat_map(|m| m.keys()).collect();
    let differing: Vec<&String> = keys
        .into_iter()
        .filter(|k| {
            let vals: std::collections::HashSet<Option<&String>> =
                all.iter().flatten().map(|m| m.get(*k)).collect();
            vals.len() > 1
        })
        .collect();
    let width = labels.iter().map(|l| l.len()).max().unwrap_or(3).max(3);
    println!(
        "{:<width$}  {:>6}  {:>10}  {:>10}  {:>17}  settings that differ",
        "run", "steps", "final loss", "final eval", "best eval (step)"
    );
    for ((label, (_, c)), s) in labels.iter().zip(&runs).zip(&all) {
        let steps = c.loss.last().map_or(0, |p| p.0);
        let best = c
            .best_eval()
            .map_or("-".into(), |(step, l)| format!("{l:.4} ({step})"));
        let diff = match s {
            Some(m) => differing
                .iter()
                .map(|k| format!("{k}={}", m.get(*k).map_or("(unset)", |v| v.as_str())))
                .collect::<Vec<_>>()
                .join(" "),
            None => "(no config.toml)".into(),
        };
        println!(
            "{label:<width$}  {steps:>6}  {:>10}  {:>10}  {best:>17}  {diff}",
            fmt_loss(c.loss.last().map(|p| p.1)),
            fmt_loss(c.eval.last().map(|p| p.1)),
        );
    }
    let named: Vec<(String, RunCurves)> = labels
        .into_iter()
        .zip(runs.into_iter().map(|(_, c)| c))
        .collect();
    plot_losses(&named, &args.out, "loss by run")?;
    printer::notice(&format!("wrote {}", args.out.display()));
    Ok(())
}
