//! Command-line values of library enums. clap stays under `cli/`: the library types know
//! nothing of it, and their names and help texts for the command line are written here.

use clap::builder::PossibleValue;
use clap::ValueEnum;

/// `impl ValueEnum for $ty` from `variant => "name", "help"` rows.
macro_rules! value_enum {
    ($ty:ty { $($variant:ident => $name:literal, $help:literal;)* }) => {
        impl ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &[$(<$ty>::$variant),*]
            }

            fn to_possible_value(&self) -> Option<PossibleValue> {
                Some(match self {
                    $(<$ty>::$variant => PossibleValue::new($name).help($help),)*
                })
            }
        }
    };
}

value_enum!(crate::mel::Padding {
    Whisper => "whisper", "Zero-pad the audio to 30 s before the STFT (OpenAI Whisper's `pad_or_trim`)";
    Trailing => "trailing", "Features of the unpadded clip, then 0.0-padded in the log-mel domain (faster-whisper)";
});

value_enum!(crate::caption::LongAudio {
    PerWindow => "per-window", "One caption per 30 s window, with its start and end time";
    Concat => "concat", "One caption from the concatenated windows' audio embeddings";
});

value_enum!(crate::selftest::Shape {
    Tiny => "tiny", "Whisper tiny encoder + a 135M Llama (SmolLM2-135M's shape)";
    Seed => "seed", "Whisper large-v3 encoder + a 7B Mistral-shaped LLM, the write-up's projector";
});

#[cfg(test)]
mod tests {
    use super::*;

    /// The command-line names are the config files' (serde kebab-case) names.
    #[test]
    fn names_match_the_serde_names() {
        for p in crate::mel::Padding::value_variants() {
            let serde = serde_json::to_value(p).unwrap();
            assert_eq!(
                serde.as_str(),
                Some(p.to_possible_value().unwrap().get_name())
            );
        }
        for s in crate::selftest::Shape::value_variants() {
            let serde = serde_json::to_value(s).unwrap();
            assert_eq!(
                serde.as_str(),
                Some(s.to_possible_value().unwrap().get_name())
            );
        }
        let names: Vec<_> = crate::caption::LongAudio::value_variants()
            .iter()
            .map(|v| v.to_possible_value().unwrap().get_name().to_string())
            .collect();
        assert_eq!(names, ["per-window", "concat"]);
    }
}
