use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::caption::{CaptionSettings, Captioner};
use crate::config::RunConfig;
use crate::dist::World;
use crate::eval::report::{write_html, ReportPage};
use crate::eval::split::{
    baselines, caption_split, listening_check, Hearing, ListeningCheck, TrainingExample,
    CLEAR_MARGIN,
};
use crate::eval::{read_predictions, score, AttributeSpec, Report};
use crate::text::{display_text, terminal_safe_json};

use super::printer::{self, PhaseProgress};

#[derive(Debug, Args)]
#[command(
    after_help = "Scores: BLEU-1..4, ROUGE-L and CIDEr-D as pycocoevalcap computes them (PTB \
tokenisation), WER and CER as jiwer defines them (after lower-casing and removing punctuation, \
against the first reference), exact match after the same normalisation, and attribute accuracy \
(an allowed value named as a whole word in the caption, compared with the example's metadata; \
none or several named counts as wrong). CIDEr-D's document frequencies come from the \
references of the examples scored together. Lines of a predictions file that carry an \
\"error\" are counted as failed.\n\nExample:\n  earshot caption --config configs/cpu-smollm2-tones.toml --checkpoint runs/try \\\n    --split train > captions.jsonl\n  earshot eval --predictions captions.jsonl"
)]
pub struct EvalArgs {
    /// JSON lines carrying `caption` and `references` (`earshot caption` output as is)
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    pub predictions: Option<PathBuf>,
    /// Caption a split of this run config's dataset with --checkpoint, then score it
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Trained projector (as for `earshot caption`)
    #[arg(long, requires = "config")]
    pub checkpoint: Option<PathBuf>,
    /// LoRA adapter folder in PEFT's layout (adapter_config.json + adapter_model.safetensors,
    /// as Python's peft writes it, or a LoRA run's adapter/): put on the LLM in place of the
    /// adapters of the config's [lora] and the checkpoint
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Fold the LoRA adapters into the LLM's weights first (W + s B A): the same outputs to
    /// rounding without the adapters' extra products. For f32/bf16 bases; on a GGUF base the
    /// merged projections lose their packed blocks and decode from f32 matrices
    #[arg(long)]
    pub merge: bool,
    /// Evaluate with a checkpoint made for other models / mel settings / template
    #[arg(long, requires = "checkpoint")]
    pub allow_mismatch: bool,
    /// The split to caption (default: the config's data.test-split)
    #[arg(long, requires = "config")]
    pub split: Option<String>,
    /// Write the captions made with --config here (JSON lines, as `earshot caption`)
    #[arg(long, requires = "config", value_name = "FILE")]
    pub save_predictions: Option<PathBuf>,
    /// Maximum new tokens per caption (with --config)
    #[arg(
        long,
        default_value_t = 60,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_tokens: usize,
    /// Captions decoded together (with --config)
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub batch_size: u64,
    /// An attribute to score, NAME=VALUE,VALUE,... (repeatable; adds to the config's
    /// [eval] attributes); the expected value is the example's metadata NAME
    #[arg(long = "attribute", value_name = "NAME=V1,V2,...")]
    pub attributes: Vec<String>,
    /// The report as one JSON object (scores, attributes with confusion tables, every example,
    /// the listening check)
    #[arg(long)]
    pub json: bool,
    /// With --config: skip captioning the split again with silence and with shuffled audio
    #[arg(long, requires = "config")]
    pub no_listening_check: bool,
    /// Override a config value (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "config")]
    pub set: Vec<String>,
    /// With --config: write the HTML report here (default: report.html in the run folder,
    /// train.run-dir, when it exists)
    #[arg(
        long,
        value_name = "FILE.html",
        requires = "config",
        conflicts_with = "no_report"
    )]
    pub report: Option<PathBuf>,
    /// With --config: write no HTML report
    #[arg(long, requires = "config")]
    pub no_report: bool,
    /// Print only the summary (each score with its 95% interval beside the baselines, and
    /// the listening verdict), not the metric table and confusion tables
    #[arg(long, conflicts_with = "json")]
    pub brief: bool,
    /// With a multi-task config ([[task]]): evaluate this task only (default: every task,
    /// each in its own section, report-NAME.html and eval-NAME.json)
    #[arg(long, requires = "config", value_name = "NAME")]
    pub task: Option<String>,
}

fn parse_attribute(s: &str) -> Result<(String, Vec<String>)> {
    let Some((name, values)) = s.split_once('=') else {
        bail!("--attribute {s:?}: expected NAME=VALUE,VALUE,...");
    };
    let values: Vec<String> = values
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect();
    if name.trim().is_empty() || values.is_empty() {
        bail!("--attribute {s:?}: expected NAME=VALUE,VALUE,...");
    }
    Ok((name.trim().to_string(), values))
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.config.is_some() {
        return super::common::on_this_rank(|world| run_config(&args, world));
    }
    let Some(path) = &args.predictions else {
        bail!("give --predictions FILE or --config RUN.toml");
    };
    let mut attributes = AttributeSpec::new();
    for a in &args.attributes {
        let (name, values) = parse_attribute(a)?;
        attributes.insert(name, values);
    }
    let file = read_predictions(path)?;
    let report = score(&file.predictions, file.failed.len(), &attributes);
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = report_json(&report, None)?;
        writeln!(out, "{}", terminal_safe_json(v.to_string()))?;
    } else {
        if args.brief {
            // No listening check (predictions from a file): the scores with their
            // intervals, without baselines.
            write_scores_brief(&mut out, &report)?;
        } else {
            write_table(&mut out, &report)?;
        }
    }
    Ok(())
}

/// `eval --config`: captions and scores the split, or under `mpirun -np N` this rank's
/// share of its chunks (rank 0 gathers, scores and writes; see [`caption_split`]).
fn run_config(args: &EvalArgs, world: &World) -> Result<()> {
    let Some(config) = &args.config else {
        bail!("give --predictions FILE or --config RUN.toml");
    };
    let cfg = RunConfig::load(config, &args.set)?;
    if cfg.is_multi_task() {
        return run_tasks(args, cfg, world);
    }
    if let Some(task) = &args.task {
        // A single-task config has one task, named `main`.
        cfg.task(task)?;
    }
    let Some(evaluated) = evaluate_task(args, cfg, None, world)? else {
        // Rank 0 prints the scores.
        return Ok(());
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = report_json(&evaluated.report, evaluated.check.as_ref())?;
        writeln!(out, "{}", terminal_safe_json(v.to_string()))?;
    } else {
        print_evaluated(&mut out, args, &evaluated)?;
    }
    partial_exit(
        evaluated.report.failed,
        evaluated.report.failed + evaluated.report.examples,
    )
}

/// One task evaluated from a config: its scores, listening check and split.
struct Evaluated {
    report: Report,
    check: Option<ListeningCheck>,
    split: String,
}

/// Captions and scores one task's split (`task`: its name, in a multi-task run, which
/// names its report files); `None` on ranks other than 0, which only caption.
fn evaluate_task(
    args: &EvalArgs,
    cfg: RunConfig,
    task: Option<&str>,
    world: &World,
) -> Result<Option<Evaluated>> {
    let mut attributes = AttributeSpec::new();
    attributes.extend(cfg.eval.attributes.clone());
    for a in &args.attributes {
        let (name, values) = parse_attribute(a)?;
        attributes.insert(name, values);
    }
    let Some((report, check, page, split)) = evaluate_config(args, cfg, &attributes, task, world)?
    else {
        return Ok(None);
    };
    if let Some(path) = page {
        printer::notice(&format!("report: {}", path.display()));
    }
    Ok(Some(Evaluated {
        report,
        check,
        split,
    }))
}

fn print_evaluated(out: &mut impl Write, args: &EvalArgs, e: &Evaluated) -> Result<()> {
    if let Some(check) = &e.check {
        write_summary(out, &e.report, check, &e.split)?;
    } else if args.brief {
        // --no-listening-check: the scores with their intervals, without baselines.
        write_scores_brief(out, &e.report)?;
    }
    if !args.brief {
        if e.check.is_some() {
            writeln!(out)?;
        }
        write_table(out, &e.report)?;
        if let Some(check) = &e.check {
            write_listening(out, check)?;
        }
    }
    Ok(())
}

/// Captioning a split, some examples failed (an error line each on stderr): the scores
/// stand for the others, and the status says they are not the whole split.
fn partial_exit(failed: usize, total: usize) -> Result<()> {
    if failed > 0 {
        return Err(super::exit::Exit::partial(format!(
            "{failed} of {total} example(s) failed (error lines above); the others were scored"
        )));
    }
    Ok(())
}

/// Every task of a multi-task config (or `--task`'s), each in its own section: `task NAME`
/// and what a single-task eval prints; `--json`: one object with a report per task.
fn run_tasks(args: &EvalArgs, cfg: RunConfig, world: &World) -> Result<()> {
    let tasks = match &args.task {
        Some(name) => vec![cfg.task(name)?],
        None => cfg.tasks()?,
    };
    let mut out = std::io::stdout().lock();
    let mut json = serde_json::Map::new();
    let (mut failed, mut total) = (0, 0);
    for (i, task) in tasks.into_iter().enumerate() {
        if world.is_root() {
            printer::notice(&format!("task {}", task.name));
        }
        let Some(evaluated) = evaluate_task(args, task.config, Some(&task.name), world)? else {
            continue;
        };
        failed += evaluated.report.failed;
        total += evaluated.report.failed + evaluated.report.examples;
        if args.json {
            json.insert(
                task.name.clone(),
                report_json(&evaluated.report, evaluated.check.as_ref())?,
            );
        } else {
            if i > 0 {
                writeln!(out)?;
            }
            writeln!(out, "task {}", task.name)?;
            print_evaluated(&mut out, args, &evaluated)?;
            out.flush()?;
        }
    }
    if !world.is_root() {
        return Ok(());
    }
    if args.json {
        let v = serde_json::json!({ "tasks": json });
        writeln!(out, "{}", terminal_safe_json(v.to_string()))?;
    }
    partial_exit(failed, total)
}

/// `path` with `-NAME` before its extension (a task's own file in a multi-task run).
fn for_task(path: &std::path::Path, task: Option<&str>) -> PathBuf {
    let Some(task) = task else {
        return path.to_path_buf();
    };
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{task}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{task}"),
    };
    path.with_file_name(name)
}

/// Captions the split with real audio (and, for the listening check, with silence and with
/// shuffled audio), scores each and writes the HTML report (its path is returned).
fn evaluate_config(
    args: &EvalArgs,
    cfg: RunConfig,
    attributes: &AttributeSpec,
    task: Option<&str>,
    world: &World,
) -> Result<Option<Evaluation>> {
    let split = match (&args.split, &cfg.data.test_split) {
        (Some(s), _) | (None, Some(s)) => s.clone(),
        (None, None) => {
            bail!("no split to evaluate: give --split NAME (the config has no data.test-split)")
        }
    };
    let mut captioner = super::common::load_captioner(
        cfg,
        args.checkpoint.as_deref(),
        args.allow_mismatch,
        args.adapter.as_deref(),
        args.merge,
    )?;
    let mut dataset = captioner.open_dataset(&split)?;
    let settings = CaptionSettings {
        max_tokens: args.max_tokens,
        batch_size: args.batch_size as usize,
        ..CaptionSettings::default()
    };
    let page = report_page(args, &captioner.config.train.run_dir, task);
    let mut heard = BTreeMap::new();
    // None: not rank 0 (this rank only captions its share).
    let mut run = |hearing: Hearing| -> Result<Option<Report>> {
        let what = match hearing {
            Hearing::Real => format!("captioning {split}"),
            Hearing::Silence => format!("captioning {split} with silence"),
            Hearing::Shuffled => format!("captioning {split} with shuffled audio"),
        };
        let mut progress = PhaseProgress::new(what, "clip(s)");
        let captions = caption_split(
            &mut captioner,
            &mut dataset,
            &split,
            &settings,
            hearing,
            hearing == Hearing::Real && page.is_some(),
            world,
            &mut |done| {
                if let Some(line) = progress.line(done, None) {
                    printer::progress(&line);
                }
            },
        )?;
        let Some(captions) = captions else {
            return Ok(None);
        };
        if hearing == Hearing::Real {
            if let Some(path) = &args.save_predictions {
                save_lines(&for_task(path, task), &captions.lines)?;
            }
            for l in captions.lines.iter().filter(|l| l.get("error").is_some()) {
                printer::error(&format!(
                    "{}: {}",
                    display_text(l["audio"].as_str().unwrap_or_default(), 4096),
                    display_text(l["error"].as_str().unwrap_or_default(), 64 * 1024)
                ));
            }
        }
        if captions.predictions.is_empty() {
            bail!(
                "split {split:?}: nothing to score ({} failed, the rest had no references)",
                captions.failed
            );
        }
        let mut report = score(&captions.predictions, captions.failed, attributes);
        report.eval_loss = captions.loss;
        if hearing == Hearing::Real {
            heard = captions.heard;
        }
        Ok(Some(report))
    };
    let Some(report) = run(Hearing::Real)? else {
        // Not rank 0: caption this rank's share of the listening check too; rank 0 scores.
        if !args.no_listening_check {
            run(Hearing::Silence)?;
            run(Hearing::Shuffled)?;
        }
        return Ok(None);
    };
    let check = if args.no_listening_check {
        None
    } else {
        let (Some(silence), Some(shuffled)) = (run(Hearing::Silence)?, run(Hearing::Shuffled)?)
        else {
            bail!("rank 0 got no captions from the listening check");
        };
        let training = training_examples(&captioner)?;
        let baselines = baselines(&training, &report, attributes);
        Some(listening_check(&report, silence, shuffled, baselines))
    };
    if let Some(check) = check.as_ref().filter(|c| !c.clearly_better) {
        printer::warning(&format!(
            "the model does not clearly use the audio: {} is {:.3} with the real audio and \
             {:.3} for the best baseline ({}); real should lead every baseline by \
             {CLEAR_MARGIN}",
            check.primary, check.real_score, check.best_baseline_score, check.best_baseline
        ));
    }
    if let Some(path) = &page {
        // The scores as JSON beside the report page (what --json prints).
        let json = for_task(&path.with_file_name("eval.json"), task);
        save_lines(&json, &[report_json(&report, check.as_ref())?])?;
        printer::notice(&format!("scores: {}", json.display()));
        let details = run_details(args, &captioner, &split);
        write_report(path, &captioner, heard, &report, check.as_ref(), details)?;
    }
    Ok(Some((report, check, page, split)))
}

/// Where the HTML report goes: --report, else report.html in the run folder when it exists
/// (a task's own file in a multi-task run); none with --no-report.
fn report_page(args: &EvalArgs, run_dir: &std::path::Path, task: Option<&str>) -> Option<PathBuf> {
    match (&args.report, args.no_report) {
        (_, true) => None,
        (Some(p), _) => Some(for_task(p, task)),
        (None, false) => run_dir
            .is_dir()
            .then(|| for_task(&run_dir.join("report.html"), task)),
    }
}

/// A split's scores, its listening check, the report page written and the split's name.
type Evaluation = (Report, Option<ListeningCheck>, Option<PathBuf>, String);

/// The report and the listening check as one JSON object (`--json`, and `eval.json`).
fn report_json(report: &Report, check: Option<&ListeningCheck>) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(report)?;
    if let Some(c) = check {
        v["listening_check"] = serde_json::to_value(c)?;
    }
    Ok(v)
}

/// What the report page says the run was: config, checkpoint, split, models, window.
fn run_details(args: &EvalArgs, captioner: &Captioner, split: &str) -> Vec<(String, String)> {
    let config = &captioner.config;
    vec![
        (
            "config".to_string(),
            args.config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        ),
        (
            "checkpoint".to_string(),
            checkpoint_shown(args, &config.train.run_dir),
        ),
        ("split".to_string(), split.to_string()),
        (
            "encoder".to_string(),
            config.models.whisper.display().to_string(),
        ),
        ("LLM".to_string(), config.models.llm.display().to_string()),
        (
            "encoder window".to_string(),
            format!("{:?}", config.mel.window).to_lowercase(),
        ),
    ]
}

/// The training split's metadata and targets (`data.train-split`), for the majority and
/// constant-target baselines.
fn training_examples(captioner: &Captioner) -> Result<Vec<TrainingExample>> {
    let split = captioner.config.data.train_split.clone();
    let mut dataset = captioner.open_dataset(&split)?;
    let mut pages = dataset.pages(&split, crate::plugins::PAGE_SIZE);
    let mut out = Vec::new();
    while let Some(page) = pages.next_page()? {
        out.extend(page.into_iter().flatten().map(|ex| TrainingExample {
            metadata: ex.metadata,
            target: ex.target,
        }));
    }
    Ok(out)
}

fn checkpoint_shown(args: &EvalArgs, run_dir: &std::path::Path) -> String {
    match &args.checkpoint {
        Some(p) => p.display().to_string(),
        None => format!(
            "none: a freshly initialised projector (the run folder is {})",
            run_dir.display()
        ),
    }
}

/// The HTML report: the scores, the training curves of the run folder (if any) and the
/// examples' audio as the model heard it (`heard`, kept while captioning).
fn write_report(
    path: &std::path::Path,
    captioner: &Captioner,
    audio: BTreeMap<String, Vec<f32>>,
    report: &Report,
    listening: Option<&ListeningCheck>,
    details: Vec<(String, String)>,
) -> Result<()> {
    let run_dir = &captioner.config.train.run_dir;
    let loss_png = run_dir.join("loss.png");
    if !loss_png.is_file() && run_dir.join("metrics.jsonl").is_file() {
        if let Err(e) = crate::train::plots::write_run_plots(run_dir) {
            tracing::warn!("no training curves in the report: {e:#}");
        }
    }
    let page = ReportPage {
        title: format!(
            "earshot evaluation: {}",
            run_dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default()
        ),
        details,
        report,
        listening,
        loss_curve_png: std::fs::read(&loss_png).ok(),
        audio,
    };
    write_html(path, &page).with_context(|| format!("{}: cannot write the report", path.display()))
}

/// Writes JSON lines atomically (a temp file renamed into place).
fn save_lines(path: &std::path::Path, lines: &[serde_json::Value]) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&terminal_safe_json(l.to_string()));
        text.push('\n');
    }
    let write = || -> std::io::Result<()> {
        let mut tmp = crate::files::temp_file_for(path)?;
        tmp.write_all(text.as_bytes())?;
        crate::files::persist(tmp, path)
    };
    write().with_context(|| format!("{}: cannot write", path.display()))
}

fn write_table(out: &mut impl Write, r: &Report) -> Result<()> {
    writeln!(out, "examples    {} ({} failed)", r.examples, r.failed)?;
    if let Some(loss) = r.eval_loss {
        writeln!(out, "eval loss   {loss:.4}")?;
    }
    for (name, v) in r.scores.named() {
        writeln!(out, "{name:<11} {v:.4}")?;
    }
    for (name, a) in &r.attributes {
        writeln!(
            out,
            "\nattribute {}: accuracy {:.3} over {} example(s)",
            display_text(name, 256),
            a.accuracy,
            a.examples
        )?;
        write_confusion(out, &a.confusion)?;
    }
    Ok(())
}

/// The summary a person reads first: each score with its 95% interval, beside what silence,
/// shuffled audio, the training split's majority and chance score, then the verdict.
/// A 95% interval as the summaries print it.
fn ci(v: [f64; 2]) -> String {
    format!("[{:.3}, {:.3}]", v[0], v[1])
}

/// Each attribute's accuracy and the text metrics, each with its 95% interval.
fn write_scores_brief(out: &mut impl Write, r: &Report) -> Result<()> {
    writeln!(
        out,
        "{} example(s) ({} failed); 95% intervals in brackets",
        r.examples, r.failed
    )?;
    for (name, a) in &r.attributes {
        writeln!(
            out,
            "  {:<10} accuracy {:.3} {} over {} example(s)",
            display_text(name, 64),
            a.accuracy,
            ci(a.ci95),
            a.examples
        )?;
    }
    for (name, key, value) in [
        ("CIDEr-D", "cider_d", r.scores.cider_d),
        ("WER", "wer", r.scores.wer),
        ("CER", "cer", r.scores.cer),
    ] {
        let interval = r
            .ci95
            .get(key)
            .map_or(String::new(), |v| format!(" {}", ci(*v)));
        writeln!(out, "  {name:<10} {value:.3}{interval}")?;
    }
    Ok(())
}

fn write_summary(out: &mut impl Write, r: &Report, c: &ListeningCheck, split: &str) -> Result<()> {
    writeln!(
        out,
        "split {}: {} example(s) ({} failed); 95% intervals in brackets",
        display_text(split, 256),
        r.examples,
        r.failed
    )?;
    for (name, a) in &r.attributes {
        let base = |rep: &Report| rep.attributes.get(name).map_or(f64::NAN, |s| s.accuracy);
        let majority = c.baselines.majority.get(name).map_or("-".to_string(), |m| {
            format!("{:.3} ({})", m.accuracy, display_text(&m.value, 64))
        });
        let uniform = c
            .baselines
            .uniform
            .get(name)
            .map_or("-".to_string(), |u| format!("{u:.3}"));
        writeln!(
            out,
            "  {:<10} accuracy {:.3} {}   silence {:.3}   shuffled {:.3}   majority {majority}   uniform {uniform}",
            display_text(name, 64),
            a.accuracy,
            ci(a.ci95),
            base(&c.silence),
            base(&c.shuffled),
        )?;
    }
    let interval = |key: &str| {
        r.ci95
            .get(key)
            .copied()
            .map_or(String::new(), |v| format!(" {}", ci(v)))
    };
    // (shown as, key in `scores`/`ci95`, the value in a report, in the constant baseline)
    type Pick = fn(&crate::eval::Scores) -> f64;
    type PickConstant = fn(&crate::eval::split::ConstantBaseline) -> f64;
    let text_metrics: [(&str, &str, Pick, PickConstant); 3] = [
        ("CIDEr-D", "cider_d", |s| s.cider_d, |k| k.cider_d),
        ("WER", "wer", |s| s.wer, |k| k.wer),
        ("CER", "cer", |s| s.cer, |k| k.cer),
    ];
    for (name, key, pick, pick_constant) in text_metrics {
        writeln!(
            out,
            "  {name:<10} {:.3}{}   silence {:.3}   shuffled {:.3}   most common training target {}",
            pick(&r.scores),
            interval(key),
            pick(&c.silence.scores),
            pick(&c.shuffled.scores),
            c.baselines
                .constant
                .as_ref()
                .map_or("-".to_string(), |k| format!("{:.3}", pick_constant(k))),
        )?;
    }
    let loss = |l: Option<f64>| l.map_or("-".to_string(), |l| format!("{l:.3}"));
    writeln!(
        out,
        "  eval loss  {} real, {} silence, {} shuffled",
        loss(c.real_loss),
        loss(c.silence_loss),
        loss(c.shuffled_loss)
    )?;
    writeln!(
        out,
        "listening check: {} {:.3} real vs {:.3} for the best baseline ({}): {}",
        c.primary,
        c.real_score,
        c.best_baseline_score,
        c.best_baseline,
        if c.clearly_better {
            "the model uses the audio"
        } else {
            "WARNING: not clearly better"
        }
    )?;
    Ok(())
}

fn write_listening(out: &mut impl Write, c: &ListeningCheck) -> Result<()> {
    writeln!(out, "\nlistening check ({}, eval loss):", c.primary)?;
    let loss = |l: Option<f64>| l.map_or("-".to_string(), |l| format!("{l:.4}"));
    for (name, score, l) in [
        ("real audio", c.real_score, c.real_loss),
        ("silence", c.silence_score, c.silence_loss),
        ("shuffled audio", c.shuffled_score, c.shuffled_loss),
    ] {
        writeln!(out, "  {name:<15} {score:.4}  {:>8}", loss(l))?;
    }
    for (name, score) in [("majority", c.majority_score), ("uniform", c.uniform_score)] {
        if let Some(score) = score {
            writeln!(out, "  {name:<15} {score:.4}  {:>8}", "-")?;
        }
    }
    writeln!(
        out,
        "  {}",
        if c.clearly_better {
            "the model uses the audio"
        } else {
            "WARNING: real audio is not clearly better than every baseline"
        }
    )?;
    Ok(())
}

/// Rows: expected value; columns: the value the caption named.
fn write_confusion(
    out: &mut impl Write,
    confusion: &BTreeMap<String, BTreeMap<String, usize>>,
) -> Result<()> {
    let mut columns: Vec<&String> = confusion.values().flat_map(|m| m.keys()).collect();
    columns.sort();
    columns.dedup();
    let width = columns
        .iter()
        .map(|c| c.chars().count())
        .chain(confusion.keys().map(|k| k.chars().count()))
        .max()
        .unwrap_or(4)
        .clamp(4, 24);
    const CORNER: &str = "expected \\ named";
    let first = confusion
        .keys()
        .map(|k| k.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(CORNER.len(), 32);
    write!(out, "  {CORNER:<first$}")?;
    for c in &columns {
        write!(out, " {:>width$}", display_text(c, 64))?;
    }
    writeln!(out)?;
    for (expected, row) in confusion {
        write!(out, "  {:<first$}", display_text(expected, 64))?;
        for c in &columns {
            write!(out, " {:>width$}", row.get(*c).copied().unwrap_or(0))?;
        }
        writeln!(out)?;
    }
    Ok(())
}
