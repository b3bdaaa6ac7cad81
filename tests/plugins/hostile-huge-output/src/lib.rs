//! Hostile test plugin: huge-output. Must be contained by the host's sandbox.
use earshot_plugin_sdk::*;

struct Hostile;

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info(
            "hostile-huge-output",
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
        Ok("x".repeat(1 << 30))
    }
}

export_plugin!(Hostile);
