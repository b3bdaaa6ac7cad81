//! PNG plots of a run's curves (refreshed while it trains) and of several runs side by side
//! (`earshot compare`), read back from the run folders' metrics.jsonl and eval.jsonl.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use super::error::{Result, TrainError};

/// What drawing fails with (plotters' errors differ per backend); reported as
/// [`TrainError::Plot`] naming the file.
type Drawn = std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>;
use plotters::coord::types::{RangedCoordf64, RangedCoordusize};
use plotters::prelude::*;

/// DejaVu Sans Mono (free licence, see assets/fonts/DejaVu-LICENSE.txt): plots render the
/// same everywhere, without a system font library.
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono.ttf");
const FAMILY: &str = "earshot-mono";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            tracing::warn!("the bundled plot font did not load; plots will have no text");
        }
    });
}

/// A run's recorded curves.
#[derive(Debug, Clone, Default)]
pub struct RunCurves {
    /// (step, training loss), skipped steps left out.
    pub loss: Vec<(usize, f64)>,
    /// (step, eval loss).
    pub eval: Vec<(usize, f64)>,
    /// log10 update-to-data ratio per parameter tensor: (step, value).
    pub update_ratios: BTreeMap<String, Vec<(usize, f64)>>,
}

impl RunCurves {
    /// Reads `metrics.jsonl` (required) and `eval.jsonl` (optional) of a run folder.
    pub fn read(run_dir: &Path) -> Result<Self> {
        let metrics = run_dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&metrics).map_err(|_| TrainError::Records {
            path: run_dir.to_path_buf(),
            reason: "not a run folder (no readable metrics.jsonl)".into(),
        })?;
        let mut curves = RunCurves::default();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad_line = |why: &str| TrainError::Records {
                path: metrics.clone(),
                reason: format!("line {}: {why}", i + 1),
            };
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|_| bad_line("not JSON"))?;
            let Some(step) = v["step"].as_u64().map(|s| s as usize) else {
                return Err(bad_line("no step"));
            };
            if v["skipped"].as_bool() == Some(true) {
                continue;
            }
            if let Some(loss) = v["loss"].as_f64().filter(|l| l.is_finite()) {
                curves.loss.push((step, loss));
            }
            if let Some(ratios) = v["update_ratio_log10"].as_object() {
                for (name, r) in ratios {
                    if let Some(r) = r.as_f64().filter(|r| r.is_finite()) {
                        curves
                            .update_ratios
                            .entry(name.clone())
                            .or_default()
                            .push((step, r));
                    }
                }
            }
        }
        if let Ok(text) = std::fs::read_to_string(run_dir.join("eval.jsonl")) {
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if let (Some(step), Some(loss)) = (v["step"].as_u64(), v["eval_loss"].as_f64()) {
                    if loss.is_finite() {
                        curves.eval.push((step as usize, loss));
                    }
                }
            }
        }
        Ok(curves)
    }

    pub fn best_eval(&self) -> Option<(usize, f64)> {
        self.eval.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// Written next to the metrics: `loss.png` and `update_ratios.png`.
pub fn write_run_plots(run_dir: &Path) -> Result<Vec<PathBuf>> {
    let curves = RunCurves::read(run_dir)?;
    let loss = run_dir.join("loss.png");
    let ratios = run_dir.join("update_ratios.png");
    let name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    plot_losses(&[(name.clone(), curves.clone())], &loss, "loss")?;
    plot_update_ratios(&curves, &ratios, &name)?;
    Ok(vec![loss, ratios])
}

/// Loss curves of several runs in one PNG: training loss as thin lines, eval loss as
/// thick lines with dots, one colour per run; log-scale y.
pub fn plot_losses(runs: &[(String, RunCurves)], out: &Path, title: &str) -> Result<()> {
    drawn(out, draw_losses(runs, out, title))
}

fn drawn(out: &Path, d: Drawn) -> Result<()> {
    d.map_err(|e| TrainError::Plot(format!("{}: cannot draw: {e}", out.display())))
}

fn draw_losses(runs: &[(String, RunCurves)], out: &Path, title: &str) -> Drawn {
    register_font();
    let points = runs
        .iter()
        .flat_map(|(_, c)| c.loss.iter().chain(&c.eval))
        .copied()
        .filter(|&(_, l)| l > 0.0);
    let (mut max_step, mut lo, mut hi) = (1usize, f64::INFINITY, f64::NEG_INFINITY);
    for (s, l) in points {
        max_step = max_step.max(s);
        lo = lo.min(l);
        hi = hi.max(l);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.1, 10.0);
    }
    // Plotted as log10(loss) on a linear axis labelled with the loss itself: plotters' log
    // axis labels only powers of ten, none of which may fall in a run's range.
    let (lo, hi) = ((lo * 0.8).log10(), (hi * 1.25).log10());
    let log = |points: &[(usize, f64)]| -> Vec<(usize, f64)> {
        points
            .iter()
            .filter(|p| p.1 > 0.0)
            .map(|&(s, l)| (s, l.log10()))
            .collect()
    };
    let tmp = temp_png(out)?;
    {
        let root = BitMapBackend::new(tmp.path(), (1000, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0usize..max_step + 1, lo..hi)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (log scale)")
            .y_labels(12)
            .y_label_formatter(&|v| format!("{:.3}", 10f64.powf(*v)))
            .label_style((FAMILY, 14))
            .draw()?;
        for (i, (name, c)) in runs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let train = log(&c.loss);
            chart
                .draw_series(LineSeries::new(train, color.stroke_width(1)))?
                .label(format!("{name} train"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            let eval = log(&c.eval);
            if !eval.is_empty() {
                chart
                    .draw_series(LineSeries::new(eval.clone(), color.stroke_width(3)))?
                    .label(format!("{name} eval"))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(3))
                    });
                chart.draw_series(eval.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
            }
        }
        draw_legend(&mut chart)?;
        root.present()?;
    }
    finish(tmp, out)
}

/// log10 update-to-data ratio per parameter tensor over the steps, with the usual
/// rule-of-thumb band around -3 marked.
pub fn plot_update_ratios(curves: &RunCurves, out: &Path, name: &str) -> Result<()> {
    drawn(out, draw_update_ratios(curves, out, name))
}

fn draw_update_ratios(curves: &RunCurves, out: &Path, name: &str) -> Drawn {
    register_font();
    let all = curves.update_ratios.values().flatten().copied();
    let (mut max_step, mut lo, mut hi) = (1usize, -3.5f64, -2.5f64);
    for (s, r) in all {
        max_step = max_step.max(s);
        lo = lo.min(r);
        hi = hi.max(r);
    }
    let tmp = temp_png(out)?;
    {
        let root = BitMapBackend::new(tmp.path(), (1000, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{name}: log10(|update| / |weight|) per tensor"),
                (FAMILY, 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0usize..max_step + 1, (lo - 0.2)..(hi + 0.2))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("log10 ratio")
            .label_style((FAMILY, 14))
            .draw()?;
        chart.draw_series(LineSeries::new(
            [(0, -3.0), (max_step + 1, -3.0)],
            BLACK.mix(0.3).stroke_width(1),
        ))?;
        for (i, (tensor, points)) in curves.update_ratios.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(tensor.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        draw_legend(&mut chart)?;
        root.present()?;
    }
    finish(tmp, out)
}

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordusize, RangedCoordf64>>;

fn draw_legend<'a>(chart: &mut Chart<'a, 'a>) -> Drawn {
    chart
        .configure_series_labels()
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// A temporary `.png` for `out` (plotters picks the format from the name).
fn temp_png(out: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .suffix(".png")
        .tempfile_in(crate::files::temp_dir_for(out)?)
}

/// Puts the finished PNG in place, so a reader never sees half a file (or copies it into a
/// device or pipe given as the output).
fn finish(tmp: tempfile::NamedTempFile, out: &Path) -> Drawn {
    Ok(crate::files::persist(tmp, out)?)
}
