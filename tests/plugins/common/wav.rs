//! A 16 kHz mono 16-bit WAV writer shared by the test plugins and the tests that need a
//! hand-made file (included with `#[path]`: the plugins are separate crates).

/// A valid 16 kHz mono 16-bit PCM WAV of `samples`, with `extra_chunk` (a whole RIFF chunk,
/// e.g. a LIST chunk) between `fmt ` and `data` when not empty: other bytes, the same audio.
#[allow(dead_code)]
pub fn wav_16k_mono(samples: &[i16], extra_chunk: &[u8]) -> Vec<u8> {
    let data_len = 2 * samples.len() as u32;
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + extra_chunk.len() as u32 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&16000u32.to_le_bytes());
    b.extend_from_slice(&32000u32.to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(extra_chunk);
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        b.extend_from_slice(&s.to_le_bytes());
    }
    b
}

/// `n` samples of a square wave of half-period `half_period` samples at +-8000.
#[allow(dead_code)]
pub fn square(n: u32, half_period: u32) -> Vec<i16> {
    (0..n)
        .map(|i| {
            if (i / half_period).is_multiple_of(2) {
                8000
            } else {
                -8000
            }
        })
        .collect()
}
