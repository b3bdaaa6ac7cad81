//! The three plugin roles as the rest of the host sees them, whatever WIT version a plugin
//! was built against: [`PromptTemplate`], [`DatasetAdapter`] and [`PostProcessor`] hold a
//! version module's instance behind the runtime's role traits. A future `since_v0.2.0` adds
//! its module (bindings, conversions, an `ApiVersion`) and one arm in [`api`]; no caller
//! changes (as in Zed's extension host).

use std::path::Path;

use super::host::{Loaded, PluginHost};
use super::runtime::{ApiVersion, DatasetAdapterApi, PostProcessorApi, PromptTemplateApi};
use super::types::{Batch, DatasetInfo, PluginError, PluginInfo, PromptPieces};
use super::v0_1_0;

/// The module of the loaded component's API version: the one place a new WIT version adds
/// an arm. (A version in [`super::SUPPORTED_API_VERSIONS`] without an arm here cannot load:
/// kept an error, not a panic.)
fn api(path: &Path, loaded: &Loaded) -> Result<&'static dyn ApiVersion, PluginError> {
    match loaded.api_version {
        "0.1.0" => Ok(&v0_1_0::Api),
        other => Err(PluginError::Load {
            path: path.display().to_string(),
            reason: format!("plugin API {other} has no host module"),
        }),
    }
}

impl PluginHost {
    /// Instantiates `path` only to read its self-description (`earshot plugin check`).
    pub fn describe(&self, path: &Path) -> Result<PluginInfo, PluginError> {
        let loaded = self.load(path)?;
        api(path, &loaded)?.describe(self, path, loaded)
    }
}

/// A prompt-template plugin instance.
pub struct PromptTemplate {
    pub info: PluginInfo,
    api: Box<dyn PromptTemplateApi>,
}

impl PromptTemplate {
    pub fn load(host: &PluginHost, path: &Path) -> Result<Self, PluginError> {
        let loaded = host.load(path)?;
        let (api, info) = api(path, &loaded)?.prompt_template(host, path, loaded)?;
        Ok(Self { info, api })
    }

    /// The prompt pieces for an example's metadata.
    pub fn render(
        &mut self,
        metadata: &[(String, String)],
        options: &str,
    ) -> Result<PromptPieces, PluginError> {
        let _span = tracing::debug_span!("plugin call", call = "render").entered();
        self.api.render(metadata, options)
    }

    /// The training target as the LLM should produce it.
    pub fn format_target(
        &mut self,
        target: &str,
        metadata: &[(String, String)],
        options: &str,
    ) -> Result<String, PluginError> {
        let _span = tracing::debug_span!("plugin call", call = "format-target").entered();
        self.api.format_target(target, metadata, options)
    }
}

/// A caption post-processor plugin instance.
pub struct PostProcessor {
    pub info: PluginInfo,
    api: Box<dyn PostProcessorApi>,
}

impl PostProcessor {
    pub fn load(host: &PluginHost, path: &Path) -> Result<Self, PluginError> {
        let loaded = host.load(path)?;
        let (api, info) = api(path, &loaded)?.post_processor(host, path, loaded)?;
        Ok(Self { info, api })
    }

    /// The caption the user sees, from the decoded text.
    pub fn process(
        &mut self,
        raw: &str,
        stop_strings: &[String],
        metadata: &[(String, String)],
    ) -> Result<String, PluginError> {
        let _span = tracing::debug_span!("plugin call", call = "process").entered();
        self.api.process(raw, stop_strings, metadata)
    }
}

/// A dataset-adapter plugin instance, opened on a dataset root (mounted read-only at /data).
pub struct DatasetAdapter {
    pub info: PluginInfo,
    pub dataset: DatasetInfo,
    /// The sandbox's bound on the examples one split may yield.
    max_examples: u64,
    api: Box<dyn DatasetAdapterApi>,
}

impl DatasetAdapter {
    pub fn open(
        host: &PluginHost,
        path: &Path,
        root: &Path,
        options: &str,
    ) -> Result<Self, PluginError> {
        let loaded = host.load(path)?;
        let _span = tracing::debug_span!("plugin call", call = "open").entered();
        let (api, info, dataset) =
            api(path, &loaded)?.dataset_adapter(host, path, loaded, root, options)?;
        Ok(Self {
            info,
            dataset,
            max_examples: host.limits().max_examples,
            api,
        })
    }

    /// The plugin's name as errors show it.
    pub fn name(&self) -> &str {
        self.api.name()
    }

    pub(crate) fn max_examples(&self) -> u64 {
        self.max_examples
    }

    /// Up to `max` examples of `split` from position `start`. A `next` that does not move
    /// past `start` is refused (it would page forever), with or without examples.
    pub fn read(&mut self, split: &str, start: u64, max: u32) -> Result<Batch, PluginError> {
        let _span = tracing::debug_span!("plugin call", call = "read", start).entered();
        self.api.read(split, start, max)
    }
}
