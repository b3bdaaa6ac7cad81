//! Any samples (non-finite ones included) through the log-mel front-end, both paddings.
#![no_main]

use earshot::mel::{LogMelExtractor, MelSettings, Padding};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let samples: Vec<f32> = data
        .chunks_exact(4)
        .take(2_000_000)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    for padding in [Padding::Whisper, Padding::Trailing] {
        let settings = MelSettings {
            padding,
            ..MelSettings::default()
        };
        let mut mel = LogMelExtractor::new(settings.n_mels).unwrap();
        let _ = mel.windows(&samples, &settings);
    }
});
