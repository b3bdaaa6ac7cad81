//! Hostile test plugin: trap-unreachable. Must be contained by the host's sandbox.
use earshot_plugin_sdk::*;

struct Hostile;

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info(
            "hostile-trap-unreachable",
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
        #[allow(unreachable_code)]
        {
            core::arch::wasm32::unreachable();
            Ok(String::new())
        }
    }
}

export_plugin!(Hostile);
