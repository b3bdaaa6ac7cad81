//! Plugin API 0.1.0 (`wit/since_v0.1.0`): bindings for each role's world, conversions of the
//! generated types into host types, and the role handles the rest of the host uses.

use std::path::Path;

use wasmtime::Store;

use super::sandbox::{HostState, SandboxLimits, StderrLog};
use super::types::{self as host, CallFailure, PluginError};
use super::{display_text, runtime, Loaded, PluginHost};

// Exports are called async: see `run_limited`.
mod base {
    wasmtime::component::bindgen!({
        world: "plugin-base",
        path: "../wit/since_v0.1.0",
        exports: { default: async },
    });
}
mod prompt {
    wasmtime::component::bindgen!({
        world: "prompt-template-plugin",
        path: "../wit/since_v0.1.0",
        exports: { default: async },
        with: { "earshot:plugin/types": crate::plugins::v0_1_0::base::earshot::plugin::types },
    });
}
mod dataset {
    wasmtime::component::bindgen!({
        world: "dataset-adapter-plugin",
        path: "../wit/since_v0.1.0",
        exports: { default: async },
        with: { "earshot:plugin/types": crate::plugins::v0_1_0::base::earshot::plugin::types },
    });
}
mod post {
    wasmtime::component::bindgen!({
        world: "caption-post-processor-plugin",
        path: "../wit/since_v0.1.0",
        exports: { default: async },
        with: { "earshot:plugin/types": crate::plugins::v0_1_0::base::earshot::plugin::types },
    });
}

use base::earshot::plugin::types as wit;

// Bounds on what a plugin returns, beyond the call's total output cap. Display-only text
// (names, descriptions, warnings, messages) is cut and escaped; values the host uses as data
// are refused when over their bound.
const MAX_NAME_BYTES: usize = 128;
const MAX_VERSION_BYTES: usize = 64;
const MAX_DESCRIPTION_BYTES: usize = 4096;
pub(crate) const MAX_MESSAGE_BYTES: usize = 4096;
const MAX_WARNING_BYTES: usize = 2048;
const MAX_WARNINGS: usize = 1000;
const MAX_ROLES: usize = 16;
const MAX_SPLITS: usize = 1024;
const MAX_SPLIT_NAME_BYTES: usize = 256;
const MAX_ID_BYTES: usize = 1024;
const MAX_METADATA: usize = 256;
const MAX_REFERENCES: usize = 256;
/// An id is shown cut to this when it is too long to use.
const MAX_SHOWN_ID_BYTES: usize = 64;
const MAX_METADATA_KEY_BYTES: usize = 256;
/// A target, a reference or a metadata value (text for the prompt, the loss and the scores;
/// 64 KiB is hours of transcript, far past any LLM context).
const MAX_TEXT_BYTES: usize = 64 << 10;
const MAX_STOP_STRINGS: usize = 64;
const MAX_STOP_STRING_BYTES: usize = 256;
/// A post-processed caption (the raw caption is at most a few hundred tokens).
const MAX_CAPTION_BYTES: usize = 1 << 20;

impl From<wit::Role> for host::Role {
    fn from(r: wit::Role) -> Self {
        match r {
            wit::Role::PromptTemplate => host::Role::PromptTemplate,
            wit::Role::DatasetAdapter => host::Role::DatasetAdapter,
            wit::Role::CaptionPostProcessor => host::Role::CaptionPostProcessor,
        }
    }
}

fn info_size(i: &wit::PluginInfo) -> usize {
    i.name.len() + i.version.len() + i.api_version.len() + i.description.len() + i.roles.len()
}

/// The self-description, bounded and safe to print.
fn plugin_info(i: wit::PluginInfo) -> Result<host::PluginInfo, String> {
    if i.roles.len() > MAX_ROLES {
        return Err(format!(
            "describe lists {} roles (at most {MAX_ROLES})",
            i.roles.len()
        ));
    }
    let mut roles: Vec<host::Role> = Vec::new();
    for r in i.roles.into_iter().map(host::Role::from) {
        if !roles.contains(&r) {
            roles.push(r);
        }
    }
    Ok(host::PluginInfo {
        name: display_text(&i.name, MAX_NAME_BYTES),
        version: display_text(&i.version, MAX_VERSION_BYTES),
        api_version: display_text(&i.api_version, MAX_VERSION_BYTES),
        roles,
        description: display_text(&i.description, MAX_DESCRIPTION_BYTES),
    })
}

/// Warnings for the log: at most [`MAX_WARNINGS`], each cut and escaped.
fn warnings(w: Vec<String>) -> Vec<String> {
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

fn reported(e: wit::PluginError) -> CallFailure {
    let code = match e.code {
        wit::ErrorCode::InvalidInput => "invalid input",
        wit::ErrorCode::NotFound => "not found",
        wit::ErrorCode::Io => "I/O error",
        wit::ErrorCode::Unsupported => "unsupported",
        wit::ErrorCode::Internal => "internal error",
    };
    CallFailure::Reported {
        code: code.into(),
        message: display_text(&e.message, MAX_MESSAGE_BYTES),
    }
}

fn kv(meta: &[(String, String)]) -> Vec<wit::KeyValue> {
    meta.iter()
        .map(|(k, v)| wit::KeyValue {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

/// One live plugin instance: its store, its bindings, and whether it already failed. A
/// component instance that trapped or was abandoned at its time limit must not be entered
/// again, so its store is dropped (freeing its memory) and every later call says why.
struct Instance<B> {
    name: String,
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
    match runtime().block_on(run) {
        Ok(Ok(v)) => Ended::Returned(v),
        Ok(Err(e)) => Ended::Failed(e),
        Err(_) => Ended::TimedOut,
    }
}

impl<B> Instance<B> {
    fn fail(&self, call: &'static str, kind: CallFailure) -> PluginError {
        PluginError::Call {
            plugin: self.name.clone(),
            call,
            kind,
        }
    }

    fn call<T>(
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

/// Instantiates `path` (under the call time limit) and reads its self-description.
fn instantiate<B>(
    host: &PluginHost,
    path: &Path,
    loaded: Loaded,
    dataset_root: Option<&Path>,
    make: impl AsyncFnOnce(
        &mut Store<HostState>,
        &Loaded,
        &wasmtime::component::Linker<HostState>,
    ) -> wasmtime::Result<B>,
    describe: impl AsyncFnOnce(&B, &mut Store<HostState>) -> wasmtime::Result<wit::PluginInfo>,
) -> Result<(Instance<B>, host::PluginInfo), PluginError> {
    let linker = host.linker()?;
    let mut store = host.store(dataset_root, path)?;
    let load_err = |reason: String| PluginError::Load {
        path: path.display().to_string(),
        reason,
    };
    let limits = *host.limits();
    let bindings = match run_limited(&limits, &mut store, async |s| {
        make(s, &loaded, &linker).await
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
    let info = inst.call("describe", info_size, describe)?;
    let info =
        plugin_info(info).map_err(|why| inst.fail("describe", CallFailure::BadOutput(why)))?;
    if !super::SUPPORTED_API_VERSIONS.contains(&info.api_version.as_str()) {
        return Err(load_err(format!(
            "plugin {} says it was built for plugin API {}; this earshot supports {}",
            info.name,
            info.api_version,
            super::SUPPORTED_API_VERSIONS.join(", ")
        )));
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

pub(crate) fn describe(
    host: &PluginHost,
    path: &Path,
    loaded: Loaded,
) -> Result<host::PluginInfo, PluginError> {
    let (_, info) = instantiate(
        host,
        path,
        loaded,
        None,
        async |s, l, linker| base::PluginBase::instantiate_async(s, &l.component, linker).await,
        async |b: &base::PluginBase, s| b.earshot_plugin_plugin().call_describe(s).await,
    )?;
    Ok(info)
}

fn pieces_size(
    p: &Result<prompt::exports::earshot::plugin::prompt_template::PromptPieces, wit::PluginError>,
) -> usize {
    match p {
        Ok(p) => {
            p.before_audio.len()
                + p.after_audio.len()
                + p.stop_strings.iter().map(|s| s.len()).sum::<usize>()
        }
        Err(e) => e.message.len(),
    }
}

fn string_size(r: &Result<String, wit::PluginError>) -> usize {
    match r {
        Ok(s) => s.len(),
        Err(e) => e.message.len(),
    }
}

fn flatten<T>(
    r: Result<Result<T, wit::PluginError>, PluginError>,
    plugin: &str,
    call: &'static str,
) -> Result<T, PluginError> {
    r?.map_err(|e| PluginError::Call {
        plugin: plugin.to_string(),
        call,
        kind: reported(e),
    })
}

fn bad_output(plugin: &str, call: &'static str, why: String) -> PluginError {
    PluginError::Call {
        plugin: plugin.to_string(),
        call,
        kind: CallFailure::BadOutput(why),
    }
}

/// A prompt-template plugin instance.
pub struct PromptTemplate {
    inst: Instance<prompt::PromptTemplatePlugin>,
    pub info: host::PluginInfo,
}

impl PromptTemplate {
    pub fn load(host: &PluginHost, path: &Path, loaded: Loaded) -> Result<Self, PluginError> {
        let (inst, info) = instantiate(
            host,
            path,
            loaded,
            None,
            async |s, l, linker| {
                prompt::PromptTemplatePlugin::instantiate_async(s, &l.component, linker).await
            },
            async |b: &prompt::PromptTemplatePlugin, s| {
                b.earshot_plugin_plugin().call_describe(s).await
            },
        )?;
        require_role(path, &info, host::Role::PromptTemplate)?;
        Ok(Self { inst, info })
    }
}

impl super::roles::PromptTemplateApi for PromptTemplate {
    fn render(
        &mut self,
        metadata: &[(String, String)],
        options: &str,
    ) -> Result<host::PromptPieces, PluginError> {
        let meta = kv(metadata);
        let r = self.inst.call("render", pieces_size, async |b, s| {
            b.earshot_plugin_prompt_template()
                .call_render(s, &meta, options)
                .await
        });
        let p = flatten(r, &self.inst.name, "render")?;
        if p.stop_strings.len() > MAX_STOP_STRINGS
            || p.stop_strings
                .iter()
                .any(|s| s.len() > MAX_STOP_STRING_BYTES)
        {
            return Err(bad_output(
                &self.inst.name,
                "render",
                format!(
                    "{} stop strings (at most {MAX_STOP_STRINGS}, each at most \
                     {MAX_STOP_STRING_BYTES} bytes)",
                    p.stop_strings.len()
                ),
            ));
        }
        Ok(host::PromptPieces {
            before_audio: p.before_audio,
            after_audio: p.after_audio,
            stop_strings: p.stop_strings,
        })
    }

    fn format_target(
        &mut self,
        target: &str,
        metadata: &[(String, String)],
        options: &str,
    ) -> Result<String, PluginError> {
        let meta = kv(metadata);
        let r = self.inst.call("format-target", string_size, async |b, s| {
            b.earshot_plugin_prompt_template()
                .call_format_target(s, target, &meta, options)
                .await
        });
        flatten(r, &self.inst.name, "format-target")
    }
}

/// A caption post-processor plugin instance.
pub struct PostProcessor {
    inst: Instance<post::CaptionPostProcessorPlugin>,
    pub info: host::PluginInfo,
}

impl PostProcessor {
    pub fn load(host: &PluginHost, path: &Path, loaded: Loaded) -> Result<Self, PluginError> {
        let (inst, info) = instantiate(
            host,
            path,
            loaded,
            None,
            async |s, l, linker| {
                post::CaptionPostProcessorPlugin::instantiate_async(s, &l.component, linker).await
            },
            async |b: &post::CaptionPostProcessorPlugin, s| {
                b.earshot_plugin_plugin().call_describe(s).await
            },
        )?;
        require_role(path, &info, host::Role::CaptionPostProcessor)?;
        Ok(Self { inst, info })
    }
}

impl super::roles::PostProcessorApi for PostProcessor {
    fn process(
        &mut self,
        raw: &str,
        stop_strings: &[String],
        metadata: &[(String, String)],
    ) -> Result<String, PluginError> {
        let meta = kv(metadata);
        let r = self.inst.call("process", string_size, async |b, s| {
            b.earshot_plugin_caption_post_processor()
                .call_process(s, raw, stop_strings, &meta)
                .await
        });
        let caption = flatten(r, &self.inst.name, "process")?;
        if caption.len() > MAX_CAPTION_BYTES {
            return Err(bad_output(
                &self.inst.name,
                "process",
                format!(
                    "a caption of {} bytes (at most {} KiB)",
                    caption.len(),
                    MAX_CAPTION_BYTES >> 10
                ),
            ));
        }
        Ok(caption)
    }
}

type DsExample = dataset::exports::earshot::plugin::dataset_adapter::Example;
type DsAudio = dataset::exports::earshot::plugin::dataset_adapter::AudioSource;
type DsBatch = dataset::exports::earshot::plugin::dataset_adapter::Batch;
type DsInfo = dataset::exports::earshot::plugin::dataset_adapter::DatasetInfo;

/// An example, bounded: its id is printed and used as a key, so it is refused when too long
/// and escaped when it holds control characters; its text fields are data for the prompt,
/// the loss and the scores, so each is refused past its bound. A refused example comes back
/// as its own error (id cut for printing, and why), never failing the rest of its page.
fn example(e: DsExample) -> Result<host::Example, (String, String)> {
    if let Some(why) = example_bound_broken(&e) {
        return Err((display_text(&e.id, MAX_SHOWN_ID_BYTES), why));
    }
    Ok(host::Example {
        id: display_text(&e.id, MAX_ID_BYTES * 6),
        audio: match e.audio {
            DsAudio::Path(p) => host::AudioSource::Path(p),
            DsAudio::Inline(b) => host::AudioSource::Inline(b),
        },
        start_s: e.start_s,
        end_s: e.end_s,
        target: e.target,
        references: e.references,
        metadata: e
            .metadata
            .into_iter()
            .map(|kv| (kv.key, kv.value))
            .collect(),
    })
}

/// The first per-example bound `e` breaks, said for the error line.
fn example_bound_broken(e: &DsExample) -> Option<String> {
    let too_long = |what: &str, len: usize, max: usize| {
        (len > max).then(|| format!("{what} of {len} bytes (at most {max})"))
    };
    if let Some(why) = too_long("an id", e.id.len(), MAX_ID_BYTES) {
        return Some(why);
    }
    if e.metadata.len() > MAX_METADATA {
        return Some(format!(
            "{} metadata entries (at most {MAX_METADATA})",
            e.metadata.len()
        ));
    }
    if e.references.len() > MAX_REFERENCES {
        return Some(format!(
            "{} references (at most {MAX_REFERENCES})",
            e.references.len()
        ));
    }
    if let Some(why) = e
        .target
        .as_ref()
        .and_then(|t| too_long("a target", t.len(), MAX_TEXT_BYTES))
    {
        return Some(why);
    }
    for (i, r) in e.references.iter().enumerate() {
        if let Some(why) = too_long(&format!("reference {i}"), r.len(), MAX_TEXT_BYTES) {
            return Some(why);
        }
    }
    for kv in &e.metadata {
        let key = display_text(&kv.key, 64);
        if let Some(why) =
            too_long("a metadata key", kv.key.len(), MAX_METADATA_KEY_BYTES).or_else(|| {
                too_long(
                    &format!("metadata {key}'s value"),
                    kv.value.len(),
                    MAX_TEXT_BYTES,
                )
            })
        {
            return Some(why);
        }
    }
    None
}

fn example_size(e: &DsExample) -> usize {
    e.id.len()
        + match &e.audio {
            DsAudio::Path(p) => p.len(),
            DsAudio::Inline(b) => b.len(),
        }
        + e.target.as_ref().map_or(0, |t| t.len())
        + e.references.iter().map(|r| r.len()).sum::<usize>()
        + e.metadata
            .iter()
            .map(|kv| kv.key.len() + kv.value.len())
            .sum::<usize>()
}

fn batch_size(r: &Result<DsBatch, wit::PluginError>) -> usize {
    match r {
        Ok(b) => {
            b.examples.iter().map(example_size).sum::<usize>()
                + b.warnings.iter().map(|w| w.len()).sum::<usize>()
        }
        Err(e) => e.message.len(),
    }
}

fn dataset_info_size(r: &Result<DsInfo, wit::PluginError>) -> usize {
    match r {
        Ok(i) => i.splits.iter().chain(&i.warnings).map(|s| s.len()).sum(),
        Err(e) => e.message.len(),
    }
}

/// A dataset-adapter plugin instance, opened on a dataset root (mounted read-only at /data).
pub struct DatasetAdapter {
    inst: Instance<dataset::DatasetAdapterPlugin>,
    pub info: host::PluginInfo,
    pub dataset: host::DatasetInfo,
}

impl DatasetAdapter {
    pub fn open(
        host: &PluginHost,
        path: &Path,
        loaded: Loaded,
        root: &Path,
        options: &str,
    ) -> Result<Self, PluginError> {
        if !root.is_dir() {
            return Err(PluginError::Load {
                path: root.display().to_string(),
                reason: "the dataset root is not a folder".into(),
            });
        }
        let (mut inst, info) = instantiate(
            host,
            path,
            loaded,
            Some(root),
            async |s, l, linker| {
                dataset::DatasetAdapterPlugin::instantiate_async(s, &l.component, linker).await
            },
            async |b: &dataset::DatasetAdapterPlugin, s| {
                b.earshot_plugin_plugin().call_describe(s).await
            },
        )?;
        require_role(path, &info, host::Role::DatasetAdapter)?;
        let r = inst.call("open", dataset_info_size, async |b, s| {
            b.earshot_plugin_dataset_adapter()
                .call_open(s, options)
                .await
        });
        let name = inst.name.clone();
        let d = flatten(r, &name, "open")?;
        if d.splits.len() > MAX_SPLITS || d.splits.iter().any(|s| s.len() > MAX_SPLIT_NAME_BYTES) {
            return Err(bad_output(
                &name,
                "open",
                format!(
                    "{} splits (at most {MAX_SPLITS}, names at most {MAX_SPLIT_NAME_BYTES} bytes)",
                    d.splits.len()
                ),
            ));
        }
        Ok(Self {
            inst,
            info,
            dataset: host::DatasetInfo {
                splits: d
                    .splits
                    .iter()
                    .map(|s| display_text(s, MAX_SPLIT_NAME_BYTES))
                    .collect(),
                warnings: warnings(d.warnings),
            },
        })
    }
}

impl super::roles::DatasetAdapterApi for DatasetAdapter {
    fn name(&self) -> &str {
        &self.inst.name
    }

    /// Up to `max` examples of `split` from position `start`. A `next` that does not move
    /// past `start` is refused (it would page forever), with or without examples.
    fn read(&mut self, split: &str, start: u64, max: u32) -> Result<host::Batch, PluginError> {
        let r = self.inst.call("read", batch_size, async |b, s| {
            b.earshot_plugin_dataset_adapter()
                .call_read(s, split, start, max)
                .await
        });
        let name = self.inst.name.clone();
        let b = flatten(r, &name, "read")?;
        if b.examples.len() > max as usize {
            return Err(bad_output(
                &name,
                "read",
                format!("{} examples for a batch of at most {max}", b.examples.len()),
            ));
        }
        if let Some(next) = b.next.filter(|&n| n <= start) {
            return Err(bad_output(
                &name,
                "read",
                format!(
                    "split {}: the page read at position {start} says the next one starts at \
                     {next}, which does not advance",
                    display_text(split, MAX_SPLIT_NAME_BYTES)
                ),
            ));
        }
        let examples = b
            .examples
            .into_iter()
            .map(|e| {
                example(e).map_err(|(id, reason)| host::BadExample {
                    plugin: name.clone(),
                    id,
                    reason,
                })
            })
            .collect();
        Ok(host::Batch {
            examples,
            warnings: warnings(b.warnings),
            next: b.next,
        })
    }
}
