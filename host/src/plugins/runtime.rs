//! The version-neutral plugin runtime every WIT version's module builds on: what the host
//! asks of each role (the `*Api` traits), what a version module offers (`ApiVersion`), one
//! live instance with its time limit and failure bookkeeping (`Instance`, `run_limited`,
//! `classify`), the one generic load path (`instantiate` over a world's `Bindings`, with the
//! role check), and the bounds on what a plugin may return.

use std::path::Path;

use wasmtime::component::{Component, Linker};
use wasmtime::Store;

use super::host::{executor, Loaded, PluginHost, SUPPORTED_API_VERSIONS};
use super::sandbox::{HostState, SandboxLimits, StderrLog};
use super::types::{self as host, CallFailure, PluginError};
use crate::text::display_text;

// Bounds on what a plugin returns, beyond the call's total output cap. Display-only text
// (names, descriptions, warnings, messages) is cut and escaped; values the host uses as data
// are refused when over their bound.
pub(crate) const MAX_NAME_BYTES: usize = 128;
pub(crate) const MAX_VERSION_BYTES: usize = 64;
pub(crate) const MAX_DESCRIPTION_BYTES: usize = 4096;
pub(crate) const MAX_MESSAGE_BYTES: usize = 4096;
pub(crate) const MAX_WARNING_BYTES: usize = 2048;
pub(crate) const MAX_WARNINGS: usize = 1000;
pub(crate) const MAX_ROLES: usize = 16;
pub(crate) const MAX_SPLITS: usize = 1024;
pub(crate) const MAX_SPLIT_NAME_BYTES: usize = 256;
pub(crate) const MAX_ID_BYTES: usize = 1024;
pub(crate) const MAX_METADATA: usize = 256;
pub(crate) const MAX_REFERENCES: usize = 256;
/// An id is shown cut to this when it is too long to use.
pub(crate) const MAX_SHOWN_ID_BYTES: usize = 64;
pub(crate) const MAX_METADATA_KEY_BYTES: usize = 256;
/// A target, a reference or a metadata value (text for the prompt, the loss and the scores;
/// 64 KiB is hours of transcript, far past any LLM context).
pub(crate) const MAX_TEXT_BYTES: usize = 64 << 10;
pub(crate) const MAX_STOP_STRINGS: usize = 64;
pub(crate) const MAX_STOP_STRING_BYTES: usize = 256;
/// A post-processed caption (the raw caption is at most a few hundred tokens).
pub(crate) const MAX_CAPTION_BYTES: usize = 1 << 20;

/// What the host asks of a prompt template.
pub(crate) trait PromptTemplateApi: Send {
    fn render(
        &mut self,
        metadata: &[(String, String)],
        options: &str,
    ) -> Result<host::PromptPieces, PluginError>;
    fn format_target(
        &mut self,
        target: &str,
        metadata: &[(String, String)],
        options: &str,
    ) -> Result<String, PluginError>;
}

/// What the host asks of a caption post-processor.
pub(crate) trait PostProcessorApi: Send {
    fn process(
        &mut self,
        raw: &str,
        stop_strings: &[String],
        metadata: &[(String, String)],
    ) -> Result<String, PluginError>;
}

/// What the host asks of an opened dataset adapter.
pub(crate) trait DatasetAdapterApi: Send {
    fn name(&self) -> &str;
    fn read(&mut self, split: &str, start: u64, max: u32) -> Result<host::Batch, PluginError>;
}

/// A role's instance behind its interface, with the plugin's self-description.
pub(crate) type Instantiated<A> = Result<(Box<A>, host::PluginInfo), PluginError>;
/// An opened dataset adapter, with the plugin's and the dataset's descriptions.
pub(crate) type OpenedDataset = Result<
    (
        Box<dyn DatasetAdapterApi>,
        host::PluginInfo,
        host::DatasetInfo,
    ),
    PluginError,
>;

/// What one WIT version's module offers the role handles: each role instantiated from a
/// loaded component of that version, behind the version-neutral interfaces above.
pub(crate) trait ApiVersion: Sync {
    fn describe(
        &self,
        host: &PluginHost,
        path: &Path,
        loaded: Loaded,
    ) -> Result<host::PluginInfo, PluginError>;
    fn prompt_template(
        &self,
        host: &PluginHost,
        path: &Path,
        loaded: Loaded,
    ) -> Instantiated<dyn PromptTemplateApi>;
    fn post_processor(
        &self,
        host: &PluginHost,
        path: &Path,
        loaded: Loaded,
    ) -> Instantiated<dyn PostProcessorApi>;
    fn dataset_adapter(
        &self,
        host: &PluginHost,
        path: &Path,
        loaded: Loaded,
        root: &Path,
        options: &str,
    ) -> OpenedDataset;
}

/// One live plugin instance: its store, its bindings, and whether it already failed. A
/// component instance that trapped or was abandoned at its time limit must not be entered
/// again, so its store is dropped (freeing its memory) and every later call says why.
pub(crate) struct Instance<B> {
    pub(crate) name: String,
    store: Option<Store<HostState>>,
    bindings: B,
    host: PluginHost,
    dead: Option<String>,
    log: StderrLog,
}

/// How a call into a plugin ended, before the host looks at the value.
enum Ended<T> {
    Returned(T),
    Failed(wasmtime::Error),
    TimedOut,
}

/// Runs one call (instantiation included) under the sandbox's time limit, however the time is
/// spent: epoch interruption stops running wasm code, the timeout stops a call blocked in a
/// WASI host function (sleep, poll, a FIFO's open) by dropping it.
fn run_limited<T>(
    limits: &SandboxLimits,
    store: &mut Store<HostState>,
    f: impl AsyncFnOnce(&mut Store<HostState>) -> wasmtime::Result<T>,
) -> Ended<T> {
    store.set_epoch_deadline(limits.deadline_ticks());
    store.data_mut().limiter.hit = false;
    let limit = limits.timeout();
    let run = async { tokio::time::timeout(limit, f(store)).await };
    match executor().block_on(run) {
        Ok(Ok(v)) => Ended::Returned(v),
        Ok(Err(e)) => Ended::Failed(e),
        Err(_) => Ended::TimedOut,
    }
}

impl<B> Instance<B> {
    pub(crate) fn fail(&self, call: &'static str, kind: CallFailure) -> PluginError {
        PluginError::Call {
            plugin: self.name.clone(),
            call,
            kind,
        }
    }

    pub(crate) fn call<T>(
        &mut self,
        call: &'static str,
        output_size: impl Fn(&T) -> usize,
        f: impl AsyncFnOnce(&B, &mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        let limits = *self.host.limits();
        let (Some(store), None) = (self.store.as_mut(), &self.dead) else {
            let why = self.dead.clone().unwrap_or_default();
            return Err(self.fail(
                call,
                CallFailure::Trap(format!("the plugin failed earlier ({why}); load it again")),
            ));
        };
        let bindings = &self.bindings;
        let ended = run_limited(&limits, store, async |s| f(bindings, s).await);
        let (text, dropped) = store.data().stderr.drain();
        self.log.forward(&self.name, call, &text, dropped);
        let kind = match ended {
            Ended::Returned(value) => {
                let size = output_size(&value);
                if size <= limits.output_bytes() {
                    return Ok(value);
                }
                return Err(self.fail(
                    call,
                    CallFailure::BadOutput(format!(
                        "{size} bytes, more than the cap of {} MiB",
                        limits.max_output_mib
                    )),
                ));
            }
            Ended::TimedOut => CallFailure::Timeout(limits.timeout()),
            Ended::Failed(e) => classify(store, &limits, &e),
        };
        self.dead = Some(kind.to_string());
        self.store = None;
        Err(self.fail(call, kind))
    }
}

/// What a failed call's error means, in the user's terms.
fn classify(store: &Store<HostState>, limits: &SandboxLimits, e: &wasmtime::Error) -> CallFailure {
    if store.data().limiter.hit {
        return CallFailure::OutOfMemory(limits.memory_bytes());
    }
    let table_full = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<wasmtime::component::ResourceTableError>(),
            Some(wasmtime::component::ResourceTableError::Full)
        )
    });
    if table_full {
        return CallFailure::TooManyHandles(limits.max_handles);
    }
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => CallFailure::Timeout(limits.timeout()),
        Some(wasmtime::Trap::StackOverflow) => CallFailure::StackOverflow,
        Some(wasmtime::Trap::UnreachableCodeReached) => {
            CallFailure::Trap("the plugin panicked or reached `unreachable`".into())
        }
        Some(t) => CallFailure::Trap(t.to_string()),
        None => CallFailure::Trap(display_text(&format!("{e:#}"), MAX_MESSAGE_BYTES)),
    }
}

/// One WIT world's generated bindings, as the runtime instantiates them: each version
/// module implements this for its worlds (a few lines each).
pub(crate) trait Bindings: Sized {
    /// The version's `plugin-info` record.
    type Info;
    async fn instantiate(
        store: &mut Store<HostState>,
        component: &Component,
        linker: &Linker<HostState>,
    ) -> wasmtime::Result<Self>;
    async fn describe(&self, store: &mut Store<HostState>) -> wasmtime::Result<Self::Info>;
    /// Bytes of a self-description, against the output cap.
    fn info_size(info: &Self::Info) -> usize;
    /// The self-description in host terms, bounded and safe to print.
    fn info(info: Self::Info) -> Result<host::PluginInfo, String>;
}

/// Instantiates `path` as the world `B` (under the call time limit), reads its
/// self-description and checks that it implements `role` (`None`: any role, for `plugin
/// check`). The one load path of every role and version.
pub(crate) fn instantiate<B: Bindings>(
    host: &PluginHost,
    path: &Path,
    loaded: Loaded,
    dataset_root: Option<&Path>,
    role: Option<host::Role>,
) -> Result<(Instance<B>, host::PluginInfo), PluginError> {
    let linker = host.linker()?;
    let mut store = host.store(dataset_root, path)?;
    let load_err = |reason: String| PluginError::Load {
        path: path.display().to_string(),
        reason,
    };
    let limits = *host.limits();
    let bindings = match run_limited(&limits, &mut store, async |s| {
        B::instantiate(s, &loaded.component, &linker).await
    }) {
        Ended::Returned(b) => b,
        Ended::TimedOut => {
            return Err(load_err(format!(
                "instantiation did not finish within {:.1} s (killed)",
                limits.timeout().as_secs_f64()
            )))
        }
        Ended::Failed(e) => {
            let why = match classify(&store, &limits, &e) {
                CallFailure::Trap(t) => t,
                other => other.to_string(),
            };
            return Err(load_err(format!(
                "cannot be instantiated (does it export the role's interface? needs only WASI \
                 imports?): {why}"
            )));
        }
    };
    let mut inst = Instance {
        name: path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string(),
        store: Some(store),
        bindings,
        host: host.clone(),
        dead: None,
        log: StderrLog::new(),
    };
    let info = inst.call("describe", B::info_size, async |b, s| b.describe(s).await)?;
    let info = B::info(info).map_err(|why| inst.fail("describe", CallFailure::BadOutput(why)))?;
    if !SUPPORTED_API_VERSIONS.contains(&info.api_version.as_str()) {
        return Err(load_err(format!(
            "plugin {} says it was built for plugin API {}; this earshot supports {}",
            info.name,
            info.api_version,
            SUPPORTED_API_VERSIONS.join(", ")
        )));
    }
    if let Some(role) = role {
        require_role(path, &info, role)?;
    }
    inst.name = format!("{} ({})", info.name, inst.name);
    Ok((inst, info))
}

/// Refuses a plugin that does not say it implements `role`.
fn require_role(path: &Path, info: &host::PluginInfo, role: host::Role) -> Result<(), PluginError> {
    if info.roles.contains(&role) {
        return Ok(());
    }
    Err(PluginError::Load {
        path: path.display().to_string(),
        reason: format!(
            "plugin {} does not implement the {role} role (it implements: {})",
            info.name,
            info.roles
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

/// Warnings for the log: at most [`MAX_WARNINGS`], each cut and escaped.
pub(crate) fn warnings(w: Vec<String>) -> Vec<String> {
    let extra = w.len().saturating_sub(MAX_WARNINGS);
    let mut out: Vec<String> = w
        .iter()
        .take(MAX_WARNINGS)
        .map(|w| display_text(w, MAX_WARNING_BYTES))
        .collect();
    if extra > 0 {
        out.push(format!("... and {extra} more warnings not shown"));
    }
    out
}

pub(crate) fn bad_output(plugin: &str, call: &'static str, why: String) -> PluginError {
    PluginError::Call {
        plugin: plugin.to_string(),
        call,
        kind: CallFailure::BadOutput(why),
    }
}
