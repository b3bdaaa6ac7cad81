//! Hostile test plugin: panic. Must be contained by the host's sandbox.
use earshot_plugin_sdk::*;

struct Hostile;

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info(
            "hostile-panic",
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
        panic!("boom: a hostile plugin panicked")
    }
}

export_plugin!(Hostile);
