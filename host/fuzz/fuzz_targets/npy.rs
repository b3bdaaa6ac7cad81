//! Any bytes as a `.npy` file (what `encode` accepts as a mel).
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(data).unwrap();
    let _ = earshot::npy::read_f32(file.path());
});
