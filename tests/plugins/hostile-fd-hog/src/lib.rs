//! Hostile test plugin: fd-hog. Opens the same file under /data a hundred thousand times and keeps every handle, to
//! exhaust the host's file descriptors.
use earshot_plugin_sdk::*;

struct Hostile;

const ROLES: &[Role] = &[Role::DatasetAdapter];

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info("hostile-fd-hog", "0.1.0", ROLES, "hostile test plugin")
    }

    fn open(_options: String) -> Result<DatasetInfo, PluginError> {
        let mut kept = Vec::new();
        for _ in 0..100_000 {
            match std::fs::File::open(format!("{DATA_ROOT}/f.txt")) {
                Ok(f) => kept.push(f),
                Err(e) => {
                    return Err(error(
                        ErrorCode::Io,
                        format!("stopped after {} handles: {e}", kept.len()),
                    ))
                }
            }
        }
        std::mem::forget(kept);
        Ok(DatasetInfo {
            splits: vec!["SUCCEEDED".into()],
            warnings: vec![],
        })
    }
}

export_plugin!(Hostile);
