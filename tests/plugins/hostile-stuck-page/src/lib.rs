//! Hostile test plugin: stuck-page. An empty page whose `next` is the position just read: a host that trusts it pages
//! forever.
use earshot_plugin_sdk::*;

struct Hostile;

const ROLES: &[Role] = &[Role::DatasetAdapter];

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info("hostile-stuck-page", "0.1.0", ROLES, "hostile test plugin")
    }

    fn open(_options: String) -> Result<DatasetInfo, PluginError> {
        Ok(DatasetInfo {
            splits: vec!["train".into()],
            warnings: vec![],
        })
    }

    fn read(_split: String, start: u64, _max: u32) -> Result<Batch, PluginError> {
        Ok(Batch {
            examples: vec![],
            warnings: vec![],
            next: Some(start),
        })
    }
}

export_plugin!(Hostile);
