//! Hostile test plugin: deep-recursion. Must be contained by the host's sandbox.
use earshot_plugin_sdk::*;

struct Hostile;

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info(
            "hostile-deep-recursion",
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
        fn down(n: u64) -> u64 {
            if n == 0 {
                0
            } else {
                1 + std::hint::black_box(down(n - 1))
            }
        }
        Ok(down(u64::MAX).to_string())
    }
}

export_plugin!(Hostile);
