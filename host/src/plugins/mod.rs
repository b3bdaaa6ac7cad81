//! WebAssembly plugins: the host (`host`: engine, loading, precompiled-component cache), the
//! sandbox of each instance (`sandbox`), the version-neutral runtime every WIT version's
//! module builds on (`runtime`: instances, time limits, failure classification, role checks,
//! the role interfaces), one module per WIT version holding only its bindings and their
//! conversions into the host types of [`types`] (`v0_1_0`), and the role handles callers use
//! (`roles`: [`PromptTemplate`], [`DatasetAdapter`], [`PostProcessor`]). A new WIT version
//! adds one module and one match arm in `roles::api`; no caller changes.

// Layers, lowest first: types, sandbox -> host -> runtime -> v0_1_0 -> roles -> paging.
mod host;
mod paging;
mod roles;
mod runtime;
mod sandbox;
pub mod types;
mod v0_1_0;

pub use host::{PluginHost, MAX_COMPONENT_BYTES, SUPPORTED_API_VERSIONS};
pub use paging::{SplitPages, PAGE_SIZE};
pub use roles::{DatasetAdapter, PostProcessor, PromptTemplate};
pub use sandbox::{SandboxLimits, DATA_MOUNT};
pub use types::{
    AudioSource, BadExample, Batch, CallFailure, DatasetInfo, Example, PageExample, PluginError,
    PluginInfo, PromptPieces, Role,
};
