//! Hostile test plugin: chatty. An ordinary adapter that logs ~85 bytes to stderr on every call and yields one example
//! per page, 2000 of them: logging must never kill it.
use earshot_plugin_sdk::*;

struct Hostile;

const ROLES: &[Role] = &[Role::DatasetAdapter];

const EXAMPLES: u64 = 2000;

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info("hostile-chatty", "0.1.0", ROLES, "hostile test plugin")
    }

    fn open(_options: String) -> Result<DatasetInfo, PluginError> {
        eprintln!("chatty adapter: opening the dataset at /data, looking for splits and clips....");
        Ok(DatasetInfo {
            splits: vec!["train".into()],
            warnings: vec![],
        })
    }

    fn read(_split: String, start: u64, _max: u32) -> Result<Batch, PluginError> {
        eprintln!("chatty adapter: reading one example at position {start:>8} of the split.......");
        Ok(Batch {
            examples: vec![Example {
                id: format!("clip-{start}"),
                audio: AudioSource::Path("clip.wav".into()),
                start_s: None,
                end_s: None,
                target: Some("a".into()),
                references: vec![],
                metadata: vec![],
            }],
            warnings: vec![],
            next: (start + 1 < EXAMPLES).then_some(start + 1),
        })
    }
}

export_plugin!(Hostile);
