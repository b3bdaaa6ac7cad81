//! The three plugin roles as the rest of the host sees them, whatever WIT version a plugin
//! was built against: [`PromptTemplate`], [`DatasetAdapter`] and [`PostProcessor`] hold a
//! version module's instance behind a trait. A future `since_v0.2.0` adds its module, an
//! implementation of these traits, and one arm in each `load`; no caller changes (as in Zed's
//! extension host).

use std::path::Path;

use super::types::{Batch, DatasetInfo, PluginError, PluginInfo, PromptPieces};
use super::{v0_1_0, Loaded, PluginHost};

/// What the host asks of a prompt template.
pub(crate) trait PromptTemplateApi: Send {
    fn render(
        &mut self,
        metadata: &[(String, String)],
        options: &str,
    ) -> Result<PromptPieces, PluginError>;
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
    fn read(&mut self, split: &str, start: u64, max: u32) -> Result<Batch, PluginError>;
}

/// The loaded component's API version, for the error of a version this build knows of but
/// has no module for (cannot happen while [`super::SUPPORTED_API_VERSIONS`] and the arms
/// below agree; kept an error, not a panic).
fn unsupported(path: &Path, loaded: &Loaded) -> PluginError {
    PluginError::Load {
        path: path.display().to_string(),
        reason: format!("plugin API {} has no host module", loaded.api_version),
    }
}

/// A plugin's self-description, instantiated for nothing else (`earshot plugin check`).
pub(crate) fn describe(host: &PluginHost, path: &Path) -> Result<PluginInfo, PluginError> {
    let loaded = host.load(path)?;
    match loaded.api_version {
        "0.1.0" => v0_1_0::describe(host, path, loaded),
        _ => Err(unsupported(path, &loaded)),
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
        let (api, info): (Box<dyn PromptTemplateApi>, _) = match loaded.api_version {
            "0.1.0" => {
                let t = v0_1_0::PromptTemplate::load(host, path, loaded)?;
                let info = t.info.clone();
                (Box::new(t), info)
            }
            _ => return Err(unsupported(path, &loaded)),
        };
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
        let (api, info): (Box<dyn PostProcessorApi>, _) = match loaded.api_version {
            "0.1.0" => {
                let p = v0_1_0::PostProcessor::load(host, path, loaded)?;
                let info = p.info.clone();
                (Box::new(p), info)
            }
            _ => return Err(unsupported(path, &loaded)),
        };
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
        let (api, info, dataset): (Box<dyn DatasetAdapterApi>, _, _) = match loaded.api_version {
            "0.1.0" => {
                let d = v0_1_0::DatasetAdapter::open(host, path, loaded, root, options)?;
                let (info, dataset) = (d.info.clone(), d.dataset.clone());
                (Box::new(d), info, dataset)
            }
            _ => return Err(unsupported(path, &loaded)),
        };
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
