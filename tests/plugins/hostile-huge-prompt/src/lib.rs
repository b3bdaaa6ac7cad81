//! Hostile test plugin: huge-prompt. A prompt template whose text before the audio is 50 MB.
use earshot_plugin_sdk::*;

struct Hostile;

const ROLES: &[Role] = &[Role::PromptTemplate];

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info("hostile-huge-prompt", "0.1.0", ROLES, "hostile test plugin")
    }

    fn render(_m: Vec<KeyValue>, _options: String) -> Result<PromptPieces, PluginError> {
        Ok(PromptPieces {
            before_audio: "audio ".repeat((50 << 20) / 6),
            after_audio: "caption:".into(),
            stop_strings: vec![],
        })
    }

    fn format_target(t: String, _m: Vec<KeyValue>, _o: String) -> Result<String, PluginError> {
        Ok(t)
    }
}

export_plugin!(Hostile);
