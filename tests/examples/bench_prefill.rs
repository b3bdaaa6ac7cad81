//! Prefill of a long prompt for scripts/bench_prefill.sh, on the real default LLM: the time
//! and the memory (peak resident set over what the loaded model holds) of appending TOKENS
//! positions to a KV cache in chunks of CHUNK positions (0: in one piece, as before chunked
//! prefill). Run each setting in its own process: the peak is per process.
//!
//! bench_prefill GGUF TOKENS CHUNK -> one JSON line on stdout

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use earshot::models::llm::{load_llm, LanguageModel};
use earshot::models::Runtime;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("a kB field")
}

fn main() {
    earshot::models::device::count_threads_once();
    earshot::alloc::tune_for_tensors();
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: bench_prefill GGUF TOKENS CHUNK");
        std::process::exit(2);
    }
    let tokens: usize = args[2].parse().expect("TOKENS");
    let chunk: usize = args[3].parse().expect("CHUNK");
    let rt = Runtime::cpu();
    let mut llm = load_llm(&PathBuf::from(&args[1]), &rt).unwrap();
    llm.model
        .set_prefill_chunk(if chunk == 0 { usize::MAX } else { chunk });
    // Real text, repeated to the length wanted.
    let text = "The recording starts with a soft piano chord, then a violin joins, \
                playing a slow melody over a quiet hum of voices in a large room. ";
    let ids: Vec<u32> = llm
        .tokenizer
        .encode(text)
        .unwrap()
        .into_iter()
        .cycle()
        .take(tokens)
        .collect();
    let ids = Tensor::from_vec(ids, (1, tokens), &Device::Cpu).unwrap();
    let embeds = llm.model.embed(&ids).unwrap();
    let rss_before = status_kib("VmRSS:");
    let mut cache = llm.model.new_cache();
    let t = Instant::now();
    llm.model.prefill(&embeds, &mut cache).unwrap();
    let seconds = t.elapsed().as_secs_f64();
    let peak = status_kib("VmHWM:");
    println!(
        "{{\"tokens\": {tokens}, \"chunk\": {chunk}, \"seconds\": {seconds:.3}, \
         \"peak_over_model_mib\": {:.0}}}",
        peak.saturating_sub(rss_before) as f64 / 1024.0
    );
}
