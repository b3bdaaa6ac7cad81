//! The one place training progress reaches the terminal (stderr): a progress bar (step,
//! epoch, loss, lr, examples/s, ETA) when stderr is a terminal, plain log lines every
//! `train.log-every` steps otherwise. Results go to stdout elsewhere.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::train::{Event, StepMetrics};

pub struct TrainPrinter {
    bar: ProgressBar,
    log_every: usize,
    steps: usize,
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
        }
    }

    /// A line above the bar (or on stderr when there is no bar).
    pub fn line(&self, text: &str) {
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
            } => self.line(&format!(
                "step {step}: eval loss {loss:.4} on {examples} example(s){}",
                if best { " (best so far)" } else { "" }
            )),
            Event::Note(text) => self.line(&text),
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
