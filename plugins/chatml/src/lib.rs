//! ChatML prompt template, reproducing the original write-up's prompt:
//! system "You are a helpful AI who follows instruction carefully", user
//! "Describe the sound of the given file", the audio inside the user turn after the
//! instruction, then the assistant turn. Targets end with `<|im_end|>`.
//!
//! Options (JSON, all optional): {"system": "...", "instruction": "..."}.
//! Per-example metadata `instruction` overrides the instruction.

use earshot_plugin_sdk::*;

#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    system: Option<String>,
    instruction: Option<String>,
}

const SYSTEM: &str = "You are a helpful AI who follows instruction carefully";
const INSTRUCTION: &str = "Describe the sound of the given file";
const END: &str = "<|im_end|>";

struct ChatMl;

impl Plugin for ChatMl {
    fn info() -> PluginInfo {
        info(
            "chatml",
            env!("CARGO_PKG_VERSION"),
            &[Role::PromptTemplate],
            "ChatML prompt with the audio inside the user turn (the original write-up's prompt)",
        )
    }

    fn render(metadata: Vec<KeyValue>, options: String) -> Result<PromptPieces, PluginError> {
        let o: Options = parse_options(&options)?;
        let system = o.system.as_deref().unwrap_or(SYSTEM);
        let instruction = meta(&metadata, "instruction")
            .or(o.instruction.as_deref())
            .unwrap_or(INSTRUCTION);
        Ok(PromptPieces {
            before_audio: format!(
                "<|im_start|>system\n{system}{END}\n<|im_start|>user\n{instruction}\n"
            ),
            after_audio: format!("{END}\n<|im_start|>assistant\n"),
            stop_strings: vec![END.into()],
        })
    }

    fn format_target(
        target: String,
        _metadata: Vec<KeyValue>,
        options: String,
    ) -> Result<String, PluginError> {
        let _: Options = parse_options(&options)?;
        Ok(format!("{}{END}", target.trim()))
    }
}

export_plugin!(ChatMl);
