//! Host-side plugin types, independent of any WIT version: each version module converts its
//! generated types into these (`From`), so the rest of the host never sees bindings.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    PromptTemplate,
    DatasetAdapter,
    CaptionPostProcessor,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::PromptTemplate => "prompt-template",
            Role::DatasetAdapter => "dataset-adapter",
            Role::CaptionPostProcessor => "caption-post-processor",
        })
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub api_version: String,
    pub roles: Vec<Role>,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PromptPieces {
    pub before_audio: String,
    pub after_audio: String,
    pub stop_strings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AudioSource {
    /// Relative to the dataset root.
    Path(String),
    /// The encoded file's bytes (not printed).
    #[serde(serialize_with = "inline_len")]
    Inline(Vec<u8>),
}

fn inline_len<S: serde::Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("<{} bytes>", b.len()))
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Example {
    pub id: String,
    pub audio: AudioSource,
    pub start_s: Option<f64>,
    pub end_s: Option<f64>,
    pub target: Option<String>,
    pub references: Vec<String>,
    pub metadata: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatasetInfo {
    pub splits: Vec<String>,
    pub warnings: Vec<String>,
}

/// An example the adapter returned that breaks a per-example bound (too many metadata
/// entries or references, an id, key, value, target or reference too long). It fails alone:
/// the rest of its page is used.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BadExample {
    /// The adapter that returned it.
    pub plugin: String,
    /// Its id, escaped and cut to a printable length (the id itself may be the problem).
    pub id: String,
    pub reason: String,
}

impl fmt::Display for BadExample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "plugin {}: read: example {}: {}",
            self.plugin, self.id, self.reason
        )
    }
}

/// A page's examples in the adapter's order, each usable or refused on its own.
pub type PageExample = Result<Example, BadExample>;

#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub examples: Vec<PageExample>,
    pub warnings: Vec<String>,
    pub next: Option<u64>,
}

/// What went wrong in a plugin call. Always names the plugin and the call.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{path}: {reason}")]
    Load { path: String, reason: String },
    #[error("plugin {plugin}: {call}: {kind}")]
    Call {
        plugin: String,
        call: &'static str,
        kind: CallFailure,
    },
}

#[derive(Debug)]
pub enum CallFailure {
    /// The plugin returned an error value.
    Reported {
        code: String,
        message: String,
    },
    Timeout(std::time::Duration),
    OutOfMemory(usize),
    StackOverflow,
    /// It tried to hold more handles (files, streams) than the sandbox allows.
    TooManyHandles(usize),
    Trap(String),
    /// The plugin returned something the host refuses (too large, invalid).
    BadOutput(String),
}

impl fmt::Display for CallFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallFailure::Reported { code, message } => write!(f, "{code}: {message}"),
            CallFailure::Timeout(d) => {
                write!(f, "did not finish within {:.1} s (killed)", d.as_secs_f64())
            }
            CallFailure::OutOfMemory(cap) => {
                write!(f, "exceeded its memory cap of {} MiB (killed)", cap >> 20)
            }
            CallFailure::StackOverflow => write!(f, "overflowed its call stack (killed)"),
            CallFailure::TooManyHandles(n) => write!(
                f,
                "tried to hold more than {n} open handles (files, directories, streams) (killed)"
            ),
            CallFailure::Trap(t) => write!(f, "crashed: {t}"),
            CallFailure::BadOutput(why) => write!(f, "returned unusable output: {why}"),
        }
    }
}
