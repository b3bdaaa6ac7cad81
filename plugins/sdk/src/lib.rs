//! The earshot plugin SDK. Implement [`Plugin`] (only the methods of your roles; the others
//! answer `unsupported`) and call [`export_plugin!`] once:
//!
//! ```ignore
//! use earshot_plugin_sdk::*;
//! struct Upper;
//! impl Plugin for Upper {
//!     fn info() -> PluginInfo {
//!         info("upper", env!("CARGO_PKG_VERSION"), &[Role::CaptionPostProcessor], "Upper-cases captions")
//!     }
//!     fn process(raw: String, _stops: Vec<String>, _meta: Vec<KeyValue>) -> Result<String, PluginError> {
//!         Ok(raw.to_uppercase())
//!     }
//! }
//! export_plugin!(Upper);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`. At run time the plugin has no
//! network, no environment and no stdio (stderr is captured for the host's debug log);
//! a dataset adapter sees its dataset root, read-only, at [`DATA_ROOT`].

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "all-roles",
        path: "../../wit/since_v0.1.0",
        pub_export_macro: true,
        export_macro_name: "__export_all_roles",
        default_bindings_module: "earshot_plugin_sdk::bindings",
    });
}

pub use bindings::earshot::plugin::types::{ErrorCode, KeyValue, PluginError, PluginInfo, Role};
pub use bindings::exports::earshot::plugin::dataset_adapter::{
    AudioSource, Batch, DatasetInfo, Example,
};
pub use bindings::exports::earshot::plugin::prompt_template::PromptPieces;

/// The plugin API this SDK builds against.
pub const API_VERSION: &str = "0.1.0";
/// Where a dataset adapter finds its dataset (read-only).
pub const DATA_ROOT: &str = "/data";

/// One trait for every role; implement the methods of the roles listed in [`Plugin::info`].
pub trait Plugin {
    fn info() -> PluginInfo;

    /// prompt-template: the text around the audio.
    fn render(_metadata: Vec<KeyValue>, _options: String) -> Result<PromptPieces, PluginError> {
        Err(unsupported("prompt-template"))
    }
    /// prompt-template: how a training target is written.
    fn format_target(
        _target: String,
        _metadata: Vec<KeyValue>,
        _options: String,
    ) -> Result<String, PluginError> {
        Err(unsupported("prompt-template"))
    }
    /// dataset-adapter: open the dataset at [`DATA_ROOT`].
    fn open(_options: String) -> Result<DatasetInfo, PluginError> {
        Err(unsupported("dataset-adapter"))
    }
    /// dataset-adapter: up to `max` examples of `split` from position `start`.
    fn read(_split: String, _start: u64, _max: u32) -> Result<Batch, PluginError> {
        Err(unsupported("dataset-adapter"))
    }
    /// caption-post-processor: raw generated text -> final caption.
    fn process(
        _raw: String,
        _stop_strings: Vec<String>,
        _metadata: Vec<KeyValue>,
    ) -> Result<String, PluginError> {
        Err(unsupported("caption-post-processor"))
    }
}

/// A [`PluginInfo`] for this SDK's API version.
pub fn info(name: &str, version: &str, roles: &[Role], description: &str) -> PluginInfo {
    PluginInfo {
        name: name.into(),
        version: version.into(),
        api_version: API_VERSION.into(),
        roles: roles.to_vec(),
        description: description.into(),
    }
}

pub fn error(code: ErrorCode, message: impl Into<String>) -> PluginError {
    PluginError {
        code,
        message: message.into(),
    }
}

fn unsupported(role: &str) -> PluginError {
    error(
        ErrorCode::Unsupported,
        format!("this plugin does not implement the {role} role"),
    )
}

/// The value of `key` in example metadata.
pub fn meta<'a>(metadata: &'a [KeyValue], key: &str) -> Option<&'a str> {
    metadata
        .iter()
        .find(|kv| kv.key == key)
        .map(|kv| kv.value.as_str())
}

/// Parses a JSON options string (empty means `{}`) into `T`, as an invalid-input error.
pub fn parse_options<T: serde::de::DeserializeOwned + Default>(
    options: &str,
) -> Result<T, PluginError> {
    if options.trim().is_empty() {
        return Ok(T::default());
    }
    serde_json::from_str(options)
        .map_err(|e| error(ErrorCode::InvalidInput, format!("options: {e}")))
}

/// The batch of `examples` starting at position `start`, at most `max` long, with the
/// position of the next batch (none at the end): the usual body of `Plugin::read` for an
/// adapter that holds its split in memory.
pub fn page(examples: &[Example], start: u64, max: u32) -> Batch {
    let from = (start as usize).min(examples.len());
    let to = from.saturating_add(max as usize).min(examples.len());
    Batch {
        examples: examples[from..to].to_vec(),
        warnings: Vec::new(),
        next: (to < examples.len()).then_some(to as u64),
    }
}

/// The body of `Plugin::read` for an adapter that holds its splits in memory after `open`
/// (`None` before it): the batch of `split` at `start`, or an error naming the splits there
/// are.
pub fn page_of(
    splits: Option<&std::collections::BTreeMap<String, Vec<Example>>>,
    split: &str,
    start: u64,
    max: u32,
) -> Result<Batch, PluginError> {
    let splits = splits.ok_or_else(|| error(ErrorCode::InvalidInput, "read before open"))?;
    let examples = splits.get(split).ok_or_else(|| {
        error(
            ErrorCode::NotFound,
            format!(
                "no split {split:?} (have: {:?})",
                splits.keys().collect::<Vec<_>>()
            ),
        )
    })?;
    Ok(page(examples, start, max))
}

std::thread_local! {
    static HELD: std::cell::RefCell<Option<std::collections::BTreeMap<String, Vec<Example>>>> =
        const { std::cell::RefCell::new(None) };
}

/// Keeps `splits` for [`read_held`] (what an adapter that reads its whole dataset in `open`
/// holds), replacing any held before; returns the split names for `DatasetInfo`.
pub fn hold_splits(splits: std::collections::BTreeMap<String, Vec<Example>>) -> Vec<String> {
    let names = splits.keys().cloned().collect();
    HELD.with(|h| *h.borrow_mut() = Some(splits));
    names
}

/// The body of `Plugin::read` for an adapter whose splits [`hold_splits`] keeps.
pub fn read_held(split: &str, start: u64, max: u32) -> Result<Batch, PluginError> {
    HELD.with(|h| page_of(h.borrow().as_ref(), split, start, max))
}

/// Exports `$t: Plugin` as a component implementing every role interface.
#[macro_export]
macro_rules! export_plugin {
    ($t:ty) => {
        const _: () = {
            use $crate::bindings::exports::earshot::plugin as __roles;
            struct __EarshotExport;
            impl __roles::plugin::Guest for __EarshotExport {
                fn describe() -> $crate::PluginInfo {
                    <$t as $crate::Plugin>::info()
                }
            }
            impl __roles::prompt_template::Guest for __EarshotExport {
                fn render(
                    m: ::std::vec::Vec<$crate::KeyValue>,
                    o: ::std::string::String,
                ) -> ::std::result::Result<$crate::PromptPieces, $crate::PluginError> {
                    <$t as $crate::Plugin>::render(m, o)
                }
                fn format_target(
                    t: ::std::string::String,
                    m: ::std::vec::Vec<$crate::KeyValue>,
                    o: ::std::string::String,
                ) -> ::std::result::Result<::std::string::String, $crate::PluginError> {
                    <$t as $crate::Plugin>::format_target(t, m, o)
                }
            }
            impl __roles::dataset_adapter::Guest for __EarshotExport {
                fn open(
                    o: ::std::string::String,
                ) -> ::std::result::Result<$crate::DatasetInfo, $crate::PluginError> {
                    <$t as $crate::Plugin>::open(o)
                }
                fn read(
                    s: ::std::string::String,
                    start: u64,
                    max: u32,
                ) -> ::std::result::Result<$crate::Batch, $crate::PluginError> {
                    <$t as $crate::Plugin>::read(s, start, max)
                }
            }
            impl __roles::caption_post_processor::Guest for __EarshotExport {
                fn process(
                    r: ::std::string::String,
                    s: ::std::vec::Vec<::std::string::String>,
                    m: ::std::vec::Vec<$crate::KeyValue>,
                ) -> ::std::result::Result<::std::string::String, $crate::PluginError> {
                    <$t as $crate::Plugin>::process(r, s, m)
                }
            }
    $crate::bindings::__export_all_roles!(__EarshotExport with_types_in $crate::bindings);
        };
    };
}
