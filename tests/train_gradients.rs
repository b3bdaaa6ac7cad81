//! Finite-difference check of d(loss)/d(projector parameters) through the full pipeline:
//! real Whisper encoder output -> projector -> frozen SmolLM2 -> caption-only loss. A
//! silent gradient cut anywhere on that path fails here. float64 copies of the real weights.

use candle_core::{DType, Device, Tensor};
use earshot::models::llm::{read_gguf, Llama};
use earshot::models::nonfinite::NonFiniteTrace;
use earshot::models::projector::{Projector, ProjectorConfig, ProjectorKind};
use earshot::models::whisper::WhisperEncoder;
use earshot::models::Runtime;
use earshot::train::batch::{caption_loss, TextPieces};
use earshot_tests::*;

#[test]
fn projector_gradients_match_finite_differences() {
    let rt = Runtime::cpu();
    let (store, cfg, meta) = read_gguf(&default_gguf(), &rt).unwrap();
    let llm = Llama::load(&store, &cfg, DType::F64, &Device::Cpu).unwrap();
    let tok = earshot::models::llm::ChatTokenizer::from_gguf(&default_gguf(), &meta).unwrap();
    let encoder = WhisperEncoder::load_dir(&default_whisper(), &rt).unwrap();
    let (_, mel) = read_npy(&whisper_oracle("expected/a_speech_mel_pad30s.npy"));
    let mel = Tensor::from_vec(mel, (1, 80, 3000), &Device::Cpu).unwrap();
    let encoded = encoder.forward(&mel, NonFiniteTrace::default()).unwrap();
    let pieces = vec![TextPieces {
        before: tok
            .encode("<|im_start|>user\nDescribe the sound\n")
            .unwrap(),
        after: tok
            .encode_piece("<|im_end|>\n<|im_start|>assistant\n")
            .unwrap(),
        target: tok
            .encode_piece("A voice says a pangram.<|im_end|>")
            .unwrap(),
    }];
    for kind in [ProjectorKind::PoolLnLinear, ProjectorKind::Mlp] {
        let pcfg = ProjectorConfig {
            kind,
            positions: 8,
            hidden: Some(64),
            ..ProjectorConfig::default()
        };
        let projector = Projector::new(&pcfg, 384, 576, 7, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let loss_of = |p: &Projector| {
            let audio = p.forward(&encoded).unwrap();
            caption_loss(&llm, &pieces, &[audio], NonFiniteTrace::default())
                .unwrap()
                .loss
        };
        let loss = loss_of(&projector);
        let grads = loss.backward().unwrap();
        for (name, var) in projector.params() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{kind:?}: {name} received no gradient"));
            let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                g.iter().any(|&x| x != 0.0),
                "{kind:?}: {name}: all-zero gradient"
            );
            // The two largest-magnitude coordinates of each tensor.
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
                    let l = loss_of(&projector).to_scalar::<f64>().unwrap();
                    var.set(&Tensor::from_vec(base.clone(), var.dims(), &Device::Cpu).unwrap())
                        .unwrap();
                    l
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                let rel = (fd - g[c]).abs() / fd.abs().max(g[c].abs());
                assert!(
                    rel <= 1e-2,
                    "{kind:?} {name}[{c}]: analytic {} vs finite difference {fd} (rel {rel})",
                    g[c]
                );
            }
        }
    }
}
