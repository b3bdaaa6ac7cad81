//! Hostile test plugin: many-roles. Lists twenty million roles in `describe` (20 MB in its memory, far more once the host
//! has lifted and printed them).
use earshot_plugin_sdk::*;

struct Hostile;

const ROLES: &[Role] = &[Role::CaptionPostProcessor];

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        let mut i = info("hostile-many-roles", "0.1.0", ROLES, "hostile test plugin");
        i.roles = vec![Role::CaptionPostProcessor; 20_000_000];
        i
    }

    fn process(raw: String, _s: Vec<String>, _m: Vec<KeyValue>) -> Result<String, PluginError> {
        Ok(raw)
    }
}

export_plugin!(Hostile);
