//! Hostile test plugin: sleep. Sleeps in whichever call its input names (`sleep` as the post-processor's text, the
//! template's or adapter's options, or the split read): a call blocked in a WASI host
//! function (monotonic-clock subscribe + poll), not running wasm code.
use earshot_plugin_sdk::*;

struct Hostile;

const ROLES: &[Role] = &[
    Role::PromptTemplate,
    Role::DatasetAdapter,
    Role::CaptionPostProcessor,
];

fn nap() {
    std::thread::sleep(std::time::Duration::from_secs(3600));
}

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info("hostile-sleep", "0.1.0", ROLES, "hostile test plugin")
    }

    fn render(_m: Vec<KeyValue>, options: String) -> Result<PromptPieces, PluginError> {
        if options == "sleep" {
            nap();
        }
        Ok(PromptPieces {
            before_audio: "a".into(),
            after_audio: "b".into(),
            stop_strings: vec![],
        })
    }

    fn open(options: String) -> Result<DatasetInfo, PluginError> {
        if options == "sleep" {
            nap();
        }
        Ok(DatasetInfo {
            splits: vec!["sleep".into()],
            warnings: vec![],
        })
    }

    fn read(split: String, _start: u64, _max: u32) -> Result<Batch, PluginError> {
        if split == "sleep" {
            nap();
        }
        Ok(Batch {
            examples: vec![],
            warnings: vec![],
            next: None,
        })
    }

    fn process(raw: String, _s: Vec<String>, _m: Vec<KeyValue>) -> Result<String, PluginError> {
        if raw == "sleep" {
            nap();
        }
        Ok(raw)
    }
}

export_plugin!(Hostile);
