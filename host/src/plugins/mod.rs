//! WebAssembly plugins: one wasmtime `Engine` (component model, epoch interruption), a
//! `Store` per plugin instance in a sandbox, a cache of precompiled components, and one
//! module per WIT version converting its bindings into the host types in [`types`]. Callers
//! use the version-neutral role handles of `roles` ([`PromptTemplate`], [`DatasetAdapter`],
//! [`PostProcessor`]); a new WIT version adds a module and a match arm there, and changes no
//! caller.

mod paging;
mod roles;
mod sandbox;
pub mod types;
mod v0_1_0;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store};

pub use paging::{SplitPages, PAGE_SIZE};
pub use roles::{DatasetAdapter, PostProcessor, PromptTemplate};
pub use sandbox::{SandboxLimits, DATA_MOUNT};
pub use types::{
    AudioSource, BadExample, Batch, CallFailure, DatasetInfo, Example, PageExample, PluginError,
    PluginInfo, PromptPieces, Role,
};

use sandbox::{new_store, HostState};

/// Whether printing `c` could move the cursor, change the terminal's state or reorder the
/// text around it: C0 and C1 controls, DEL, and Unicode's bidirectional formatting marks.
fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Text that came from a plugin, made safe to print on a terminal or in a log: every unsafe
/// character (see [`is_unsafe_char`]) is written as a visible `\u{..}` escape, and the text
/// is cut at about `max_bytes`, saying how much was left out.
pub fn display_text(s: &str, max_bytes: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_bytes) + 16);
    for (i, c) in s.char_indices() {
        if out.len() >= max_bytes {
            out.push_str(&format!("... ({} more bytes)", s.len() - i));
            break;
        }
        if is_unsafe_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// A serialized JSON value made safe for a terminal without changing what it decodes to:
/// the unsafe characters JSON allows raw inside strings (DEL, C1 controls, bidi marks; C0
/// controls are already escaped by serde_json) are written as `\uXXXX` escapes.
pub fn terminal_safe_json(json: String) -> String {
    // Raw newlines, tabs and carriage returns in serialized JSON are its own whitespace
    // (serde_json escapes them inside strings): they stay.
    let unsafe_in_json = |c: char| is_unsafe_char(c) && !matches!(c, '\n' | '\r' | '\t');
    if !json.chars().any(unsafe_in_json) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if unsafe_in_json(c) {
            // All of these are in the Basic Multilingual Plane: one \uXXXX each.
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Plugin API versions this host can run.
pub const SUPPORTED_API_VERSIONS: &[&str] = &["0.1.0"];

/// The process-wide engine, with a thread that advances its epoch (call time limits).
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Shared memories escape the per-plugin memory accounting (wasmtime does not report
        // their growth to the limiter): plugins get none.
        config.wasm_threads(false);
        config.shared_memory(false);
        let engine = Engine::new(&config).expect("wasmtime engine configuration is valid");
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("earshot-plugin-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(sandbox::EPOCH_TICK);
                ticker.increment_epoch();
            })
            .expect("spawn the epoch thread");
        engine
    })
}

/// The process-wide executor plugin calls run on. Calls are async so that a call blocked in
/// a WASI host function (a sleep, a FIFO) can be abandoned at its time limit: the caller's
/// thread drives the call with `block_on`; the worker runs WASI's timers and blocking file
/// operations. Never dropped: a file operation stuck in the kernel (a FIFO's open) keeps a
/// blocking-pool thread, which must not hold up the process's exit.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(64)
            .thread_name("earshot-plugin-io")
            .enable_all()
            .build()
            .expect("start the plugin executor")
    })
}

/// Loads plugins with the given sandbox limits; cheap to create.
#[derive(Debug, Clone)]
pub struct PluginHost {
    limits: SandboxLimits,
    cache_dir: Option<PathBuf>,
}

/// The largest plugin file compiled. Compiling takes time in proportion to the code (about
/// 11 s for an 18 MB componentize-py plugin on 2 cores) and happens before any sandbox limit
/// applies; first-party plugins are under 300 KB.
pub const MAX_COMPONENT_BYTES: u64 = 256 << 20;

/// A compiled component and what we know about it before running it.
pub(crate) struct Loaded {
    pub component: Component,
    /// The plugin API version it was built against (one of [`SUPPORTED_API_VERSIONS`]).
    pub api_version: &'static str,
}

impl PluginHost {
    /// `cache_dir`: where precompiled components are kept (None: compile every time).
    pub fn new(limits: SandboxLimits, cache_dir: Option<PathBuf>) -> Self {
        Self { limits, cache_dir }
    }

    /// The default cache: `$EARSHOT_HOME/cache/plugins` (~/.cache/earshot/cache/plugins).
    pub fn default_cache_dir() -> Option<PathBuf> {
        Some(crate::config::earshot_home().join("cache/plugins"))
    }

    pub fn limits(&self) -> &SandboxLimits {
        &self.limits
    }

    pub(crate) fn load(&self, path: &Path) -> Result<Loaded, PluginError> {
        let load_err = |reason: String| PluginError::Load {
            path: path.display().to_string(),
            reason,
        };
        let bytes = crate::files::read_at_most(path, MAX_COMPONENT_BYTES)
            .map_err(|e| load_err(format!("cannot read: {e}")))?;
        if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
            return Err(load_err("not a WebAssembly file".into()));
        }
        // Bytes 4..8: version + layer; layer 1 is a component, 0 a core module.
        if bytes[6] == 0 && bytes[7] == 0 {
            return Err(load_err(
                "a core WebAssembly module, not a component: build the plugin for wasm32-wasip2 \
                 (or wrap it with `wasm-tools component new`)"
                    .into(),
            ));
        }
        let engine = engine();
        let component = self
            .compile_cached(engine, &bytes)
            .map_err(|e| load_err(format!("invalid component: {e:#}")))?;
        let api_version = check_api_version(engine, &component).map_err(load_err)?;
        Ok(Loaded {
            component,
            api_version,
        })
    }

    fn compile_cached(&self, engine: &Engine, bytes: &[u8]) -> wasmtime::Result<Component> {
        let Some(dir) = &self.cache_dir else {
            return Component::new(engine, bytes);
        };
        let mut h = Sha256::new();
        h.update(bytes);
        // Precompiled code is only valid for this engine version and configuration.
        let mut compat = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut compat);
        h.update(std::hash::Hasher::finish(&compat).to_le_bytes());
        let file = dir.join(format!("{}.cwasm", hex::encode(h.finalize())));
        if file.is_file() {
            // SAFETY: the file was written by `Component::serialize` below for this engine
            // version (the key includes it); a stale or damaged file fails to deserialize
            // and is rebuilt.
            match unsafe { Component::deserialize_file(engine, &file) } {
                Ok(c) => return Ok(c),
                Err(e) => tracing::warn!(
                    "ignoring unusable plugin cache entry {}: {e}",
                    file.display()
                ),
            }
        }
        let component = Component::new(engine, bytes)?;
        if let Ok(serialized) = component.serialize() {
            let write = || -> std::io::Result<()> {
                std::fs::create_dir_all(dir)?;
                let tmp = tempfile::NamedTempFile::new_in(dir)?;
                std::fs::write(tmp.path(), &serialized)?;
                tmp.persist(&file).map_err(|e| e.error)?;
                Ok(())
            };
            if let Err(e) = write() {
                tracing::warn!("cannot write the plugin cache {}: {e}", dir.display());
            }
        }
        Ok(component)
    }

    pub(crate) fn store(
        &self,
        dataset_root: Option<&Path>,
        path: &Path,
    ) -> Result<Store<HostState>, PluginError> {
        new_store(engine(), &self.limits, dataset_root).map_err(|e| PluginError::Load {
            path: path.display().to_string(),
            reason: format!("cannot set up the sandbox: {e:#}"),
        })
    }

    pub(crate) fn linker(&self) -> Result<Linker<HostState>, PluginError> {
        let mut linker = Linker::new(engine());
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| PluginError::Load {
            path: "<host>".into(),
            reason: e.to_string(),
        })?;
        Ok(linker)
    }

    /// Instantiates `path` only to read its self-description (`earshot plugin check`).
    pub fn describe(&self, path: &Path) -> Result<PluginInfo, PluginError> {
        roles::describe(self, path)
    }
}

/// Refuses components built against a plugin API this host does not support, naming both.
fn check_api_version(engine: &Engine, component: &Component) -> Result<&'static str, String> {
    let ty = component.component_type();
    let exports: Vec<String> = ty
        .exports(engine)
        .map(|(name, _)| name.to_string())
        .collect();
    let ours: Vec<&String> = exports
        .iter()
        .filter(|n| n.starts_with("earshot:plugin/"))
        .collect();
    if ours.is_empty() {
        return Err(format!(
            "exports no earshot plugin interface (exports: {}); supported plugin API versions: {}",
            if exports.is_empty() {
                "none".to_string()
            } else {
                exports.join(", ")
            },
            SUPPORTED_API_VERSIONS.join(", ")
        ));
    }
    let supported = |n: &str| {
        SUPPORTED_API_VERSIONS
            .iter()
            .copied()
            .find(|v| n.ends_with(&format!("@{v}")))
    };
    if let Some(version) = ours.iter().find_map(|n| supported(n)) {
        return Ok(version);
    }
    let found: Vec<&str> = ours.iter().filter_map(|n| n.split('@').nth(1)).collect();
    Err(format!(
        "built for earshot plugin API {}; this earshot supports {}",
        found.first().copied().unwrap_or("(unversioned)"),
        SUPPORTED_API_VERSIONS.join(", ")
    ))
}
