//! Captioning timings for scripts/bench_caption.sh, on the real default models with a
//! random projector (captions are gibberish; EOS is ignored so every caption is exactly
//! `TOKENS` long):
//!   - the KV-cache sampler vs the write-up's no-cache recompute sampler, tokens/s;
//!   - decoding throughput, clips/s, at batch 1, 4 and 16 (16 clips each time);
//!   - time to first token after the encoder, and the encoder time per 30 s window.
//!
//! bench_caption WHISPER_DIR GGUF MEL.npy POSITIONS TOKENS -> JSON lines on stdout

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use earshot::models::llm::{decode_batch, load_llm, DecodeOptions, DecodeRequest, PrefixCache};
use earshot::models::nonfinite::NonFiniteTrace;
use earshot::models::projector::{Projector, ProjectorConfig};
use earshot::models::whisper::WhisperEncoder;
use earshot::models::Runtime;
use earshot::pipeline::{project_windows, sequence_embeddings};
use earshot::sampler::{Sampler, SamplingParams};
use earshot_tests::decode_without_cache;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    earshot::models::device::count_threads_once();
    earshot::alloc::tune_for_tensors();
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 6 {
        eprintln!("usage: bench_caption WHISPER_DIR GGUF MEL.npy POSITIONS TOKENS");
        std::process::exit(2);
    }
    let positions: usize = args[4].parse().expect("POSITIONS");
    let tokens: usize = args[5].parse().expect("TOKENS");
    let rt = Runtime::cpu();
    let encoder = WhisperEncoder::load_dir(&PathBuf::from(&args[1]), &rt).unwrap();
    let llm = load_llm(&PathBuf::from(&args[2]), &rt).unwrap();
    let (_, mel) = earshot::npy::read_f32(&PathBuf::from(&args[3])).unwrap();
    let mel = Tensor::from_vec(mel, (1, 80, 3000), &Device::Cpu).unwrap();
    let trace = NonFiniteTrace::default();
    encoder.forward(&mel, trace).unwrap();
    let encoder_s = median(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                encoder.forward(&mel, trace).unwrap();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    );
    let encoded = encoder.forward(&mel, trace).unwrap();
    let pcfg = ProjectorConfig {
        positions,
        ..ProjectorConfig::default()
    };
    let projector = Projector::new(
        &pcfg,
        encoder.config.d_model,
        llm.model.config.hidden_size,
        0,
        &Device::Cpu,
    )
    .unwrap();
    let tok = &llm.tokenizer;
    let before = tok
        .encode("<|im_start|>system\nYou describe audio.<|im_end|>\n<|im_start|>user\nDescribe this clip:\n")
        .unwrap();
    let after = tok
        .encode_piece("<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let prefix = PrefixCache::default()
        .get_or_compute(&llm.model, &before)
        .unwrap();
    let greedy = SamplingParams::default();
    let audio = project_windows(&projector, std::slice::from_ref(&encoded)).unwrap();
    let request = || DecodeRequest {
        rest: sequence_embeddings(&llm.model, &[], &audio, &after, &[]).unwrap(),
        sampler: Sampler::new(greedy).unwrap(),
        max_tokens: tokens,
        stop_strings: Vec::new(),
    };
    let decode = |n: usize| {
        let options = DecodeOptions {
            tokenizer: Some(tok),
            eos: None,
            trace: NonFiniteTrace::default(),
            cancelled: None,
        };
        let mut requests: Vec<DecodeRequest> = (0..n).map(|_| request()).collect();
        decode_batch(&llm.model, &prefix, &mut requests, &options, |_, _| {}).unwrap()
    };
    let prompt_len = before.len() + positions + after.len();
    println!(
        "{{\"what\":\"setup\",\"prompt_tokens\":{prompt_len},\"caption_tokens\":{tokens},\"encoder_s\":{encoder_s}}}"
    );

    // The KV-cache sampler, one clip (warm-up first).
    decode(1);
    let mut ttft = Vec::new();
    let mut total = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let c = decode(1).remove(0);
        total.push(t.elapsed().as_secs_f64());
        ttft.push(c.first_token.as_secs_f64());
        assert_eq!(c.ids.len(), tokens);
    }
    let cached_s = median(total);
    println!(
        "{{\"what\":\"kv-cache\",\"seconds\":{cached_s},\"tokens_per_s\":{},\"first_token_s\":{}}}",
        tokens as f64 / cached_s,
        median(ttft)
    );

    // The write-up's sampler: the whole sequence again for every new token.
    let prompt = sequence_embeddings(&llm.model, &before, &audio, &after, &[]).unwrap();
    let t = Instant::now();
    let ids = decode_without_cache(
        &llm.model,
        &prompt,
        None,
        tokens,
        &mut Sampler::new(greedy).unwrap(),
    )
    .unwrap();
    let recompute_s = t.elapsed().as_secs_f64();
    assert_eq!(ids.len(), tokens);
    println!(
        "{{\"what\":\"recompute\",\"seconds\":{recompute_s},\"tokens_per_s\":{}}}",
        tokens as f64 / recompute_s
    );

    // Throughput: 16 clips at batch 1, 4 and 16.
    for batch in [1usize, 4, 16] {
        let t = Instant::now();
        for _ in 0..16 / batch {
            decode(batch);
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "{{\"what\":\"batch\",\"batch\":{batch},\"clips\":16,\"seconds\":{s},\"clips_per_s\":{},\"tokens_per_s\":{}}}",
            16.0 / s,
            16.0 * tokens as f64 / s
        );
    }
}
