//! Not hostile: a post-processor that upper-cases the caption, so a test can tell the
//! post-processed caption from the raw one (terminal streaming replaces the one by the other).

use earshot_plugin_sdk::*;

struct Shout;

impl Plugin for Shout {
    fn info() -> PluginInfo {
        info(
            "shout-post-processor",
            env!("CARGO_PKG_VERSION"),
            &[Role::CaptionPostProcessor],
            "Upper-cases the caption",
        )
    }

    fn process(
        raw: String,
        _stop_strings: Vec<String>,
        _metadata: Vec<KeyValue>,
    ) -> Result<String, PluginError> {
        Ok(raw.to_uppercase())
    }
}

export_plugin!(Shout);
