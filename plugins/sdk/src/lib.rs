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

/// What is wrong with a dataset adapter's `test_fraction` and `valid_fraction` options, if
/// anything: each in [0, 1) and something left to train on.
pub fn split_fractions_problem(test_fraction: f64, valid_fraction: f64) -> Option<String> {
    for (name, f) in [
        ("test_fraction", test_fraction),
        ("valid_fraction", valid_fraction),
    ] {
        if !(0.0..1.0).contains(&f) {
            return Some(format!("{name}: {f} is not in [0, 1)"));
        }
    }
    (test_fraction + valid_fraction >= 1.0).then(|| {
        format!(
            "test_fraction {test_fraction} + valid_fraction {valid_fraction} leave nothing to train on"
        )
    })
}

/// The names of the files at the top of the dataset root that `keep` accepts, sorted.
pub fn root_files(keep: impl Fn(&str) -> bool) -> Result<Vec<String>, PluginError> {
    let dir = std::fs::read_dir(DATA_ROOT)
        .map_err(|e| error(ErrorCode::Io, format!("listing the dataset root: {e}")))?;
    let mut found: Vec<String> = dir
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| keep(n))
        .collect();
    found.sort();
    Ok(found)
}

/// Splits that never share content. Examples that share any content key (the same audio
/// bytes, the same normalised transcript, the same source recording, ...) are joined into one
/// group, and a whole group falls on one side, chosen by a seeded hash of the group's
/// smallest key; so no recording and no transcript sits on two sides, however the dataset
/// reuses them. Keys are strings the adapter chooses; give each kind its own prefix
/// (`audio:`, `text:`, `source:`) so that kinds never collide.
///
/// ```ignore
/// let mut groups = ContentGroups::default();
/// for clip in &clips {
///     groups.add(&[format!("audio:{}", content_hash(&bytes)), format!("text:{}", normalized_text(&said))]);
/// }
/// let sides = groups.assign(seed, &[("test", 0.1), ("valid", 0.1)], "train");
/// ```
#[derive(Debug, Default)]
pub struct ContentGroups {
    /// Union-find over items.
    parent: Vec<usize>,
    /// Each item's keys.
    keys: Vec<Vec<String>>,
    /// Key -> the first item that had it.
    owner: std::collections::HashMap<String, usize>,
}

impl ContentGroups {
    /// Adds an item with its content keys (at least one); returns its index.
    pub fn add(&mut self, keys: &[String]) -> usize {
        let item = self.parent.len();
        self.parent.push(item);
        self.keys.push(keys.to_vec());
        for key in keys {
            match self.owner.get(key) {
                Some(&other) => self.union(item, other),
                None => {
                    self.owner.insert(key.clone(), item);
                }
            }
        }
        item
    }

    fn find(&mut self, mut i: usize) -> usize {
        while self.parent[i] != i {
            self.parent[i] = self.parent[self.parent[i]];
            i = self.parent[i];
        }
        i
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent[ra.max(rb)] = ra.min(rb);
        }
    }

    /// The number of groups.
    pub fn groups(&mut self) -> usize {
        (0..self.parent.len())
            .filter(|&i| self.find(i) == i)
            .count()
    }

    /// Each item's split, in the order added: a group goes to the first of `held` whose
    /// cumulative fraction its hash falls under (e.g. `[("test", 0.1), ("valid", 0.1)]`),
    /// else to `rest`. The hash is of the group's smallest key, so adding unrelated items
    /// never moves a group.
    pub fn assign<'a>(
        &mut self,
        seed: u64,
        held: &[(&'a str, f64)],
        rest: &'a str,
    ) -> Vec<&'a str> {
        let n = self.parent.len();
        let mut smallest: std::collections::HashMap<usize, String> =
            std::collections::HashMap::new();
        for i in 0..n {
            let root = self.find(i);
            for key in &self.keys[i] {
                let entry = smallest.entry(root).or_insert_with(|| key.clone());
                if key < entry {
                    *entry = key.clone();
                }
            }
        }
        (0..n)
            .map(|i| {
                let root = self.find(i);
                let key = smallest.get(&root).map(String::as_str).unwrap_or_default();
                let u = (fnv1a(seed, key.as_bytes()) % 1_000_000) as f64 / 1_000_000.0;
                let mut bound = 0.0;
                for (name, fraction) in held {
                    bound += fraction;
                    if u < bound {
                        return *name;
                    }
                }
                rest
            })
            .collect()
    }
}

/// A 128-bit content hash (two FNV-1a passes with different seeds), hex: enough to group
/// identical bytes. A collision could only join two groups, never put one recording on two
/// sides.
pub fn content_hash(bytes: &[u8]) -> String {
    format!(
        "{:016x}{:016x}",
        fnv1a(0, bytes),
        fnv1a(0x9e37_79b9_7f4a_7c15, bytes)
    )
}

fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x0000_0100_0000_01b3);
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Text as transcripts are compared for grouping: lower-case, everything but letters, digits
/// and whitespace deleted, whitespace collapsed. Texts the host's normalisation (WER/CER, the
/// leak audit: punctuation deleted) finds equal are equal here too; this one is looser, which
/// only joins more examples into a group.
pub fn normalized_text(text: &str) -> String {
    let kept: String = text
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace())
        .collect();
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A content key for an encoded audio file: [`content_hash`] of its bytes, except that for an
/// Ogg stream only the pages' payloads count. Two Ogg files that carry the same packets differ
/// in their stream serial numbers and page checksums, so equal audio would otherwise look
/// different (Tux Paint's stamps hold such pairs). A file that does not parse as Ogg pages
/// from start to end is hashed whole.
pub fn audio_content_hash(bytes: &[u8]) -> String {
    match ogg_payloads(bytes) {
        Some(payload) => format!("ogg:{}", content_hash(&payload)),
        None => content_hash(bytes),
    }
}

/// The concatenated page bodies of an Ogg stream, or None when `bytes` is not one.
fn ogg_payloads(bytes: &[u8]) -> Option<Vec<u8>> {
    let mut payload = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let header = bytes.get(at..at + 27)?;
        if &header[..4] != b"OggS" {
            return None;
        }
        let segments = header[26] as usize;
        let table = bytes.get(at + 27..at + 27 + segments)?;
        let body_len: usize = table.iter().map(|&s| s as usize).sum();
        let body_at = at + 27 + segments;
        payload.extend_from_slice(bytes.get(body_at..body_at + body_len)?);
        at = body_at + body_len;
    }
    (at > 0).then_some(payload)
}
