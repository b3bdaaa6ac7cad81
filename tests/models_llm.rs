//! The LLM path against the SmolLM2 oracle (llama.cpp and an independent float64 numpy
//! forward over the dequantized GGUF), plus the gradient checks that training relies on.

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, Var, D};
use earshot::models::llm::{
    export_gguf_to_hf, generate_ids, load_llm, read_gguf, GgufBlocks, LanguageModel, Llama,
    LoadedLlm, LogitsAt,
};
use earshot::models::nonfinite::NonFiniteTrace;
use earshot::models::Runtime;
use earshot::sampler::{Sampler, SamplingParams};
use earshot_tests::*;

fn llm() -> &'static LoadedLlm {
    static LLM: OnceLock<LoadedLlm> = OnceLock::new();
    LLM.get_or_init(|| load_llm(&default_gguf(), &Runtime::cpu()).unwrap())
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn chatml_ids() -> Vec<u32> {
    ids_of(&json(&smollm_oracle("chatml_ids.json")))
}

const NO_TRACE: NonFiniteTrace = NonFiniteTrace { enabled: false };

/// `earshot generate --llm <default GGUF> --max-tokens N --prompt PROMPT`.
fn generate_cli(prompt: &str, max_tokens: usize) -> std::process::Output {
    earshot([
        "generate".as_ref(),
        "--llm".as_ref(),
        default_gguf().as_os_str(),
        "--max-tokens".as_ref(),
        max_tokens.to_string().as_ref(),
        "--prompt".as_ref(),
        prompt.as_ref(),
    ])
}

fn all_logits(model: &impl LanguageModel, ids: &[u32]) -> Vec<f32> {
    let x = Tensor::new(ids, model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let e = model.embed(&x).unwrap();
    model
        .forward(&e, 0, None, LogitsAt::All, NO_TRACE)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

fn argmax_rows(x: &[f32], vocab: usize) -> Vec<usize> {
    x.chunks(vocab)
        .map(|r| {
            r.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        })
        .collect()
}

#[test]
fn token_ids_match_llama_cpp() {
    let cases = json(&smollm_oracle("tokens_llamacpp.json"));
    let tok = &llm().tokenizer;
    for (text, case) in cases.as_object().unwrap() {
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids, ids_of(&case["ids"]), "ids for {text:?}");
        assert_eq!(tok.decode(&ids).unwrap(), *text, "round trip of {text:?}");
    }
    let prompt = json(&smollm_oracle("greedy.json"))["prompt"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(tok.encode(&prompt).unwrap(), chatml_ids());
    assert_eq!(tok.special.bos, Some(1));
    assert_eq!(tok.special.eos, Some(2));
    assert!(!tok.special.add_bos);
    assert_eq!(tok.id_of("<|im_start|>"), Some(1));
}

fn check_logits_against_oracle(got: &[f32]) {
    let (shape, reference) = read_npy(&smollm_oracle("numpy_chatml_logits.npy"));
    assert_eq!(shape, vec![30, 49152]);
    let d = max_abs_diff(got, &reference);
    assert!(d <= 5e-3, "max abs logit difference {d}");
    assert_eq!(argmax_rows(got, 49152), argmax_rows(&reference, 49152));
    let (_, llamacpp) = read_npy(&smollm_oracle("llamacpp_chatml_logits.npy"));
    let agree = argmax_rows(got, 49152)
        .iter()
        .zip(argmax_rows(&llamacpp, 49152))
        .filter(|(a, b)| **a == *b)
        .count();
    assert!(agree >= 28, "top-1 agreement with llama.cpp {agree}/30");
}

#[test]
fn logits_at_every_position_match_the_float_reference() {
    check_logits_against_oracle(&all_logits(&llm().model, &chatml_ids()));
}

#[test]
fn decoding_from_packed_gguf_blocks_matches_the_float_reference() {
    // One position per forward, as decoding runs: the projections read the Q4_1 / Q8_0
    // blocks kept from the GGUF (every one of them: 30 layers x 4 stacked projections, and
    // the tied LM head) instead of the dequantized matrices. Three rows at once exercise the
    // multi-row kernel as batched captioning does.
    let model = &llm().model;
    assert_eq!(model.packed_projections(), 30 * 4 + 1);
    let ids = chatml_ids();
    let rows = 3;
    let mut cache = model.new_cache();
    let mut per_row = vec![Vec::new(); rows];
    for (pos, &id) in ids.iter().enumerate() {
        let x = Tensor::new(&[id], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let e = model.embed(&x).unwrap().repeat((rows, 1, 1)).unwrap();
        let l = model
            .forward(&e, pos, Some(&mut cache), LogitsAt::Last, NO_TRACE)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        for (row, l) in per_row.iter_mut().zip(l) {
            row.extend(&l[0]);
        }
    }
    for row in &per_row {
        check_logits_against_oracle(row);
    }
}

#[test]
fn cached_forward_equals_full_forward() {
    let model = &llm().model;
    let ids = chatml_ids();
    let full = all_logits(model, &ids);
    let mut cache = model.new_cache();
    let mut got = Vec::new();
    let mut offset = 0;
    for chunk in [&ids[..10], &ids[10..11], &ids[11..]] {
        let x = Tensor::new(chunk, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let e = model.embed(&x).unwrap();
        let l = model
            .forward(&e, offset, Some(&mut cache), LogitsAt::All, NO_TRACE)
            .unwrap();
        offset += chunk.len();
        got.extend(l.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    assert_eq!(cache.len(), 30);
    let d = max_abs_diff(&got, &full);
    assert!(d <= 1e-3, "cached vs full {d}");
}

#[test]
fn greedy_continuation_matches_the_reference() {
    let g = json(&smollm_oracle("greedy.json"));
    let expected = ids_of(&g["reference_greedy40_ids"]);
    let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
    let l = llm();
    let got = generate_ids(
        &l.model,
        &chatml_ids(),
        40,
        l.tokenizer.special.eos,
        &mut sampler,
        NO_TRACE,
    )
    .unwrap();
    assert_eq!(got, expected);
    assert_eq!(
        l.tokenizer.decode(&got).unwrap(),
        g["reference_greedy40_text"].as_str().unwrap()
    );
}

#[test]
fn generate_cli_prints_the_reference_continuation() {
    let g = json(&smollm_oracle("greedy.json"));
    let out = generate_cli(g["prompt"].as_str().unwrap(), 40);
    let stdout = expect_success(&out);
    assert_eq!(
        stdout.trim_end(),
        g["reference_greedy40_text"].as_str().unwrap()
    );
}

#[test]
fn generate_refuses_a_prompt_longer_than_the_context() {
    // 9000 words are more than the 8192 positions SmolLM2's metadata allows: a clear error
    // about the input (not about the weights), exit 1, nothing on stdout.
    let prompt = "word ".repeat(9000);
    let out = generate_cli(&prompt, 2);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("exceed the model's context of 8192") && !stderr.contains("weights"),
        "{stderr}"
    );
}

#[test]
fn hf_layout_with_halves_rotary_matches_the_oracle() {
    // GGUF -> HF folder (Q/K un-permuted, sharded with an index) -> halves rotary.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm-hf");
    export_gguf_to_hf(&default_gguf(), &out, 2).unwrap();
    assert!(out.join("model.safetensors.index.json").is_file());
    let hf = load_llm(&out, &Runtime::cpu()).unwrap();
    assert!(!hf.model.config.rope_interleaved);
    assert_eq!(
        hf.tokenizer.encode("<|im_start|>user").unwrap(),
        vec![1, 4093]
    );
    check_logits_against_oracle(&all_logits(&hf.model, &chatml_ids()));
}

#[test]
fn rotating_halves_on_stored_weights_is_wrong() {
    // The oracle README: halves rotary on llama.cpp's stored rows breaks top-1 agreement.
    // Guards against a loader that forgets the convention.
    let rt = Runtime::cpu();
    let (store, mut cfg, _) = read_gguf(&default_gguf(), &rt, GgufBlocks::Skip).unwrap();
    cfg.rope_interleaved = false;
    let wrong = Llama::load(&store, &cfg, DType::F32, &Device::Cpu).unwrap();
    let got = all_logits(&wrong, &chatml_ids());
    let (_, reference) = read_npy(&smollm_oracle("numpy_chatml_logits.npy"));
    let agree = argmax_rows(&got, 49152)
        .iter()
        .zip(argmax_rows(&reference, 49152))
        .filter(|(a, b)| **a == *b)
        .count();
    assert!(
        agree < 28,
        "wrong rotary still agrees at {agree}/30 positions"
    );
}

/// Mean cross-entropy of next-token prediction over the whole sequence.
fn loss_from_embeds(model: &Llama, embeds: &Tensor, ids: &[u32]) -> Tensor {
    let logits = model
        .forward(embeds, 0, None, LogitsAt::All, NO_TRACE)
        .unwrap();
    let t = ids.len();
    let logits = logits.squeeze(0).unwrap().narrow(0, 0, t - 1).unwrap();
    let targets = Tensor::new(&ids[1..], embeds.device()).unwrap();
    candle_nn_free_cross_entropy(&logits, &targets)
}

/// log-softmax cross-entropy from primitive (differentiable) ops.
fn candle_nn_free_cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    let max = logits.max_keepdim(D::Minus1).unwrap();
    let shifted = logits.broadcast_sub(&max).unwrap();
    let lse = shifted
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .log()
        .unwrap();
    let logp = shifted.broadcast_sub(&lse).unwrap();
    let picked = logp.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap();
    picked.mean_all().unwrap().neg().unwrap()
}

#[test]
fn gradient_wrt_input_embeddings_matches_finite_differences() {
    // float64 copy of the real weights so the finite difference is exact enough.
    let rt = Runtime::cpu();
    let (store, cfg, _) = read_gguf(&default_gguf(), &rt, GgufBlocks::Skip).unwrap();
    let model = Llama::load(&store, &cfg, DType::F64, &Device::Cpu).unwrap();
    let ids: Vec<u32> = chatml_ids()[..12].to_vec();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let base = model.embed(&x).unwrap();
    let var = Var::from_tensor(&base).unwrap();
    let loss = loss_from_embeds(&model, var.as_tensor(), &ids);
    let grads = loss.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("the input embeddings get a gradient");
    let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    // The largest-magnitude coordinates plus a few fixed ones across positions.
    let mut order: Vec<usize> = (0..g.len()).collect();
    order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    let h = 576;
    let mut coords: Vec<usize> = order[..3].to_vec();
    coords.extend([2 * h + 17, 7 * h + 300, 10 * h + 5]);
    let base_v = base.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let eps = 1e-4;
    for &c in &coords {
        let eval = |delta: f64| -> f64 {
            let mut v = base_v.clone();
            v[c] += delta;
            let e = Tensor::from_vec(v, base.dims(), &Device::Cpu).unwrap();
            loss_from_embeds(&model, &e, &ids)
                .to_scalar::<f64>()
                .unwrap()
        };
        let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
        let rel = (fd - g[c]).abs() / fd.abs().max(g[c].abs()).max(1e-8);
        assert!(
            rel <= 1e-2 || (fd - g[c]).abs() < 1e-7,
            "coordinate {c}: analytic {} vs finite difference {fd} (rel {rel})",
            g[c]
        );
    }
}

#[test]
fn backward_stores_no_gradient_for_frozen_weights() {
    let rt = Runtime::cpu();
    let (store, cfg, _) = read_gguf(&default_gguf(), &rt, GgufBlocks::Skip).unwrap();
    let mut model = Llama::load(&store, &cfg, DType::F32, &Device::Cpu).unwrap();
    let ids: Vec<u32> = chatml_ids()[..8].to_vec();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let var = Var::from_tensor(&model.embed(&x).unwrap()).unwrap();
    let grads = loss_from_embeds(&model, var.as_tensor(), &ids)
        .backward()
        .unwrap();
    assert!(grads.get(var.as_tensor()).is_some());
    let frozen = model.frozen_tensors();
    let leaked: Vec<_> = frozen.iter().filter(|t| grads.get(t).is_some()).collect();
    assert!(
        leaked.is_empty(),
        "{} frozen tensors received gradients",
        leaked.len()
    );
    // The same check fails with candle's stock matmul, so it can fail.
    model.use_stock_backward();
    let grads = loss_from_embeds(&model, var.as_tensor(), &ids)
        .backward()
        .unwrap();
    let stored = model
        .frozen_tensors()
        .iter()
        .filter(|t| grads.get(t).is_some())
        .count();
    assert!(stored > 0, "stock matmul should store weight gradients");
}

#[test]
fn kv_cache_decoder_equals_a_no_cache_reference_decoder() {
    // The write-up's sampler: re-run the whole sequence for every new token.
    let l = llm();
    let mut ids = chatml_ids()[..20].to_vec();
    let prompt = ids.clone();
    for _ in 0..12 {
        let logits = all_logits(&l.model, &ids);
        let last = &logits[logits.len() - 49152..];
        ids.push(earshot::sampler::argmax(last));
    }
    let reference = ids[prompt.len()..].to_vec();
    let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
    let cached = generate_ids(&l.model, &prompt, 12, None, &mut sampler, NO_TRACE).unwrap();
    assert_eq!(cached, reference);
}

#[test]
fn a_shared_prompt_prefix_cache_gives_the_same_tokens() {
    // Captioning computes the prompt text before the audio once and continues from a clone
    // of its KV cache for every clip.
    let l = llm();
    let ids = chatml_ids();
    let full = {
        let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
        generate_ids(&l.model, &ids, 10, None, &mut sampler, NO_TRACE).unwrap()
    };
    let mut prefix = l.model.new_cache();
    let head = Tensor::new(&ids[..14], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    l.model
        .forward(
            &l.model.embed(&head).unwrap(),
            0,
            Some(&mut prefix),
            LogitsAt::Last,
            NO_TRACE,
        )
        .unwrap();
    let tail = Tensor::new(&ids[14..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let tail = l.model.embed(&tail).unwrap();
    for _ in 0..2 {
        let mut sampler = Sampler::new(SamplingParams::default()).unwrap();
        let got = earshot::models::llm::generate_continuing(
            &l.model,
            prefix.try_clone().unwrap(),
            &tail,
            10,
            None,
            &mut sampler,
            NO_TRACE,
        )
        .unwrap();
        assert_eq!(got, full);
    }
    assert_eq!(
        prefix.len(),
        14,
        "the shared prefix is not modified by its users"
    );
}

/// A LoRA adapter trained on the GGUF base (llama.cpp's q/k row order) and written in PEFT's
/// layout (Hugging Face's row order) gives, on the base converted to Hugging Face's layout,
/// the logits it gives on the GGUF base; loaded without the row reordering it would not.
#[test]
fn peft_adapters_carry_between_gguf_and_hugging_face_layouts() {
    use earshot::models::lora::{read_peft, LoraAdapter, LoraConfig, LoraTarget};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm-hf");
    export_gguf_to_hf(&default_gguf(), &out, 1).unwrap();
    let rt = Runtime::cpu();
    let mut gguf = load_llm(&default_gguf(), &rt).unwrap();
    let mut hf = load_llm(&out, &rt).unwrap();
    let config = LoraConfig {
        rank: 4,
        targets: vec![LoraTarget::QProj, LoraTarget::KProj, LoraTarget::VProj],
        ..LoraConfig::default()
    };
    let shape = gguf.model.config.decoder_shape();
    assert!(shape.rope_interleaved);
    let trained = LoraAdapter::new(&config, &shape, 1, &Device::Cpu).unwrap();
    for (_, v) in trained.params() {
        v.set(&Tensor::randn(0f32, 0.05, v.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let peft_dir = dir.path().join("adapter");
    trained.save_peft(&peft_dir, "smollm2").unwrap();
    gguf.model.set_adapter(Some(Arc::new(trained)));
    let want = all_logits(&gguf.model, &chatml_ids());

    let peft = read_peft(&peft_dir, &Device::Cpu).unwrap();
    let hf_shape = hf.model.config.decoder_shape();
    assert!(!hf_shape.rope_interleaved);
    let on_hf = LoraAdapter::new(&peft.config, &hf_shape, 2, &Device::Cpu).unwrap();
    on_hf.load_peft(&peft.tensors, &peft.weights).unwrap();
    hf.model.set_adapter(Some(Arc::new(on_hf)));
    let got = all_logits(&hf.model, &chatml_ids());
    let d = max_abs_diff(&got, &want);
    assert!(d <= 1e-3, "max abs logit difference {d}");

    // The same file read as if its rows were in the GGUF base's order: other logits.
    let mut wrong_base = load_llm(&default_gguf(), &rt).unwrap();
    let wrong = LoraAdapter::new(&peft.config, &shape, 3, &Device::Cpu).unwrap();
    wrong.load_map(&peft.tensors, &peft.weights).unwrap();
    wrong_base.model.set_adapter(Some(Arc::new(wrong)));
    let off = max_abs_diff(&all_logits(&wrong_base.model, &chatml_ids()), &want);
    assert!(
        off > 100.0 * d.max(1e-4),
        "unordered rows change the logits by only {off}"
    );
}
