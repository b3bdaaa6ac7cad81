//! Hostile test plugin: endless-split. A split that never ends: every page is full (inline WAV audio) and points to the next.
use earshot_plugin_sdk::*;

struct Hostile;

const ROLES: &[Role] = &[Role::DatasetAdapter];

/// A valid 16 kHz mono 16-bit WAV of `n` samples of a square wave.
fn wav(n: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + 2 * n).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&16000u32.to_le_bytes());
    b.extend_from_slice(&32000u32.to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&(2 * n).to_le_bytes());
    for i in 0..n {
        let v: i16 = if (i / 20) % 2 == 0 { 8000 } else { -8000 };
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

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
        let audio = wav(16_000);
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
