//! Plugin API 0.1.0 (`wit/since_v0.1.0`): the bindings of each role's world and the
//! conversions of the generated types into the host's types; everything else (instances,
//! limits, loading, role checks) is the version-neutral `runtime`.

use std::path::Path;

use wasmtime::component::{Component, Linker};
use wasmtime::Store;

use super::host::{Loaded, PluginHost};
use super::runtime::{
    bad_output, instantiate, warnings, ApiVersion, Bindings, DatasetAdapterApi, Instance,
    Instantiated, OpenedDataset, PostProcessorApi, PromptTemplateApi, MAX_CAPTION_BYTES,
    MAX_DESCRIPTION_BYTES, MAX_ID_BYTES, MAX_MESSAGE_BYTES, MAX_METADATA, MAX_METADATA_KEY_BYTES,
    MAX_NAME_BYTES, MAX_REFERENCES, MAX_ROLES, MAX_SHOWN_ID_BYTES, MAX_SPLITS,
    MAX_SPLIT_NAME_BYTES, MAX_STOP_STRINGS, MAX_STOP_STRING_BYTES, MAX_TEXT_BYTES,
    MAX_VERSION_BYTES,
};
use super::sandbox::HostState;
use super::types::{self as host, CallFailure, PluginError};
use crate::text::display_text;

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

/// `Bindings` for each world of this version: they differ only in the generated type.
macro_rules! bindings {
    ($($world:ty),*) => {$(
        impl Bindings for $world {
            type Info = wit::PluginInfo;
            async fn instantiate(
                store: &mut Store<HostState>,
                component: &Component,
                linker: &Linker<HostState>,
            ) -> wasmtime::Result<Self> {
                Self::instantiate_async(store, component, linker).await
            }
            async fn describe(&self, store: &mut Store<HostState>) -> wasmtime::Result<Self::Info> {
                self.earshot_plugin_plugin().call_describe(store).await
            }
            fn info_size(i: &Self::Info) -> usize {
                i.name.len() + i.version.len() + i.api_version.len() + i.description.len()
                    + i.roles.len()
            }
            fn info(i: Self::Info) -> Result<host::PluginInfo, String> {
                plugin_info(i)
            }
        }
    )*};
}
bindings!(
    base::PluginBase,
    prompt::PromptTemplatePlugin,
    dataset::DatasetAdapterPlugin,
    post::CaptionPostProcessorPlugin
);

/// This version as the role handles see it.
pub(crate) struct Api;

impl ApiVersion for Api {
    fn describe(
        &self,
        host: &PluginHost,
        path: &Path,
        loaded: Loaded,
    ) -> Result<host::PluginInfo, PluginError> {
        let (_, info) = instantiate::<base::PluginBase>(host, path, loaded, None, None)?;
        Ok(info)
    }

    fn prompt_template(
        &self,
        host: &PluginHost,
        path: &Path,
        loaded: Loaded,
    ) -> Instantiated<dyn PromptTemplateApi> {
        let role = Some(host::Role::PromptTemplate);
        let (inst, info) = instantiate(host, path, loaded, None, role)?;
        Ok((Box::new(PromptTemplate { inst }), info))
    }

    fn post_processor(
        &self,
        host: &PluginHost,
        path: &Path,
        loaded: Loaded,
    ) -> Instantiated<dyn PostProcessorApi> {
        let role = Some(host::Role::CaptionPostProcessor);
        let (inst, info) = instantiate(host, path, loaded, None, role)?;
        Ok((Box::new(PostProcessor { inst }), info))
    }

    fn dataset_adapter(
        &self,
        host: &PluginHost,
        path: &Path,
        loaded: Loaded,
        root: &Path,
        options: &str,
    ) -> OpenedDataset {
        let d = DatasetAdapter::open(host, path, loaded, root, options)?;
        let (info, dataset) = (d.info.clone(), d.dataset.clone());
        Ok((Box::new(d), info, dataset))
    }
}

impl From<wit::Role> for host::Role {
    fn from(r: wit::Role) -> Self {
        match r {
            wit::Role::PromptTemplate => host::Role::PromptTemplate,
            wit::Role::DatasetAdapter => host::Role::DatasetAdapter,
            wit::Role::CaptionPostProcessor => host::Role::CaptionPostProcessor,
        }
    }
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
struct PromptTemplate {
    inst: Instance<prompt::PromptTemplatePlugin>,
}

impl PromptTemplateApi for PromptTemplate {
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
struct PostProcessor {
    inst: Instance<post::CaptionPostProcessorPlugin>,
}

impl PostProcessorApi for PostProcessor {
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
struct DatasetAdapter {
    inst: Instance<dataset::DatasetAdapterPlugin>,
    info: host::PluginInfo,
    dataset: host::DatasetInfo,
}

impl DatasetAdapter {
    fn open(
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
        let role = Some(host::Role::DatasetAdapter);
        let (mut inst, info) =
            instantiate::<dataset::DatasetAdapterPlugin>(host, path, loaded, Some(root), role)?;
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

impl DatasetAdapterApi for DatasetAdapter {
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
