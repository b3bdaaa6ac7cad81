//! Any bytes as an audio file: probing and decoding (bounded to 60 s) must return a value
//! or an error, never panic, hang or allocate without bound.
#![no_main]

use std::io::{Seek, Write};

use earshot::audio::{self, Segment};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(data).unwrap();
    file.rewind().unwrap();
    let path = std::path::Path::new("fuzz-input");
    if let Ok(decoded) = audio::decode_file_mono(file, path, Segment::whole(), Some(60.0)) {
        let _ = audio::to_16k(path, decoded);
    }
});
