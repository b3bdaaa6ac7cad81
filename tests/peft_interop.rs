//! LoRA adapters in PEFT's layout against Python's `peft` (issue #26). The reference comes
//! from `scripts/peft_reference.py` (torch 2.5.1, transformers 4.46.3, peft 0.13.2, float32 on
//! the CPU), run once on earshot's Hugging Face export of the default SmolLM2; its outputs
//! are the fixtures in tests/fixtures/peft: an adapter made by `peft` (rank 8, rsLoRA, q/k/o/up
//! of two layers) and one earshot wrote (a LoRA run's adapter/ on the GGUF base: rank 4,
//! q/k/v/down of three layers), each with the logits transformers + peft gave with it. Here
//! earshot loads the same base and each adapter and must give those logits (relative L2 1e-4).

use candle_core::Tensor;
use earshot::models::llm::{export_gguf_to_hf, load_llm, LanguageModel, LogitsAt};
use earshot::models::lora::{read_peft, LoraAdapter};
use earshot::models::nonfinite::NonFiniteTrace;
use earshot::models::Runtime;
use earshot_tests::*;

fn fixtures() -> std::path::PathBuf {
    repo_root().join("tests/fixtures/peft")
}

/// Logits (positions, vocab) of `ids` at `positions`, flattened.
fn logits_at(model: &impl LanguageModel, ids: &[u32], positions: &[usize]) -> Vec<f32> {
    let x = Tensor::new(ids, model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let all = model
        .forward(
            &model.embed(&x).unwrap(),
            0,
            None,
            LogitsAt::All,
            NonFiniteTrace::default(),
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    positions
        .iter()
        .flat_map(|&p| all.get(p).unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

/// ||a - b|| / ||b||.
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += (*x as f64 - *y as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    (d / n).sqrt()
}

#[test]
fn adapters_give_the_logits_of_transformers_and_peft() {
    let dir = tempfile::tempdir().unwrap();
    let hf_dir = dir.path().join("smollm2-hf");
    export_gguf_to_hf(&default_gguf(), &hf_dir, 1).unwrap();
    let mut hf = load_llm(&hf_dir, &Runtime::cpu()).unwrap();
    let ids: Vec<u32> = read_npy(&fixtures().join("ids.npy"))
        .1
        .iter()
        .map(|&x| x as u32)
        .collect();
    let positions: Vec<usize> = read_npy(&fixtures().join("positions.npy"))
        .1
        .iter()
        .map(|&x| x as usize)
        .collect();
    let base_want = read_npy(&fixtures().join("logits_base.npy")).1;
    let base = logits_at(&hf.model, &ids, &positions);
    let rel = rel_l2(&base, &base_want);
    assert!(
        rel <= 1e-4,
        "no adapter: relative L2 {rel:e} against transformers"
    );
    eprintln!("no adapter: relative L2 {rel:.2e}");
    for (adapter, logits) in [
        ("peft_adapter", "logits_peft_adapter.npy"),
        ("earshot_adapter", "logits_earshot_adapter.npy"),
    ] {
        let peft = read_peft(&fixtures().join(adapter), hf.model.device()).unwrap();
        let on = LoraAdapter::new(
            &peft.config,
            &hf.model.config.decoder_shape(),
            0,
            hf.model.device(),
        )
        .unwrap();
        on.load_peft(&peft.tensors, &peft.weights).unwrap();
        hf.model.set_adapter(Some(std::sync::Arc::new(on)));
        let want = read_npy(&fixtures().join(logits)).1;
        // The adapter matters: far more than the tolerance between the two implementations.
        let moved = rel_l2(&want, &base_want);
        assert!(
            moved > 1e-2,
            "{adapter}: moves the logits by only {moved:e}"
        );
        let got = logits_at(&hf.model, &ids, &positions);
        let rel = rel_l2(&got, &want);
        assert!(
            rel <= 1e-4,
            "{adapter}: relative L2 {rel:e} against transformers + peft (the adapter moves them {moved:e})"
        );
        eprintln!("{adapter}: relative L2 {rel:.2e} (the adapter moves the logits {moved:.2e})");
        hf.model.set_adapter(None);
    }
}
