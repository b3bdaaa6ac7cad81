//! Finite-difference check of d(loss)/d(projector parameters) through the full pipeline:
//! real Whisper encoder output -> projector -> frozen SmolLM2 -> caption-only loss. A
//! silent gradient cut anywhere on that path fails here. float64 copies of the real weights.
//! Training computes the prompt text before the audio once (`PrefixCache`); that path is the
//! one checked, and it must give the loss and gradients of one full forward.

use candle_core::{DType, Device, Tensor};
use earshot::models::llm::ChatTokenizer;
use earshot::models::llm::PrefixCache;
use earshot::models::llm::{read_gguf, GgufBlocks, Llama};
use earshot::models::nonfinite::NonFiniteTrace;
use earshot::models::projector::{Projector, ProjectorConfig, ProjectorKind};
use earshot::models::whisper::WhisperEncoder;
use earshot::models::Runtime;
use earshot::pipeline::loss::caption_loss;
use earshot::pipeline::TextPieces;
use earshot_tests::*;

/// The real SmolLM2 in float64, its tokenizer, and the encoder output of the speech clip.
fn setup() -> (Llama, ChatTokenizer, Tensor) {
    let (llm, tok, encoded, _) = setup_with_layers();
    (llm, tok, encoded)
}

/// [`setup`], and every encoder hidden state of the clip side by side (1, 1500, 5 * 384).
fn setup_with_layers() -> (Llama, ChatTokenizer, Tensor, Tensor) {
    let rt = Runtime::cpu();
    let (store, cfg, meta) = read_gguf(&default_gguf(), &rt, GgufBlocks::Skip).unwrap();
    let llm = Llama::load(&store, &cfg, DType::F64, &Device::Cpu).unwrap();
    let tok = ChatTokenizer::from_gguf(&default_gguf(), &meta).unwrap();
    let encoder = WhisperEncoder::load_dir(&default_whisper(), &rt).unwrap();
    let (_, mel) = read_npy(&whisper_oracle("expected/a_speech_mel_pad30s.npy"));
    let mel = Tensor::from_vec(mel, (1, 80, 3000), &Device::Cpu).unwrap();
    let encoded = encoder.forward(&mel, NonFiniteTrace::default()).unwrap();
    let all = encoder
        .forward_layers(&mel, &[0, 1, 2, 3, 4], NonFiniteTrace::default())
        .unwrap();
    (llm, tok, encoded, all)
}

fn pieces(tok: &ChatTokenizer, target: &str) -> TextPieces {
    TextPieces {
        before: tok
            .encode("<|im_start|>user\nDescribe the sound\n")
            .unwrap(),
        after: tok
            .encode_piece("<|im_end|>\n<|im_start|>assistant\n")
            .unwrap(),
        target: tok.encode_piece(target).unwrap(),
    }
}

#[test]
fn shared_prefix_gives_the_loss_and_gradients_of_one_full_forward() {
    let (llm, tok, encoded) = setup();
    // Targets of different lengths, so the batch is right-padded.
    let batch = vec![
        pieces(&tok, "A voice says a pangram.<|im_end|>"),
        pieces(&tok, "Birds.<|im_end|>"),
        pieces(
            &tok,
            "A man reads a sentence about a quick brown fox.<|im_end|>",
        ),
    ];
    let pcfg = ProjectorConfig {
        positions: 8,
        ..ProjectorConfig::default()
    };
    let projector = Projector::new(&pcfg, 384, 576, 3, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let prefixes = PrefixCache::default();
    let run = |cache: Option<&PrefixCache>| {
        // Different audio per row: the encoder output scaled.
        let audio: Vec<Tensor> = (0..batch.len())
            .map(|i| {
                projector
                    .forward(&(&encoded * (1.0 + i as f64 * 0.1)).unwrap())
                    .unwrap()
            })
            .collect();
        let loss = caption_loss(&llm, &batch, &audio, cache, NonFiniteTrace::default())
            .unwrap()
            .loss;
        let grads = loss.backward().unwrap();
        let grads: Vec<Vec<f64>> = projector
            .params()
            .iter()
            .map(|(_, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .expect("a gradient for every parameter");
                g.flatten_all().unwrap().to_vec1().unwrap()
            })
            .collect();
        (loss.to_scalar::<f64>().unwrap(), grads)
    };
    let (full_loss, full_grads) = run(None);
    let (loss, grads) = run(Some(&prefixes));
    // Twice: the second call reads the prefix from the cache.
    let (again, _) = run(Some(&prefixes));
    assert!(
        full_loss > 1.0,
        "a random projector has a high loss: {full_loss}"
    );
    assert!(
        (loss - full_loss).abs() <= 1e-9 * full_loss,
        "{loss} vs {full_loss}"
    );
    assert_eq!(loss, again);
    for ((name, _), (g, f)) in projector.params().iter().zip(grads.iter().zip(&full_grads)) {
        let norm = f.iter().map(|x| x * x).sum::<f64>().sqrt();
        let diff = g
            .iter()
            .zip(f)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        assert!(norm > 0.0, "{name}: zero gradient");
        assert!(
            diff <= 1e-9 * norm,
            "{name}: relative difference {}",
            diff / norm
        );
    }

    // Texts before the audio that differ within a batch are not shared: the cache is
    // bypassed and the loss is that of the full forward (one row's text used for all rows
    // would change it).
    let mut mixed = batch.clone();
    mixed[1].before = tok.encode("<|im_start|>user\nWhat do you hear?\n").unwrap();
    let loss_of = |cache: Option<&PrefixCache>| {
        let audio: Vec<Tensor> = (0..mixed.len())
            .map(|_| projector.forward(&encoded).unwrap())
            .collect();
        caption_loss(&llm, &mixed, &audio, cache, NonFiniteTrace::default())
            .unwrap()
            .loss
            .to_scalar::<f64>()
            .unwrap()
    };
    let (without, with) = (loss_of(None), loss_of(Some(&prefixes)));
    assert!(
        (without - with).abs() <= 1e-9 * without,
        "{with} vs {without}"
    );
}

#[test]
fn projector_gradients_match_finite_differences() {
    let (llm, tok, encoded, all_layers) = setup_with_layers();
    let pieces = vec![pieces(&tok, "A voice says a pangram.<|im_end|>")];
    let prefixes = PrefixCache::default();
    // The last case mixes the encoder's five hidden states (`layer_weights` included).
    for (kind, layers) in [
        (ProjectorKind::PoolLnLinear, 1),
        (ProjectorKind::Mlp, 1),
        (ProjectorKind::PoolLnLinear, 5),
    ] {
        let pcfg = ProjectorConfig {
            kind,
            positions: 8,
            hidden: Some(64),
            ..ProjectorConfig::default()
        };
        let projector = Projector::new_mixed(&pcfg, layers, 384, 576, 7, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        if layers > 1 {
            // Away from the equal mix, where each weight's gradient is one of a symmetric set.
            let (_, w) = projector.params().last().unwrap();
            assert_eq!(projector.params().last().unwrap().0, "layer_weights");
            w.set(&Tensor::new(&[0.3f64, -0.2, 0.1, 0.0, 0.5], &Device::Cpu).unwrap())
                .unwrap();
        }
        let input = if layers > 1 { &all_layers } else { &encoded };
        let loss_of = |p: &Projector| {
            let audio = p.forward(input).unwrap();
            caption_loss(
                &llm,
                &pieces,
                &[audio],
                Some(&prefixes),
                NonFiniteTrace::default(),
            )
            .unwrap()
            .loss
        };
        let loss = loss_of(&projector);
        let grads = loss.backward().unwrap();
        for (name, var) in projector.params() {
            let what = format!("{kind:?} {name}");
            assert_matches_finite_differences(&what, var, &grads, &|| {
                loss_of(&projector).to_scalar::<f64>().unwrap()
            });
        }
    }
}

/// d(loss)/d(LoRA A and B) on every kind of projection, through the frozen SmolLM2 (its
/// taped layers: the branch's hand-written backward and `grad_port`), with dropout masks on: against finite
/// differences, like the projector's. B starts at zero in a fresh adapter (A's gradient
/// would be zero), so both are drawn here.
#[test]
fn lora_gradients_match_finite_differences() {
    use earshot::models::lora::{LoraAdapter, LoraConfig, LoraTarget};
    use std::sync::Arc;
    let (mut llm, tok, encoded) = setup();
    let pieces = vec![pieces(&tok, "A voice says a pangram.<|im_end|>")];
    let last = llm.config.num_hidden_layers - 1;
    let config = LoraConfig {
        rank: 4,
        dropout: 0.1,
        targets: LoraTarget::ALL.to_vec(),
        layers: Some(vec![0, last]),
        ..LoraConfig::default()
    };
    let adapter = LoraAdapter::new(&config, &llm.config.decoder_shape(), 5, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    for (i, (_, var)) in adapter.params().iter().enumerate() {
        let t = Tensor::randn(0f64, 0.05, var.dims(), &Device::Cpu).unwrap();
        var.set(&(t + if i % 2 == 0 { 0.0 } else { 0.01 }).unwrap())
            .unwrap();
    }
    adapter.set_dropout_seed(Some(vec![11]));
    let adapter = Arc::new(adapter);
    llm.set_adapter(Some(adapter.clone()));
    let pcfg = ProjectorConfig {
        positions: 8,
        ..ProjectorConfig::default()
    };
    let projector = Projector::new(&pcfg, 384, 576, 7, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let loss_with = |llm: &Llama| {
        let audio = projector.forward(&encoded).unwrap();
        caption_loss(llm, &pieces, &[audio], None, NonFiniteTrace::default())
            .unwrap()
            .loss
    };
    let loss_of = || loss_with(&llm);
    let loss = loss_of();
    let grads = loss.backward().unwrap();
    let params = adapter.params();
    assert_eq!(params.len(), 2 * 7 * 2);
    for (name, var) in params.iter().chain(projector.params()) {
        assert_matches_finite_differences(name, var, &grads, &|| {
            loss_of().to_scalar::<f64>().unwrap()
        });
    }
    // The adapters change the model: without them the same projector gives another loss.
    let with = loss.to_scalar::<f64>().unwrap();
    llm.set_adapter(None);
    let without = loss_with(&llm).to_scalar::<f64>().unwrap();
    assert!(
        (with - without).abs() > 1e-6 * without,
        "{with} vs {without}"
    );
}

/// The gradient of `var` in `grads` against central finite differences of `loss_of` at its
/// two largest-magnitude coordinates (relative 1e-2), `var` restored after each.
fn assert_matches_finite_differences(
    what: &str,
    var: &candle_core::Var,
    grads: &candle_core::backprop::GradStore,
    loss_of: &dyn Fn() -> f64,
) {
    let g = grads
        .get(var.as_tensor())
        .unwrap_or_else(|| panic!("{what} received no gradient"));
    let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
    assert!(g.iter().any(|&x| x != 0.0), "{what}: all-zero gradient");
    let mut order: Vec<usize> = (0..g.len()).collect();
    order.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    for &c in &order[..2] {
        let eps = 1e-5;
        let at = |delta: f64| {
            let mut v = base.clone();
            v[c] += delta;
            var.set(&Tensor::from_vec(v, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            let l = loss_of();
            var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap())
                .unwrap();
            l
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        let rel = (fd - g[c]).abs() / fd.abs().max(g[c].abs());
        assert!(
            rel <= 1e-2,
            "{what}[{c}]: analytic {} vs finite difference {fd} (rel {rel})",
            g[c]
        );
    }
}
