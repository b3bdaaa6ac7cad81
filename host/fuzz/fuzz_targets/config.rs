//! Any text as a run config, with and without a `--set` override.
#![no_main]

use std::path::Path;

use earshot::config::RunConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/nonexistent/fuzz.toml");
    let _ = RunConfig::from_toml(text, path, &[]);
    // The first line, if it looks like one, as an override of the rest.
    if let Some((set, rest)) = text.split_once('\n') {
        let _ = RunConfig::from_toml(rest, path, &[set.to_string()]);
    }
});
