//! Hostile test plugin: write-root. Must be contained by the host's sandbox.
use earshot_plugin_sdk::*;

struct Hostile;

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info(
            "hostile-write-root",
            "0.1.0",
            &[Role::DatasetAdapter],
            "hostile test plugin",
        )
    }

    fn open(options: String) -> Result<DatasetInfo, PluginError> {
        let _ = &options;
        // Report what the attempt gave, so the host test can check nothing leaked.
        let outcome: std::io::Result<String> =
            std::fs::write("/data/pwned.txt", b"pwned").map(|_| "written".to_string());
        match outcome {
            Ok(text) => Ok(DatasetInfo {
                splits: vec![],
                warnings: vec![format!("SUCCEEDED: {text}")],
            }),
            Err(e) => Err(error(ErrorCode::Io, format!("denied: {e}"))),
        }
    }
}

export_plugin!(Hostile);
