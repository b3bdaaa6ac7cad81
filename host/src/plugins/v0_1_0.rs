//! Plugin API 0.1.0 (`wit/since_v0.1.0`): bindings for each role's world, conversions of the
//! generated types into host types, and the role handles the rest of the host uses.

use std::path::Path;

use wasmtime::Store;

use super::sandbox::HostState;
use super::types::{self as host, CallFailure, PluginError};
use super::{Loaded, PluginHost};

mod base {
    wasmtime::component::bindgen!({ world: "plugin-base", path: "../wit/since_v0.1.0" });
}
mod prompt {
    wasmtime::component::bindgen!({
        world: "prompt-template-plugin",
        path: "../wit/since_v0.1.0",
        with: { "earshot:plugin/types": crate::plugins::v0_1_0::base::earshot::plugin::types },
    });
}
mod dataset {
    wasmtime::component::bindgen!({
        world: "dataset-adapter-plugin",
        path: "../wit/since_v0.1.0",
        with: { "earshot:plugin/types": crate::plugins::v0_1_0::base::earshot::plugin::types },
    });
}
mod post {
    wasmtime::component::bindgen!({
        world: "caption-post-processor-plugin",
        path: "../wit/since_v0.1.0",
        with: { "earshot:plugin/types": crate::plugins::v0_1_0::base::earshot::plugin::types },
    });
}

use base::earshot::plugin::types as wit;

impl From<wit::Role> for host::Role {
    fn from(r: wit::Role) -> Self {
        match r {
            wit::Role::PromptTemplate => host::Role::PromptTemplate,
            wit::Role::DatasetAdapter => host::Role::DatasetAdapter,
            wit::Role::CaptionPostProcessor => host::Role::CaptionPostProcessor,
        }
    }
}

impl From<wit::PluginInfo> for host::PluginInfo {
    fn from(i: wit::PluginInfo) -> Self {
        Self {
            name: i.name,
            version: i.version,
            api_version: i.api_version,
            roles: i.roles.into_iter().map(Into::into).collect(),
            description: i.description,
        }
    }
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
        message: e.message,
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

/// One live plugin instance: its store, its bindings, and whether it already crashed (a
/// component instance that trapped must not be entered again).
struct Instance<B> {
    name: String,
    store: Store<HostState>,
    bindings: B,
    host: PluginHost,
    dead: Option<String>,
}

impl<B> Instance<B> {
    fn call<T>(
        &mut self,
        call: &'static str,
        output_size: impl Fn(&T) -> usize,
        f: impl FnOnce(&B, &mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, PluginError> {
        let fail = |kind| PluginError::Call {
            plugin: self.name.clone(),
            call,
            kind,
        };
        if let Some(why) = &self.dead {
            return Err(fail(CallFailure::Trap(format!(
                "the plugin crashed earlier ({why}); load it again"
            ))));
        }
        self.store
            .set_epoch_deadline(self.host.limits().deadline_ticks());
        self.store.data_mut().limiter.hit = false;
        let result = f(&self.bindings, &mut self.store);
        let logs = self.store.data().stderr.contents();
        if !logs.is_empty() {
            tracing::debug!(
                "plugin {} stderr: {}",
                self.name,
                String::from_utf8_lossy(&logs)
            );
        }
        match result {
            Ok(value) => {
                let size = output_size(&value);
                if size > self.host.limits().output_bytes() {
                    return Err(fail(CallFailure::BadOutput(format!(
                        "{size} bytes, more than the cap of {} MiB",
                        self.host.limits().max_output_mib
                    ))));
                }
                Ok(value)
            }
            Err(e) => {
                let kind = self.classify(&e);
                self.dead = Some(kind.to_string());
                Err(fail(kind))
            }
        }
    }

    fn classify(&self, e: &wasmtime::Error) -> CallFailure {
        if self.store.data().limiter.hit {
            return CallFailure::OutOfMemory(self.host.limits().memory_bytes());
        }
        match e.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => CallFailure::Timeout(self.host.limits().timeout()),
            Some(wasmtime::Trap::StackOverflow) => CallFailure::StackOverflow,
            Some(wasmtime::Trap::UnreachableCodeReached) => {
                CallFailure::Trap("the plugin panicked or reached `unreachable`".into())
            }
            Some(t) => CallFailure::Trap(t.to_string()),
            None => CallFailure::Trap(format!("{e:#}")),
        }
    }
}

fn instantiate<B>(
    host: &PluginHost,
    path: &Path,
    dataset_root: Option<&Path>,
    make: impl FnOnce(
        &mut Store<HostState>,
        &Loaded,
        &wasmtime::component::Linker<HostState>,
    ) -> wasmtime::Result<B>,
    describe: impl FnOnce(&B, &mut Store<HostState>) -> wasmtime::Result<wit::PluginInfo>,
    role: host::Role,
) -> Result<(Instance<B>, host::PluginInfo), PluginError> {
    let loaded = host.load(path)?;
    let linker = host.linker()?;
    let mut store = host.store(dataset_root, path)?;
    let load_err = |reason: String| PluginError::Load {
        path: path.display().to_string(),
        reason,
    };
    store.set_epoch_deadline(host.limits().deadline_ticks());
    let bindings = make(&mut store, &loaded, &linker).map_err(|e| {
        load_err(format!(
            "cannot be instantiated as a {role} plugin (does it export that role? needs only \
             WASI imports?): {e:#}"
        ))
    })?;
    let mut inst = Instance {
        name: path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string(),
        store,
        bindings,
        host: host.clone(),
        dead: None,
    };
    let info: host::PluginInfo = inst
        .call(
            "describe",
            |i: &wit::PluginInfo| i.name.len() + i.description.len(),
            describe,
        )?
        .into();
    if !super::SUPPORTED_API_VERSIONS.contains(&info.api_version.as_str()) {
        return Err(load_err(format!(
            "plugin {} says it was built for plugin API {}; this earshot supports {}",
            info.name,
            info.api_version,
            super::SUPPORTED_API_VERSIONS.join(", ")
        )));
    }
    if !info.roles.contains(&role) {
        return Err(load_err(format!(
            "plugin {} does not implement the {role} role (it implements: {})",
            info.name,
            info.roles
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    inst.name = format!("{} ({})", info.name, inst.name);
    Ok((inst, info))
}

pub(crate) fn describe(host: &PluginHost, path: &Path) -> Result<host::PluginInfo, PluginError> {
    let loaded = host.load(path)?;
    let linker = host.linker()?;
    let store = host.store(None, path)?;
    let mut inst = Instance {
        name: path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string(),
        store,
        bindings: (),
        host: host.clone(),
        dead: None,
    };
    inst.store
        .set_epoch_deadline(host.limits().deadline_ticks());
    let bindings = base::PluginBase::instantiate(&mut inst.store, &loaded.component, &linker)
        .map_err(|e| PluginError::Load {
            path: path.display().to_string(),
            reason: format!("cannot be instantiated (needs only WASI imports?): {e:#}"),
        })?;
    let info: host::PluginInfo = inst
        .call(
            "describe",
            |i: &wit::PluginInfo| i.name.len() + i.description.len(),
            |_, s| bindings.earshot_plugin_plugin().call_describe(s),
        )?
        .into();
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

/// A prompt-template plugin instance.
pub struct PromptTemplate {
    inst: Instance<prompt::PromptTemplatePlugin>,
    pub info: host::PluginInfo,
}

impl PromptTemplate {
    pub fn load(host: &PluginHost, path: &Path) -> Result<Self, PluginError> {
        let (inst, info) = instantiate(
            host,
            path,
            None,
            |s, l, linker| prompt::PromptTemplatePlugin::instantiate(s, &l.component, linker),
            |b, s| b.earshot_plugin_plugin().call_describe(s),
            host::Role::PromptTemplate,
        )?;
        Ok(Self { inst, info })
    }

    pub fn render(
        &mut self,
        metadata: &[(String, String)],
        options: &str,
    ) -> Result<host::PromptPieces, PluginError> {
        let meta = kv(metadata);
        let r = self.inst.call("render", pieces_size, |b, s| {
            b.earshot_plugin_prompt_template()
                .call_render(s, &meta, options)
        });
        let p = flatten(r, &self.inst.name, "render")?;
        Ok(host::PromptPieces {
            before_audio: p.before_audio,
            after_audio: p.after_audio,
            stop_strings: p.stop_strings,
        })
    }

    pub fn format_target(
        &mut self,
        target: &str,
        metadata: &[(String, String)],
        options: &str,
    ) -> Result<String, PluginError> {
        let meta = kv(metadata);
        let r = self.inst.call("format-target", string_size, |b, s| {
            b.earshot_plugin_prompt_template()
                .call_format_target(s, target, &meta, options)
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
    pub fn load(host: &PluginHost, path: &Path) -> Result<Self, PluginError> {
        let (inst, info) = instantiate(
            host,
            path,
            None,
            |s, l, linker| post::CaptionPostProcessorPlugin::instantiate(s, &l.component, linker),
            |b, s| b.earshot_plugin_plugin().call_describe(s),
            host::Role::CaptionPostProcessor,
        )?;
        Ok(Self { inst, info })
    }

    pub fn process(
        &mut self,
        raw: &str,
        stop_strings: &[String],
        metadata: &[(String, String)],
    ) -> Result<String, PluginError> {
        let meta = kv(metadata);
        let r = self.inst.call("process", string_size, |b, s| {
            b.earshot_plugin_caption_post_processor()
                .call_process(s, raw, stop_strings, &meta)
        });
        flatten(r, &self.inst.name, "process")
    }
}

type DsExample = dataset::exports::earshot::plugin::dataset_adapter::Example;
type DsAudio = dataset::exports::earshot::plugin::dataset_adapter::AudioSource;

impl From<DsExample> for host::Example {
    fn from(e: DsExample) -> Self {
        Self {
            id: e.id,
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
        }
    }
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
            Some(root),
            |s, l, linker| dataset::DatasetAdapterPlugin::instantiate(s, &l.component, linker),
            |b, s| b.earshot_plugin_plugin().call_describe(s),
            host::Role::DatasetAdapter,
        )?;
        let r = inst.call(
            "open",
            |r: &Result<
                dataset::exports::earshot::plugin::dataset_adapter::DatasetInfo,
                wit::PluginError,
            >| match r {
                Ok(i) => i.splits.iter().chain(&i.warnings).map(|s| s.len()).sum(),
                Err(e) => e.message.len(),
            },
            |b, s| b.earshot_plugin_dataset_adapter().call_open(s, options),
        );
        let name = inst.name.clone();
        let d = flatten(r, &name, "open")?;
        Ok(Self {
            inst,
            info,
            dataset: host::DatasetInfo {
                splits: d.splits,
                warnings: d.warnings,
            },
        })
    }

    /// Up to `max` examples of `split` from position `start`.
    pub fn read(&mut self, split: &str, start: u64, max: u32) -> Result<host::Batch, PluginError> {
        let r = self.inst.call(
            "read",
            |r: &Result<
                dataset::exports::earshot::plugin::dataset_adapter::Batch,
                wit::PluginError,
            >| match r {
                Ok(b) => {
                    b.examples.iter().map(example_size).sum::<usize>()
                        + b.warnings.iter().map(|w| w.len()).sum::<usize>()
                }
                Err(e) => e.message.len(),
            },
            |b, s| {
                b.earshot_plugin_dataset_adapter()
                    .call_read(s, split, start, max)
            },
        );
        let name = self.inst.name.clone();
        let b = flatten(r, &name, "read")?;
        if b.examples.len() > max as usize {
            return Err(PluginError::Call {
                plugin: name,
                call: "read",
                kind: CallFailure::BadOutput(format!(
                    "{} examples for a batch of at most {max}",
                    b.examples.len()
                )),
            });
        }
        if b.next.is_some_and(|n| n <= start) && !b.examples.is_empty() {
            return Err(PluginError::Call {
                plugin: name,
                call: "read",
                kind: CallFailure::BadOutput("the next position does not advance".into()),
            });
        }
        Ok(host::Batch {
            examples: b.examples.into_iter().map(Into::into).collect(),
            warnings: b.warnings,
            next: b.next,
        })
    }
}
