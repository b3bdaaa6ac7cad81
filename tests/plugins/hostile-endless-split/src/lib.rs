//! Hostile test plugin: endless-split. A split that never ends: every page is full (inline WAV audio) and points to the next.
use earshot_plugin_sdk::*;

#[path = "../../common/wav.rs"]
mod wav;
use wav::{square, wav_16k_mono};

struct Hostile;

const ROLES: &[Role] = &[Role::DatasetAdapter];

impl Plugin for Hostile {
    fn info() -> PluginInfo {
        info(
            "hostile-endless-split",
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
        let audio = wav_16k_mono(&square(16_000, 20), &[]);
        let examples = (0..max as u64)
            .map(|k| Example {
                id: format!("endless-{}", start + k),
                audio: AudioSource::Inline(audio.clone()),
                start_s: None,
                end_s: None,
                target: Some("a tone".into()),
                references: vec![],
                metadata: vec![],
            })
            .collect();
        Ok(Batch {
            examples,
            warnings: vec![],
            next: Some(start + max as u64),
        })
    }
}

export_plugin!(Hostile);
