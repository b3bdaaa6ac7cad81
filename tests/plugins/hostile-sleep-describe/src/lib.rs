//! Hostile test plugin: sleep-describe. Sleeps in `describe`, before the host knows anything about it.
use earshot_plugin_sdk::*;

struct Hostile;

const ROLES: &[Role] = &[Role::CaptionPostProcessor];

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        info(
            "hostile-sleep-describe",
            "0.1.0",
            ROLES,
            "hostile test plugin",
        )
    }
}

export_plugin!(Hostile);
