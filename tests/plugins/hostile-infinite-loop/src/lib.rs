//! Hostile test plugin: infinite-loop. Must be contained by the host's sandbox.
use earshot_plugin_sdk::*;

struct Hostile;

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info(
            "hostile-infinite-loop",
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
        let mut x: u64 = 0;
        loop {
            x = x.wrapping_add(std::hint::black_box(1));
            if x == u64::MAX {
                break;
            }
        }
        Ok(x.to_string())
    }
}

export_plugin!(Hostile);
