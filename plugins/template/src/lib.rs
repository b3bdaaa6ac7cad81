//! A minimal caption post-processor: trims the caption and capitalises its first letter.
//! Copy this crate, rename it, and implement the `Plugin` methods of your roles.

use earshot_plugin_sdk::*;

struct Template;

impl Plugin for Template {
    fn info() -> PluginInfo {
        info(
            "plugin-template",
            env!("CARGO_PKG_VERSION"),
            &[Role::CaptionPostProcessor],
            "Trims the caption and capitalises its first letter",
        )
    }

    fn process(
        raw: String,
        _stop_strings: Vec<String>,
        _metadata: Vec<KeyValue>,
    ) -> Result<String, PluginError> {
        let text = raw.trim();
        let mut chars = text.chars();
        Ok(match chars.next() {
            Some(first) => first.to_uppercase().chain(chars).collect(),
            None => String::new(),
        })
    }
}

export_plugin!(Template);
