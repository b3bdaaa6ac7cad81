//! The one place progress, notices, warnings and errors reach the terminal (stderr; the
//! architecture test holds that no other file prints to it): a progress bar (step, epoch, loss,
//! lr, examples/s, ETA) when stderr is a terminal, plain log lines every `train.log-every`
//! steps otherwise, and for every long phase (encoding a split, an evaluation, captioning a
//! split) a plain line at a steady interval (`--progress-interval`), so a run whose output
//! goes to a file is never silent for minutes. Results go to stdout elsewhere.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::train::{Event, StepMetrics};

/// A progress line of a long phase (from [`PhaseProgress::line`]).
pub fn progress(line: &str) {
    eprintln!("{line}");
}

/// Where a result was written, or another note for the user that is not itself a result
/// ("wrote loss.png", "scores: eval.json").
pub fn notice(text: &str) {
    eprintln!("{text}");
}

/// "warning: ..." (text from plugins or files must already be made safe to print).
pub fn warning(text: &str) {
    eprintln!("warning: {text}");
}

/// "error: ..." for one failed input of many (the command goes on) or the command's end.
pub fn error(text: &str) {
    eprintln!("error: {text}");
}

/// Seconds between progress lines of a long phase, in milliseconds (set once from the
/// global `--progress-interval` flag).
static PROGRESS_INTERVAL_MS: AtomicU64 = AtomicU64::new(10_000);

pub fn set_progress_interval(seconds: f64) {
    let ms = (seconds.clamp(0.0, 86_400.0) * 1000.0) as u64;
    PROGRESS_INTERVAL_MS.store(ms, Ordering::Relaxed);
}

fn progress_interval() -> Duration {
    Duration::from_millis(PROGRESS_INTERVAL_MS.load(Ordering::Relaxed))
}

/// Rate-limited progress lines for one long phase: "encoding train: 120/823 clip(s),
/// 2.31/s, about 5m 04s left" (no total: no time left).
pub struct PhaseProgress {
    phase: String,
    unit: &'static str,
    started: Instant,
    last: Option<Instant>,
    done: usize,
}

impl PhaseProgress {
    pub fn new(phase: impl Into<String>, unit: &'static str) -> Self {
        Self {
            phase: phase.into(),
            unit,
            started: Instant::now(),
            last: None,
            done: 0,
        }
    }

    /// The line to print now for `done` (of `total`) items, if one is due: at the interval,
    /// and at the end of the phase.
    pub fn line(&mut self, done: usize, total: Option<usize>) -> Option<String> {
        self.done = done;
        let now = Instant::now();
        let finished = total.is_some_and(|t| done >= t);
        let since = now.duration_since(self.last.unwrap_or(self.started));
        let due = finished || (done > 0 && since >= progress_interval());
        if !due {
            return None;
        }
        self.last = Some(now);
        let secs = now.duration_since(self.started).as_secs_f64();
        let rate = done as f64 / secs.max(1e-9);
        let mut text = match total {
            Some(t) => format!("{}: {done}/{t} {}", self.phase, self.unit),
            None => format!("{}: {done} {}", self.phase, self.unit),
        };
        text.push_str(&format!(", {rate:.2}/s"));
        match total {
            Some(_) if finished => text.push_str(&format!(", done in {}", clock(secs))),
            Some(t) if rate > 0.0 => {
                text.push_str(&format!(", about {} left", clock((t - done) as f64 / rate)))
            }
            _ => {}
        }
        Some(text)
    }
}

/// "1h 02m", "5m 04s", "12s".
fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

pub struct TrainPrinter {
    bar: ProgressBar,
    log_every: usize,
    steps: usize,
    phase: Option<PhaseProgress>,
    /// Prints nothing (a rank other than 0 of a data-parallel job).
    silent: bool,
}

impl TrainPrinter {
    pub fn new(steps: usize, log_every: usize) -> Self {
        let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "step {pos}/{len} [{bar:30}] {msg} | {elapsed_precise} elapsed, ETA {eta_precise}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(500));
        Self {
            bar,
            log_every: log_every.max(1),
            steps,
            phase: None,
            silent: false,
        }
    }

    /// A printer that prints nothing: rank 0 alone reports a data-parallel job.
    pub fn silent(steps: usize) -> Self {
        Self {
            bar: ProgressBar::hidden(),
            log_every: 1,
            steps,
            phase: None,
            silent: true,
        }
    }

    /// A line above the bar (or on stderr when there is no bar).
    pub fn line(&self, text: &str) {
        if self.silent {
            return;
        }
        if self.bar.is_hidden() {
            eprintln!("{text}");
        } else {
            self.bar.println(text);
        }
    }

    fn step_line(&self, m: &StepMetrics) -> String {
        format!(
            "step {:>5}/{}  epoch {:.2}  loss {:.4}  acc {:.3}  p(correct) {:.3}  |g| {:.3}  lr {:.2e}  {:.2} ex/s",
            m.step, self.steps, m.epoch, m.loss, m.accuracy, m.mean_prob, m.grad_norm, m.lr, m.examples_per_s
        )
    }

    pub fn event(&mut self, event: Event) {
        match event {
            Event::Start { from, to } => {
                self.steps = to;
                self.bar.set_length(to as u64);
                self.bar.set_position(from as u64);
                // The ETA counts only the steps run now, not those before a resume.
                self.bar.reset_eta();
            }
            Event::Step(m) => {
                self.bar.set_position(m.step as u64);
                self.bar.set_message(format!(
                    "epoch {:.2} loss {:.4} lr {:.2e} {:.2} ex/s",
                    m.epoch, m.loss, m.lr, m.examples_per_s
                ));
                if m.step % self.log_every == 0 || m.step == 1 || m.step == self.steps {
                    self.line(&self.step_line(m));
                }
            }
            Event::Eval {
                step,
                loss,
                examples,
                best,
                tasks,
            } => self.line(&format!(
                "step {step}: eval loss {loss:.4}{} on {examples} example(s){}",
                if tasks.len() > 1 {
                    let parts: Vec<String> =
                        tasks.iter().map(|(n, l)| format!("{n} {l:.4}")).collect();
                    format!(" (mean of {})", parts.join(", "))
                } else {
                    String::new()
                },
                if best { " (best so far)" } else { "" }
            )),
            Event::Note(text) => self.line(&text),
            Event::Progress { phase, done, total } => {
                // A new phase, or the same one starting again (the next evaluation).
                if self
                    .phase
                    .as_ref()
                    .is_none_or(|p| p.phase != phase || done < p.done)
                {
                    self.phase = Some(PhaseProgress::new(phase, "clip(s)"));
                }
                if let Some(text) = self.phase.as_mut().and_then(|p| p.line(done, Some(total))) {
                    self.line(&text);
                }
            }
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
