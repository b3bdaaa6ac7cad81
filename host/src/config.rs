//! Run configs (TOML). Unknown keys and wrong types are errors that name the key and the
//! line. Relative paths are relative to the config file, those given with `--set` to the
//! current folder (where the user typed them); `${EARSHOT_HOME}` (default ~/.cache/earshot)
//! and a leading `~` are expanded. `--set section.key=value` overrides.

use std::path::{Path, PathBuf};

/// What is wrong with a run config, naming the file (and the key or `--set` at fault).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// Not TOML, an unknown key, a value of the wrong type, or a value out of range.
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("--set {assignment}: {reason}")]
    Set { assignment: String, reason: String },
}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;
use serde::{Deserialize, Serialize};

use crate::mel::{EncoderWindow, Padding};
use crate::models::lora::LoraConfig;
use crate::models::projector::ProjectorConfig;
use crate::models::whisper::EncoderLayers;
use crate::plugins::SandboxLimits;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RunConfig {
    pub models: ModelsConfig,
    pub plugins: PluginsConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub mel: MelConfig,
    #[serde(default)]
    pub encoder: EncoderConfig,
    #[serde(default)]
    pub projector: ProjectorConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    /// LoRA adapters on the LLM's projections, trained with the projector (absent: the
    /// projector alone trains).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
    /// Several tasks trained into one model (`[[task]]`); empty: this file's own task alone.
    #[serde(default, rename = "task", skip_serializing_if = "Vec::is_empty")]
    pub task_entries: Vec<TaskEntry>,
}

/// The most tasks one run trains.
pub const MAX_TASKS: usize = 16;

/// One `[[task]]` of a multi-task run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TaskEntry {
    /// Names the task in logs, eval sections, report files (`report-NAME.html`) and
    /// `--task NAME`: letters, digits, `-` and `_`, at most 32.
    pub name: String,
    /// A run config whose `[data]`, `[plugins]` prompt-options and post-processor, and
    /// `[eval]` define the task (its other sections are not read: the models, encoder,
    /// projector, training and LoRA settings are this file's). Absent: this file's own
    /// `[data]`, prompt and `[eval]` (exactly one entry has no config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
    /// Share of the training samples drawn from this task, relative to the others'.
    #[serde(default = "default_task_weight")]
    pub weight: f64,
}

fn default_task_weight() -> f64 {
    1.0
}

/// A task resolved: its name, weight, and the run config it trains, evaluates and captions
/// with (this file's models and settings with the task's data, prompt and eval).
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub weight: f64,
    pub config: RunConfig,
}

/// The task of a config without `[[task]]`.
pub const SINGLE_TASK_NAME: &str = "main";

/// What `earshot eval --config` scores besides the caption metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EvalConfig {
    /// Attribute name -> its allowed values, e.g. `family = ["piano", "organ"]`: the value
    /// a caption names is compared with the example's metadata of that name.
    #[serde(default)]
    pub attributes: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ModelsConfig {
    /// Whisper, Hugging Face layout folder.
    pub whisper: PathBuf,
    /// LLM: GGUF file or Hugging Face folder.
    pub llm: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginsConfig {
    pub prompt_template: PathBuf,
    #[serde(default)]
    pub prompt_options: String,
    #[serde(default)]
    pub post_processor: Option<PathBuf>,
    #[serde(default)]
    pub sandbox: SandboxLimits,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DataConfig {
    /// Dataset-adapter plugin.
    pub adapter: PathBuf,
    /// Dataset root (mounted read-only for the adapter).
    pub root: PathBuf,
    #[serde(default)]
    pub options: String,
    #[serde(default = "default_train_split")]
    pub train_split: String,
    /// Validation split: the eval loss during training, early stopping and `best/` (and any
    /// setting chosen by comparing runs); none: no eval during training.
    #[serde(default)]
    pub valid_split: Option<String>,
    /// Test split: what `earshot eval --config` reports on by default. Nothing is chosen on
    /// it; `train` only checks it for content shared with the other splits.
    #[serde(default)]
    pub test_split: Option<String>,
    /// Deprecated: the old single held-out split. Read as `valid-split` and `test-split`
    /// both (with a warning), and never written back.
    #[serde(default, skip_serializing)]
    pub eval_split: Option<String>,
    /// Longest audio one example may decode to, in seconds; longer is an error naming the
    /// example (a few KB of compressed input can claim hours).
    #[serde(default = "default_max_audio_s")]
    pub max_audio_s: f64,
    /// What training does with an example the adapter returns over a per-example bound
    /// (metadata entries, an id, key, value, target or reference too long).
    #[serde(default)]
    pub bad_examples: BadExamples,
    /// The targets are text to be reproduced (transcription): the leak audit then also
    /// compares normalised targets across splits. Off for label tasks, whose targets are
    /// shared across splits by design.
    #[serde(default)]
    pub text_targets: bool,
    /// What `train` does when its splits share content (the leak audit, by audio bytes and,
    /// with text-targets, normalised targets): warn (default), refuse, or ignore.
    #[serde(default)]
    pub leaks: LeakPolicy,
}

impl DataConfig {
    /// The splits a run names, each once, in the order they are read and compared for
    /// leaks: train, valid, test.
    pub fn run_splits(&self) -> Vec<&str> {
        let mut splits = vec![self.train_split.as_str()];
        for s in [&self.valid_split, &self.test_split].into_iter().flatten() {
            if !splits.contains(&s.as_str()) {
                splits.push(s);
            }
        }
        splits
    }
}

/// `data.leaks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LeakPolicy {
    #[default]
    Warn,
    Refuse,
    Ignore,
}

/// `data.bad-examples`: skip such an example with a warning (counted in the banner), or
/// refuse to train on a split that holds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BadExamples {
    #[default]
    Skip,
    Refuse,
}

fn default_train_split() -> String {
    "train".into()
}

/// Ten minutes: 20 of Whisper's 30 s windows.
pub const DEFAULT_MAX_AUDIO_S: f64 = 600.0;
/// The largest `data.max-audio-s` accepted (a day).
pub const MAX_AUDIO_S_LIMIT: f64 = 24.0 * 3600.0;

fn default_max_audio_s() -> f64 {
    DEFAULT_MAX_AUDIO_S
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MelConfig {
    #[serde(default)]
    pub padding: Padding,
    /// `full` (default): every encoder window is 30 s, short clips padded; `clip`: the
    /// encoder runs on the frames covering the clip, rounded up to whole seconds.
    #[serde(default)]
    pub window: EncoderWindow,
}

/// What the frozen encoder hands the projector.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EncoderConfig {
    /// `"last"` (default: the encoder's output), `"all"` (every hidden state, mixed by
    /// learned softmax weights before the projector) or a list of hidden-state indices
    /// (0 = after the convolution stem, N = the encoder's output).
    #[serde(default)]
    pub layers: EncoderLayers,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct TrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed before each optimizer step.
    pub accumulate: usize,
    /// Peak learning rate.
    pub lr: f64,
    pub schedule: Schedule,
    /// Linear warmup steps (warmup-cosine).
    pub warmup_steps: usize,
    /// Final learning rate of the cosine decay.
    pub min_lr: f64,
    /// 0 reproduces the write-up's "Adam without momentum".
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables.
    pub grad_clip: f64,
    pub seed: u64,
    pub log_every: usize,
    /// Consecutive non-finite steps after which the run stops.
    pub max_nonfinite_steps: usize,
    /// Write a checkpoint every this many steps (and at the end, and on Ctrl-C).
    pub checkpoint_every: usize,
    /// Checkpoints kept (the newest).
    pub keep_last: usize,
    /// Eval loss on `data.valid-split` every this many steps (and at the end); 0: only at the end.
    pub eval_every: usize,
    /// Stop after this many evaluations in a row without a better eval loss (a checkpoint
    /// is written; `best/` holds the best one); 0: never stop early.
    pub early_stop_patience: usize,
    pub run_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// The write-up's: the same lr throughout.
    Constant,
    /// Linear warmup to `lr`, then cosine decay to `min-lr` at the last step.
    WarmupCosine,
}

impl TrainConfig {
    /// The learning rate of (1-based) `step`.
    pub fn lr_at(&self, step: usize) -> f64 {
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::WarmupCosine => {
                if step <= self.warmup_steps {
                    return self.lr * step as f64 / self.warmup_steps.max(1) as f64;
                }
                let span = self.steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
                self.min_lr
                    + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }

    /// What a warmup longer than the run does to the schedule, said before training starts
    /// (not an error: short runs of a long run's config are common, in tests and trials).
    pub fn schedule_warning(&self) -> Option<String> {
        (self.schedule == Schedule::WarmupCosine && self.warmup_steps > self.steps).then(|| {
            format!(
                "train.warmup-steps = {} is more than train.steps = {}: the learning rate \
                 rises for the whole run and ends at {:.3e}, not train.lr = {:.3e}",
                self.warmup_steps,
                self.steps,
                self.lr_at(self.steps),
                self.lr
            )
        })
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 4,
            accumulate: 1,
            lr: 1.5e-3,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            min_lr: 0.0,
            beta1: 0.0,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 1.0,
            seed: 0,
            log_every: 10,
            max_nonfinite_steps: 5,
            checkpoint_every: 100,
            keep_last: 3,
            eval_every: 100,
            early_stop_patience: 0,
            run_dir: PathBuf::from("runs/default"),
        }
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    let s = p.to_string_lossy().replace(
        "${EARSHOT_HOME}",
        &crate::files::earshot_home().to_string_lossy(),
    );
    let p = match s.strip_prefix("~/") {
        Some(rest) => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(rest),
        None => PathBuf::from(s),
    };
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

/// Applies `section.key=value` to the TOML tree (the value parsed as TOML, else a string).
fn apply_set(doc: &mut toml::Table, assignment: &str) -> Result<()> {
    let bad = |reason: String| ConfigError::Set {
        assignment: format!("{assignment:?}"),
        reason,
    };
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| bad("expected section.key=value".into()))?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, path) = parts.split_last().ok_or_else(|| bad("empty key".into()))?;
    let mut table = doc;
    for part in path {
        table = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| bad(format!("{part} is not a section")))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

impl RunConfig {
    /// The config with every path absolute (relative ones joined to the current folder, as
    /// they are read): a run folder's copy then names the same files wherever it is read
    /// from (`earshot serve RUN_DIR`).
    pub fn with_absolute_paths(&self) -> Self {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut cfg = self.clone();
        cfg.models.whisper = abs(&cfg.models.whisper);
        cfg.models.llm = abs(&cfg.models.llm);
        cfg.plugins.prompt_template = abs(&cfg.plugins.prompt_template);
        cfg.plugins.post_processor = cfg.plugins.post_processor.as_deref().map(abs);
        cfg.data.adapter = abs(&cfg.data.adapter);
        cfg.data.root = abs(&cfg.data.root);
        cfg.train.run_dir = abs(&cfg.train.run_dir);
        for entry in &mut cfg.task_entries {
            entry.config = entry.config.as_deref().map(abs);
        }
        cfg
    }

    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let cfg = Self::load_unresolved(path, sets)?;
        cfg.resolve_tasks(path)?;
        Ok(cfg)
    }

    /// [`Self::load`] without reading the configs its `[[task]]` entries name (a task's own
    /// config is read this way: one that lists tasks itself is refused, not followed).
    fn load_unresolved(path: &Path, sets: &[String]) -> Result<Self> {
        let text = crate::files::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        Self::parse(&text, path, sets)
    }

    /// Parses, overrides, resolves and validates a config whose text is `text` (read from
    /// `path`, which errors name and relative paths start from).
    pub fn from_toml(text: &str, path: &Path, sets: &[String]) -> Result<Self> {
        let cfg = Self::parse(text, path, sets)?;
        cfg.resolve_tasks(path)?;
        Ok(cfg)
    }

    fn parse(text: &str, path: &Path, sets: &[String]) -> Result<Self> {
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for s in sets {
            apply_set(&mut doc, s)?;
        }
        // Re-serialise so errors after --set still point at a key; line numbers refer to the
        // file when there are no overrides.
        let mut cfg: RunConfig = if sets.is_empty() {
            toml::from_str(text).map_err(|e| invalid(e.to_string()))?
        } else {
            doc.try_into()
                .map_err(|e| invalid(format!("(with --set) {e}")))?
        };
        let file_base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        // A path given with --set was typed relative to the current folder.
        let base = |key: &str| -> PathBuf {
            let set = sets
                .iter()
                .any(|s| s.split_once('=').is_some_and(|(k, _)| k.trim() == key));
            if set {
                PathBuf::new()
            } else {
                file_base.clone()
            }
        };
        cfg.models.whisper = resolve(&base("models.whisper"), &cfg.models.whisper);
        cfg.models.llm = resolve(&base("models.llm"), &cfg.models.llm);
        cfg.plugins.prompt_template = resolve(
            &base("plugins.prompt-template"),
            &cfg.plugins.prompt_template,
        );
        cfg.plugins.post_processor = cfg
            .plugins
            .post_processor
            .map(|p| resolve(&base("plugins.post-processor"), &p));
        cfg.data.adapter = resolve(&base("data.adapter"), &cfg.data.adapter);
        cfg.data.root = resolve(&base("data.root"), &cfg.data.root);
        cfg.train.run_dir = resolve(&base("train.run-dir"), &cfg.train.run_dir);
        if let Some(old) = cfg.data.eval_split.take() {
            if cfg.data.valid_split.is_some() || cfg.data.test_split.is_some() {
                return Err(invalid(
                    "data.eval-split is the old name of valid-split and test-split together: \
                     with either of those set, remove it"
                        .into(),
                ));
            }
            tracing::warn!(
                "{}: data.eval-split is deprecated; it is read as data.valid-split and \
                 data.test-split both, so the split that chooses the checkpoint (early \
                 stopping, best/) is also the one reported on. Name the adapter's validation \
                 and test splits instead (first-party adapters: valid-split = \"valid\", \
                 test-split = \"test\")",
                path.display()
            );
            cfg.data.valid_split = Some(old.clone());
            cfg.data.test_split = Some(old);
        }
        for entry in &mut cfg.task_entries {
            if let Some(task_config) = entry.config.take() {
                entry.config = Some(resolve(&file_base, &task_config));
            }
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Whether the config lists several tasks.
    pub fn is_multi_task(&self) -> bool {
        !self.task_entries.is_empty()
    }

    /// The tasks this config trains, in the order `[[task]]` lists them (one, named
    /// [`SINGLE_TASK_NAME`], without `[[task]]`). Reads each task's config file.
    pub fn tasks(&self) -> Result<Vec<Task>> {
        self.resolve_tasks(Path::new("the run config"))
    }

    /// The config of the task `name` captions and evaluates with; `None`: this file's own
    /// task (a single-task config's, or the `[[task]]` entry without `config`).
    pub fn for_task(&self, name: Option<&str>) -> Result<RunConfig> {
        match name {
            Some(name) => Ok(self.task(name)?.config),
            None => {
                let mut own = self.clone();
                own.task_entries.clear();
                Ok(own)
            }
        }
    }

    /// The task named `name`, or an error listing the names.
    pub fn task(&self, name: &str) -> Result<Task> {
        let tasks = self.tasks()?;
        let names: Vec<String> = tasks.iter().map(|t| t.name.clone()).collect();
        tasks
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| ConfigError::Invalid {
                path: PathBuf::from("--task"),
                reason: format!("no task {name:?}; the config's tasks: {}", names.join(", ")),
            })
    }

    fn resolve_tasks(&self, path: &Path) -> Result<Vec<Task>> {
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let mut own = self.clone();
        own.task_entries.clear();
        if self.task_entries.is_empty() {
            return Ok(vec![Task {
                name: SINGLE_TASK_NAME.into(),
                weight: 1.0,
                config: own,
            }]);
        }
        if self.task_entries.len() > MAX_TASKS {
            return Err(invalid(format!(
                "{} [[task]] entries: at most {MAX_TASKS}",
                self.task_entries.len()
            )));
        }
        let own_entries = self
            .task_entries
            .iter()
            .filter(|t| t.config.is_none())
            .count();
        if own_entries != 1 {
            return Err(invalid(format!(
                "{own_entries} [[task]] entries without `config`: exactly one names this \
                 file's own [data], prompt and [eval] as a task"
            )));
        }
        let template = std::fs::read(&self.plugins.prompt_template).map_err(|e| {
            invalid(format!(
                "plugins.prompt-template = {}: {e}",
                self.plugins.prompt_template.display()
            ))
        })?;
        let mut tasks: Vec<Task> = Vec::with_capacity(self.task_entries.len());
        for entry in &self.task_entries {
            let name = &entry.name;
            let name_ok = !name.is_empty()
                && name.len() <= 32
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !name_ok {
                return Err(invalid(format!(
                    "[[task]] name {name:?}: use 1-32 letters, digits, '-' or '_' (it names \
                     report files)"
                )));
            }
            if tasks.iter().any(|t| &t.name == name) {
                return Err(invalid(format!("[[task]] name {name:?} is used twice")));
            }
            if !(entry.weight.is_finite() && entry.weight > 0.0) {
                return Err(invalid(format!(
                    "task {name}: weight must be a positive number, got {}",
                    entry.weight
                )));
            }
            let config = match &entry.config {
                None => own.clone(),
                Some(file) => {
                    let other = RunConfig::load_unresolved(file, &[]).map_err(|e| {
                        invalid(format!("task {name}: config {}: {e}", file.display()))
                    })?;
                    if other.is_multi_task() {
                        return Err(invalid(format!(
                            "task {name}: config {} lists tasks of its own; a task's config \
                             must be a single-task config",
                            file.display()
                        )));
                    }
                    let same_template = std::fs::read(&other.plugins.prompt_template)
                        .is_ok_and(|bytes| bytes == template);
                    if !same_template {
                        return Err(invalid(format!(
                            "task {name}: its prompt-template plugin ({}) is not this file's \
                             ({}): the tasks of one run share the template (the checkpoint \
                             records one) and differ by prompt-options",
                            other.plugins.prompt_template.display(),
                            self.plugins.prompt_template.display()
                        )));
                    }
                    let mut task = own.clone();
                    task.data = other.data;
                    task.eval = other.eval;
                    task.plugins.prompt_options = other.plugins.prompt_options;
                    task.plugins.post_processor = other.plugins.post_processor;
                    task
                }
            };
            tasks.push(Task {
                name: name.clone(),
                weight: entry.weight,
                config,
            });
        }
        Ok(tasks)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let t = &self.train;
        let invalid = |reason: String| {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                reason,
            })
        };
        if t.steps == 0 {
            return invalid("train.steps must be at least 1".into());
        }
        if t.batch_size == 0 || t.accumulate == 0 {
            return invalid("train.batch-size and train.accumulate must be at least 1".into());
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return invalid(format!("train.lr must be a positive number, got {}", t.lr));
        }
        if !(0.0..1.0).contains(&t.beta1) || !(0.0..1.0).contains(&t.beta2) {
            return invalid("train.beta1 and train.beta2 must be in [0, 1)".into());
        }
        // NaN passes every comparison, so each number is checked to be finite too.
        let off = "a number >= 0 (0 turns it off)";
        for (key, value, ok, rule) in [
            ("train.eps", t.eps, t.eps > 0.0, "a positive number"),
            (
                "train.weight-decay",
                t.weight_decay,
                t.weight_decay >= 0.0,
                off,
            ),
            ("train.grad-clip", t.grad_clip, t.grad_clip >= 0.0, off),
            (
                "train.min-lr",
                t.min_lr,
                t.min_lr >= 0.0 && t.min_lr <= t.lr,
                "a number >= 0 and at most train.lr",
            ),
        ] {
            if !(ok && value.is_finite()) {
                return invalid(format!("{key} must be {rule}, got {value}"));
            }
        }
        if let Err(e) = self.projector.check() {
            return invalid(e);
        }
        if let Err(e) = self.encoder.layers.check() {
            return invalid(e);
        }
        if let Some(Err(e)) = self.lora.as_ref().map(LoraConfig::check) {
            return invalid(e);
        }
        if let Err(e) = self.plugins.sandbox.validate() {
            return invalid(e.to_string());
        }
        if t.early_stop_patience > 0 && self.data.valid_split.is_none() {
            return invalid(
                "train.early-stop-patience needs a validation split (data.valid-split)".into(),
            );
        }
        let max_audio = self.data.max_audio_s;
        if !(max_audio.is_finite() && max_audio > 0.0 && max_audio <= MAX_AUDIO_S_LIMIT) {
            return invalid(format!(
                "data.max-audio-s = {max_audio}: must be > 0 and at most {MAX_AUDIO_S_LIMIT} (a day)"
            ));
        }
        for (key, file) in [
            ("models.whisper", &self.models.whisper),
            ("models.llm", &self.models.llm),
            ("plugins.prompt-template", &self.plugins.prompt_template),
            ("data.adapter", &self.data.adapter),
            ("data.root", &self.data.root),
        ] {
            if !file.exists() {
                return invalid(format!(
                    "{key} = {}: no such file or folder",
                    file.display()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_warmup_longer_than_the_run_is_said() {
        let mut t = TrainConfig {
            schedule: Schedule::WarmupCosine,
            warmup_steps: 100,
            steps: 40,
            lr: 1e-3,
            ..TrainConfig::default()
        };
        let w = t.schedule_warning().expect("a warning");
        assert!(w.contains("ends at 4.000e-4"), "{w}");
        t.steps = 100;
        assert_eq!(t.schedule_warning(), None);
        t.schedule = Schedule::Constant;
        t.steps = 40;
        assert_eq!(t.schedule_warning(), None);
    }

    #[test]
    fn warmup_cosine_schedule() {
        let t = TrainConfig {
            steps: 110,
            lr: 1e-3,
            min_lr: 1e-5,
            warmup_steps: 10,
            schedule: Schedule::WarmupCosine,
            ..TrainConfig::default()
        };
        assert!((t.lr_at(1) - 1e-4).abs() < 1e-12);
        assert!((t.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((t.lr_at(60) - (1e-5 + 0.5 * (1e-3 - 1e-5))).abs() < 1e-12);
        assert!((t.lr_at(110) - 1e-5).abs() < 1e-12);
        let c = TrainConfig::default();
        assert_eq!(c.lr_at(1), c.lr);
        assert_eq!(c.lr_at(1000), c.lr);
    }
}
