//! The captioning decoder on the real default models (random projector: the tokens are
//! gibberish, but every decoder must produce the same gibberish): a padded batch of clips
//! with different prompt lengths gives the same tokens as each clip alone, and the cached
//! decoder the same tokens as the write-up's no-cache recompute decoder; stop strings and
//! the token limit are honoured; seeded sampling repeats.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use earshot::models::llm::{
    decode_batch, load_llm, DecodeLoop, DecodeOptions, DecodeRequest, Decoded as Caption, Finish,
    KvCache, LanguageModel, Left, LoadedLlm, PrefixCache,
};
use earshot::models::nonfinite::NonFiniteTrace;
use earshot::models::projector::{Projector, ProjectorConfig};
use earshot::models::whisper::WhisperEncoder;
use earshot::models::Runtime;
use earshot::pipeline::{project_windows, sequence_embeddings};
use earshot::sampler::{Sampler, SamplingParams};
use earshot_tests::*;

struct Setup {
    llm: LoadedLlm,
    projector: Projector,
    before: Vec<u32>,
    prefix: Arc<KvCache>,
    /// (windows, text after the audio, max tokens) per clip.
    clips: Vec<(Vec<Tensor>, Vec<u32>, usize)>,
}

fn setup() -> Setup {
    let rt = Runtime::cpu();
    let llm = load_llm(&default_gguf(), &rt).unwrap();
    let encoder = WhisperEncoder::load_dir(&default_whisper(), &rt).unwrap();
    let (_, mel) = read_npy(&whisper_oracle("expected/a_speech_mel_pad30s.npy"));
    let mel = Tensor::from_vec(mel, (1, 80, 3000), &Device::Cpu).unwrap();
    let speech = encoder.forward(&mel, NonFiniteTrace::default()).unwrap();
    let quiet = (&speech * 0.5).unwrap();
    let pcfg = ProjectorConfig {
        positions: 12,
        ..ProjectorConfig::default()
    };
    let projector = Projector::new(&pcfg, 384, 576, 11, &Device::Cpu).unwrap();
    let tok = &llm.tokenizer;
    let before = tok
        .encode("<|im_start|>user\nDescribe the audio:\n")
        .unwrap();
    let prefix = PrefixCache::default()
        .get_or_compute(&llm.model, &before)
        .unwrap();
    let after = |s: &str| tok.encode_piece(s).unwrap();
    // Rest lengths 12 + 5, 24 + 3 and 12 + 14: every row of the batch is padded differently,
    // and the rows stop at different steps.
    let clips = vec![
        (
            vec![speech.clone()],
            after("<|im_end|>\n<|im_start|>assistant\n"),
            14,
        ),
        (vec![speech.clone(), quiet.clone()], after("\nCaption:"), 6),
        (
            vec![quiet],
            after("<|im_end|>\n<|im_start|>assistant\nThe recording has"),
            10,
        ),
    ];
    Setup {
        llm,
        projector,
        before,
        prefix,
        clips,
    }
}

impl Setup {
    fn requests(&self, params: SamplingParams, stops: &[String]) -> Vec<DecodeRequest> {
        self.clips
            .iter()
            .map(|(windows, after, max)| DecodeRequest {
                rest: sequence_embeddings(
                    &self.llm.model,
                    &[],
                    &project_windows(&self.projector, windows).unwrap(),
                    after,
                    &[],
                )
                .unwrap(),
                sampler: Sampler::new(params).unwrap(),
                max_tokens: *max,
                stop_strings: stops.to_vec(),
            })
            .collect()
    }

    fn decode(&self, mut requests: Vec<DecodeRequest>, eos: Option<u32>) -> Vec<Caption> {
        let options = DecodeOptions {
            tokenizer: Some(&self.llm.tokenizer),
            eos,
            trace: NonFiniteTrace::default(),
            cancelled: None,
        };
        decode_batch(
            &self.llm.model,
            &self.prefix,
            &mut requests,
            &options,
            |_, _| {},
        )
        .unwrap()
    }

    /// Each request on its own.
    fn one_at_a_time(&self, requests: Vec<DecodeRequest>, eos: Option<u32>) -> Vec<Caption> {
        requests
            .into_iter()
            .map(|r| self.decode(vec![r], eos).remove(0))
            .collect()
    }
}

fn ids(captions: &[Caption]) -> Vec<Vec<u32>> {
    captions.iter().map(|c| c.ids.clone()).collect()
}

#[test]
fn batched_cached_and_recomputed_decoding_agree() {
    let s = setup();
    let eos = s.llm.tokenizer.special.eos;
    let greedy = SamplingParams::default();
    let batched = s.decode(s.requests(greedy, &[]), eos);
    let alone = s.one_at_a_time(s.requests(greedy, &[]), eos);
    assert_eq!(ids(&batched), ids(&alone), "batched vs one at a time");
    let lens: Vec<usize> = batched.iter().map(|c| c.ids.len()).collect();
    assert!(
        lens.iter().any(|&l| l > 2),
        "the captions are long enough to compare: {lens:?}"
    );
    // Rows finish at different steps and the others carry on.
    assert!(
        lens.windows(2).any(|w| w[0] != w[1]),
        "rows drop out at different steps: {lens:?}"
    );

    // The write-up's decoder: the whole sequence again for every token, no cache.
    for ((windows, after, max), cached) in s.clips.iter().zip(&batched) {
        let audio = Tensor::cat(
            &windows
                .iter()
                .map(|w| s.projector.forward(w).unwrap())
                .collect::<Vec<_>>(),
            1,
        )
        .unwrap();
        let prompt = sequence_embeddings(&s.llm.model, &s.before, &audio, after, &[]).unwrap();
        let mut sampler = Sampler::new(greedy).unwrap();
        let reference =
            decode_without_cache(&s.llm.model, &prompt, eos, *max, &mut sampler).unwrap();
        assert_eq!(cached.ids, reference, "cached vs no-cache decoder");
    }

    // Seeded sampling: the same seed repeats, and each row samples as it would alone.
    let sampled = SamplingParams {
        temperature: 1.0,
        top_k: Some(40),
        top_p: Some(0.95),
        seed: 5,
    };
    let a = s.decode(s.requests(sampled, &[]), eos);
    let b = s.decode(s.requests(sampled, &[]), eos);
    assert_eq!(ids(&a), ids(&b), "seeded sampling repeats");
    let alone = s.one_at_a_time(s.requests(sampled, &[]), eos);
    assert_eq!(ids(&a), ids(&alone), "sampled: batched vs one at a time");
}

#[test]
fn stop_strings_and_token_limits_end_captions() {
    let s = setup();
    let greedy = SamplingParams::default();
    // Without EOS every caption runs to its limit.
    let full = s.decode(s.requests(greedy, &[]), None);
    for (c, (_, _, max)) in full.iter().zip(&s.clips) {
        assert_eq!(c.ids.len(), *max, "{c:?}");
        assert_eq!(c.finish, Finish::MaxTokens);
    }
    // A stop string taken from the middle of the first caption ends it right before.
    let first = &full[0];
    let chars: Vec<char> = first.text.chars().collect();
    assert!(chars.len() >= 6, "caption {:?}", first.text);
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cut = first.text.find(&stop).unwrap();
    let stopped = s.decode(s.requests(greedy, std::slice::from_ref(&stop)), None);
    assert_eq!(stopped[0].finish, Finish::StopString, "{:?}", stopped[0]);
    assert_eq!(stopped[0].text, first.text[..cut], "stop {stop:?}");
    assert!(
        stopped[0].ids.len() < first.ids.len(),
        "decoding ended at the stop string: {:?}",
        stopped[0]
    );
    assert!(!stopped[0].text.contains(&stop));
    // Zero tokens allowed: nothing generated.
    let mut r = s.requests(greedy, &[]);
    r[1].max_tokens = 0;
    let out = s.decode(r, None);
    assert!(out[1].ids.is_empty() && out[1].text.is_empty());
    assert_eq!(ids(&out)[0], ids(&full)[0]);
}

/// Continuous batching on the real model: a row's next-token logits are bit for bit the
/// same alone, beside a copy of itself, and beside a longer row that pads it in front (a
/// request that joined a running batch), over contexts long enough that a matmul blocks its
/// sums (without the per-row product over real slots, the last differs). Sampling at
/// temperature 1 would otherwise pick another token now and then.
#[test]
fn a_row_decodes_the_same_alone_beside_others_and_padded_in_front() {
    let s = setup();
    let model = &s.llm.model;
    let trace = NonFiniteTrace::default();
    let real = |from: usize, to: usize| (from..to).map(Some).collect::<Vec<Option<usize>>>();
    let rest = |positions: usize, scale: f64| {
        let cfg = ProjectorConfig {
            positions,
            ..ProjectorConfig::default()
        };
        let p = Projector::new(&cfg, 384, 576, 11, &Device::Cpu).unwrap();
        let (windows, after, _) = &s.clips[0];
        let w = (&windows[0] * scale).unwrap();
        sequence_embeddings(model, &[], &project_windows(&p, &[w]).unwrap(), after, &[]).unwrap()
    };
    let short = rest(250, 1.0);
    let long = rest(750, 0.5);
    let (p, ls, ll) = (s.prefix.len(), short.dim(1).unwrap(), long.dim(1).unwrap());
    let next = model
        .embed(&Tensor::new(&[[28u32], [1127u32]], &Device::Cpu).unwrap())
        .unwrap();
    let logits_of = |t: Tensor, row: usize| -> Vec<f32> {
        t.narrow(0, row, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let prefilled = |rest: &Tensor, len: usize| {
        let mut c = s.prefix.select_rows(&[0]).unwrap();
        model
            .forward_padded(rest, &[real(0, p + len)], &mut c, trace)
            .unwrap();
        c
    };
    // Alone.
    let mut alone = prefilled(&short, ls);
    let want = logits_of(
        model
            .forward_padded(
                &next.narrow(0, 1, 1).unwrap(),
                &[real(0, p + ls + 1)],
                &mut alone,
                trace,
            )
            .unwrap(),
        0,
    );
    // Beside copies of itself, at batch sizes up to the most a server decodes together
    // (the packed kernels take up to 4 rows at once; gemm would take more than 16).
    let cs = prefilled(&short, ls);
    for b in [2, 3, 4, 5, 8, 16] {
        let copies = vec![&cs; b];
        let mut copied = KvCache::concat_rows(&copies, p + ls).unwrap();
        let slots = vec![real(0, p + ls + 1); b];
        let ids: Vec<u32> = (0..b as u32)
            .map(|i| [28, 1127][(i % 2) as usize] + i / 2)
            .collect();
        let mut ids = ids;
        ids[b - 1] = 1127;
        let next = model
            .embed(&Tensor::from_vec(ids, (b, 1), &Device::Cpu).unwrap())
            .unwrap();
        let got = logits_of(
            model
                .forward_padded(&next, &slots, &mut copied, trace)
                .unwrap(),
            b - 1,
        );
        assert!(got == want, "beside {} copies of itself", b - 1);
    }
    // Beside a longer row, padded in front.
    let cl = prefilled(&long, ll);
    let mut both = KvCache::concat_rows(&[&cl, &cs], p + ll).unwrap();
    let mut padded = vec![None; ll - ls];
    padded.extend(real(0, p + ls + 1));
    let slots = [real(0, p + ll + 1), padded];
    let got = logits_of(
        model
            .forward_padded(&next, &slots, &mut both, trace)
            .unwrap(),
        1,
    );
    assert!(got == want, "padded in front beside a longer row");
}

/// Continuous batching on the real model, sampled at temperature 1 (where any difference in
/// the logits shows as another token sooner or later): requests that join a running decode
/// loop at different steps, shorter and longer than the rows there, each get the tokens they
/// get alone.
#[test]
fn requests_joining_a_running_loop_sample_what_they_sample_alone() {
    let s = setup();
    let model = &s.llm.model;
    let eos = None;
    let options = DecodeOptions {
        tokenizer: Some(&s.llm.tokenizer),
        eos,
        trace: NonFiniteTrace::default(),
        cancelled: None,
    };
    let sampled = |seed: u64| SamplingParams {
        temperature: 1.0,
        top_k: None,
        top_p: None,
        seed,
    };
    let mut requests = s.requests(sampled(1), &[]);
    for (k, r) in requests.iter_mut().enumerate() {
        r.sampler = Sampler::new(sampled(k as u64 + 1)).unwrap();
        r.max_tokens = [40, 12, 30][k];
    }
    let alone = s.one_at_a_time(requests.clone(), eos);
    let mut batch = DecodeLoop::new();
    let mut got: Vec<Option<Vec<u32>>> = vec![None; requests.len()];
    let mut keep = |left: Vec<Left>| {
        for l in left {
            got[l.request] = Some(l.decoded.ids);
        }
    };
    // Rests of 17, 27 and 26 positions: request 2 joins a row of 23 slots (the running
    // row is padded in front), request 1 rows of 28 (it is padded).
    let join_one = |batch: &mut DecodeLoop, k: usize| {
        batch
            .join(
                model,
                &s.prefix,
                vec![(k, requests[k].clone())],
                &options,
                |_, _| {},
            )
            .unwrap()
    };
    keep(join_one(&mut batch, 0));
    for _ in 0..5 {
        keep(batch.step(model, &options, |_, _| {}).unwrap());
    }
    keep(join_one(&mut batch, 2));
    for _ in 0..2 {
        keep(batch.step(model, &options, |_, _| {}).unwrap());
    }
    keep(join_one(&mut batch, 1));
    assert_eq!(batch.len(), 3);
    while !batch.is_empty() {
        keep(batch.step(model, &options, |_, _| {}).unwrap());
    }
    for (k, a) in alone.iter().enumerate() {
        assert_eq!(got[k].as_ref(), Some(&a.ids), "request {k}");
    }
}
