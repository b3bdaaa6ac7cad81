//! Hostile test plugin: oversized-example. Three pages of four examples (inline one-second
//! tones); the second page holds, among three good examples, one with 2,000 metadata
//! entries (over the host's bound of 256). A host that refuses the whole page for it loses
//! the seven good examples after the first page.
use earshot_plugin_sdk::*;

#[path = "../../common/wav.rs"]
mod wav;
use wav::{square, wav_16k_mono};

struct Hostile;

const ROLES: &[Role] = &[Role::DatasetAdapter];
const PAGE: u64 = 4;
const EXAMPLES: u64 = 12;
/// The over-bound example's position: on the second page.
const BAD: u64 = 5;

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info(
            "hostile-oversized-example",
            "0.1.0",
            ROLES,
            "hostile test plugin",
        )
    }

    fn open(_options: String) -> Result<DatasetInfo, PluginError> {
        Ok(DatasetInfo {
            splits: vec!["train".into()],
            warnings: vec![],
        })
    }

    fn read(_split: String, start: u64, max: u32) -> Result<Batch, PluginError> {
        let end = (start + PAGE.min(max as u64)).min(EXAMPLES);
        let examples = (start..end)
            .map(|k| {
                let metadata = if k == BAD {
                    (0..2000)
                        .map(|i| KeyValue {
                            key: format!("k{i}"),
                            value: "v".into(),
                        })
                        .collect()
                } else {
                    vec![]
                };
                Example {
                    id: if k == BAD {
                        "huge-metadata".into()
                    } else {
                        format!("good-{k}")
                    },
                    audio: AudioSource::Inline(wav_16k_mono(&square(16_000, 10 + k as u32), &[])),
                    start_s: None,
                    end_s: None,
                    target: Some("a tone".into()),
                    references: vec![],
                    metadata,
                }
            })
            .collect();
        Ok(Batch {
            examples,
            warnings: vec![],
            next: (end < EXAMPLES).then_some(end),
        })
    }
}

export_plugin!(Hostile);
