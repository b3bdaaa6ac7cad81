//! Hostile test plugin: fifo. Opens the named pipe `pipe` found in the dataset root: the open blocks in the kernel
//! until a writer comes, which never does.
use earshot_plugin_sdk::*;

struct Hostile;

const ROLES: &[Role] = &[Role::DatasetAdapter];

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info("hostile-fifo", "0.1.0", ROLES, "hostile test plugin")
    }

    fn open(_options: String) -> Result<DatasetInfo, PluginError> {
        let text = std::fs::read_to_string(format!("{DATA_ROOT}/pipe"))
            .map_err(|e| error(ErrorCode::Io, e.to_string()))?;
        Ok(DatasetInfo {
            splits: vec![text],
            warnings: vec![],
        })
    }
}

export_plugin!(Hostile);
