//! Plugin timings for scripts/bench_plugins.sh.
//! bench_plugins PLUGINS_DIR -> JSON with cold/warm instantiation and per-call overhead.

use std::path::PathBuf;
use std::time::Instant;

use earshot::plugins::{PluginHost, PostProcessor, SandboxLimits};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("plugins dir"));
    let plugin = dir.join("plugin_template.wasm");
    let cache = tempfile::tempdir().unwrap();
    // Cold: compile from the .wasm (empty cache), then instantiate.
    let cold: Vec<f64> = (0..3)
        .map(|_| {
            let host = PluginHost::new(SandboxLimits::default(), None);
            let t = Instant::now();
            PostProcessor::load(&host, &plugin).unwrap();
            t.elapsed().as_secs_f64()
        })
        .collect();
    // Warm: the precompiled component comes from the cache.
    let host = PluginHost::new(SandboxLimits::default(), Some(cache.path().to_path_buf()));
    PostProcessor::load(&host, &plugin).unwrap();
    let warm: Vec<f64> = (0..20)
        .map(|_| {
            let t = Instant::now();
            PostProcessor::load(&host, &plugin).unwrap();
            t.elapsed().as_secs_f64()
        })
        .collect();
    let mut p = PostProcessor::load(&host, &plugin).unwrap();
    for _ in 0..1000 {
        p.process("a", &[], &[]).unwrap();
    }
    let n = 20_000;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(p.process("a", &[], &[]).unwrap());
    }
    let per_call = t.elapsed().as_secs_f64() / n as f64;
    println!(
        "{{\"cold_instantiation_s\":{},\"warm_instantiation_s\":{},\"per_call_s\":{}}}",
        median(cold),
        median(warm),
        per_call
    );
}
