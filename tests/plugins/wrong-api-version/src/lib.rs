//! Claims a plugin API version this host does not support.
use earshot_plugin_sdk::*;

struct Future;

impl Plugin for Future {
    fn info() -> PluginInfo {
        PluginInfo {
            api_version: "9.0.0".into(),
            ..info(
                "from-the-future",
                "0.1.0",
                &[Role::CaptionPostProcessor],
                "claims API 9.0.0",
            )
        }
    }
}

export_plugin!(Future);
