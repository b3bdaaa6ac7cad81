//! The plugin host: one wasmtime `Engine` (component model, epoch interruption), the
//! executor calls run on, loading and precompiling components (with a cache), each
//! component's plugin API version, and a `Store` per instance in the sandbox.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store};

use super::sandbox::{self, new_store, HostState, SandboxLimits};
use super::types::PluginError;

/// Plugin API versions this host can run.
pub const SUPPORTED_API_VERSIONS: &[&str] = &["0.1.0"];

/// The process-wide engine, with a thread that advances its epoch (call time limits).
pub(crate) fn engine() -> &'static Engine {
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
pub(crate) fn executor() -> &'static tokio::runtime::Runtime {
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
        Some(crate::files::earshot_home().join("cache/plugins"))
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
