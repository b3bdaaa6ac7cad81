//! Hostile test plugin: memory-bomb. Must be contained by the host's sandbox.
use earshot_plugin_sdk::*;

struct Hostile;

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info(
            "hostile-memory-bomb",
            "0.1.0",
            &[Role::CaptionPostProcessor],
            "hostile test plugin",
        )
    }

    fn process(
        raw: String,
        _stops: Vec<String>,
        _meta: Vec<KeyValue>,
    ) -> Result<String, PluginError> {
        let _ = &raw;
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        for _ in 0..4096 {
            hoard.push(vec![1u8; 1 << 20]);
        }
        Ok(hoard.len().to_string())
    }
}

export_plugin!(Hostile);
