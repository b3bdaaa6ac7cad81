//! Captioning in process through the library `Captioner`, on the real default models with a
//! fresh (untrained) projector: the tokens are gibberish, but every way of batching must give
//! the same gibberish. A batch that mixes prompts (the text before the audio differs, so the
//! items need different prefix caches) gives each item what it gets alone, in input order; a
//! failing item fails alone; a long clip is captioned per 30 s window (each window as it is
//! alone) or as one concatenated caption, and the second pass takes every window from the
//! encoder cache without computing a mel.

use std::path::PathBuf;

use earshot::audio::Segment;
use earshot::caption::{
    CaptionEvent, CaptionItem, CaptionSettings, Captioner, ItemResult, LongAudio,
};
use earshot::config::RunConfig;
use earshot_tests::*;

fn captioner(dir: &std::path::Path) -> Captioner {
    test_home();
    let cfg = write_run_config(dir, &repo_root().join("configs/data/tones"), "seed = 3");
    Captioner::load(RunConfig::load(&cfg, &[]).unwrap(), None, false).unwrap()
}

fn clip(name: &str) -> PathBuf {
    repo_root().join("configs/data/tones/clips").join(name)
}

fn with_instruction(path: PathBuf, instruction: &str) -> CaptionItem {
    let mut item = CaptionItem::file(path);
    item.metadata = vec![("instruction".into(), instruction.into())];
    item
}

fn texts(results: &[ItemResult]) -> Vec<Result<Vec<(String, usize)>, String>> {
    results
        .iter()
        .map(|r| {
            r.as_ref()
                .map(|cs| cs.iter().map(|c| (c.raw.clone(), c.tokens)).collect())
                .map_err(Clone::clone)
        })
        .collect()
}

fn settings(batch_size: usize, long_audio: LongAudio) -> CaptionSettings {
    CaptionSettings {
        max_tokens: 10,
        batch_size,
        long_audio,
        ..CaptionSettings::default()
    }
}

#[test]
fn a_batch_of_mixed_prompts_gives_each_item_what_it_gets_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = captioner(dir.path());
    let items = || {
        vec![
            CaptionItem::file(clip("one.wav")),
            with_instruction(clip("two.wav"), "Name the pitch of this tone"),
            CaptionItem::file(clip("three.wav")),
            CaptionItem::file(dir.path().join("missing.wav")),
            with_instruction(clip("four.wav"), "What do you hear?"),
            with_instruction(clip("five.wav"), "Name the pitch of this tone"),
        ]
    };
    let batch = items();
    let mut started = Vec::new();
    let mut finished = Vec::new();
    let together = c
        .caption(
            &batch,
            &settings(8, LongAudio::PerWindow),
            false,
            &mut |e| match e {
                CaptionEvent::Started { item, .. } => started.push(item),
                CaptionEvent::Finished { item, result } => {
                    assert!(result.is_ok(), "{result:?}");
                    finished.push(item)
                }
                CaptionEvent::Partial { .. } => panic!("no partial text unless one at a time"),
            },
        )
        .unwrap();
    assert_eq!(together.len(), 6);
    // The missing file fails alone, named in its error.
    let err = together[3].as_ref().unwrap_err();
    assert!(err.contains("missing.wav"), "{err}");
    started.sort();
    finished.sort();
    assert_eq!(started, vec![0, 1, 2, 4, 5]);
    assert_eq!(finished, started);

    // Each item alone (a batch of one, its own call) gives the same tokens.
    for (k, item) in items().into_iter().enumerate() {
        let alone = c
            .caption(
                &[item],
                &settings(1, LongAudio::PerWindow),
                false,
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(texts(&alone)[0], texts(&together)[k], "item {k}");
    }
    let ok = texts(&together);
    let first = ok[0].as_ref().unwrap();
    assert!(first[0].1 > 0, "tokens were generated: {ok:?}");
    // The prompt matters: the same clip under another instruction decodes differently.
    let other = c
        .caption(
            &[with_instruction(clip("one.wav"), "What do you hear?")],
            &settings(1, LongAudio::PerWindow),
            false,
            &mut |_| {},
        )
        .unwrap();
    assert_ne!(texts(&other)[0], ok[0], "the instruction reaches the LLM");

    // One at a time streams partial text that grows into the raw caption.
    let mut partial: Vec<String> = Vec::new();
    let streamed = c
        .caption(
            &items()[..1],
            &settings(8, LongAudio::PerWindow),
            true,
            &mut |e| {
                if let CaptionEvent::Partial { text, .. } = e {
                    partial.push(text.to_string());
                }
            },
        )
        .unwrap();
    assert_eq!(texts(&streamed)[0], ok[0]);
    assert_eq!(partial.last(), Some(&first[0].0));
}

#[test]
fn a_long_clip_is_captioned_per_window_or_concatenated_and_reuses_the_encoder_cache() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = captioner(dir.path());
    // 65 s of real recordings: the eight tones, over and over.
    let mut tones = Vec::new();
    for name in [
        "one", "two", "three", "four", "five", "six", "seven", "eight",
    ] {
        let path = clip(&format!("{name}.wav"));
        tones.extend(earshot::audio::load_16k_mono(&path, Segment::whole()).unwrap());
    }
    // At a gain no earlier run used, so that the first pass finds nothing in the cache.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let gain = 0.5 + (nanos % 100_000) as f32 / 400_000.0;
    let samples: Vec<f32> = tones
        .iter()
        .map(|s| s * gain)
        .cycle()
        .take(65 * 16_000)
        .collect();
    let long = || CaptionItem::samples("long", samples.clone(), Vec::new());

    let before = c.encode_counts();
    let per_window = c
        .caption(
            &[long()],
            &settings(8, LongAudio::PerWindow),
            false,
            &mut |_| {},
        )
        .unwrap();
    let windows = per_window[0].as_ref().unwrap();
    let spans: Vec<_> = windows.iter().map(|w| w.span.unwrap()).collect();
    assert_eq!(spans, vec![(0.0, 30.0), (30.0, 60.0), (60.0, 65.0)]);
    let counts = c.encode_counts();
    assert_eq!(counts.mel_windows - before.mel_windows, 3);

    // Each window's caption is that window's audio captioned alone.
    for (w, start) in [0usize, 30, 60].into_iter().enumerate() {
        let end = (start + 30).min(65) * 16_000;
        let part = CaptionItem::samples("part", samples[start * 16_000..end].to_vec(), Vec::new());
        let alone = c
            .caption(
                &[part],
                &settings(1, LongAudio::PerWindow),
                false,
                &mut |_| {},
            )
            .unwrap();
        let alone = &alone[0].as_ref().unwrap()[0];
        assert_eq!(alone.raw, windows[w].raw, "window {w}");
        assert_eq!(alone.tokens, windows[w].tokens, "window {w}");
    }

    // Concatenated: one caption over all three windows; the windows come from the cache
    // (no mel, no encoder).
    let counts = c.encode_counts();
    let concat = c
        .caption(
            &[long()],
            &settings(8, LongAudio::Concat),
            false,
            &mut |_| {},
        )
        .unwrap();
    let one = concat[0].as_ref().unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].span, None);
    assert!(one[0].tokens > 0);
    let after = c.encode_counts();
    assert_eq!(
        after.mel_windows, counts.mel_windows,
        "a cache hit computes no mel"
    );
    assert_eq!(
        after.encoder_runs, counts.encoder_runs,
        "nor runs the encoder"
    );
    assert_eq!(after.cache_hits - counts.cache_hits, 3);
}

#[test]
fn an_example_decoded_in_place_captions_the_same_from_the_encoder_cache() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = captioner(dir.path());
    let root = repo_root().join("configs/data/tones");
    // A segment of a real clip: the segment is part of the encoder cache key.
    let example = earshot::plugins::Example {
        id: "three-part".into(),
        audio: earshot::plugins::AudioSource::Path("clips/three.wav".into()),
        start_s: Some(0.1),
        end_s: Some(0.6),
        target: Some("three".into()),
        references: Vec::new(),
        metadata: Vec::new(),
    };
    let item = || CaptionItem::example(example.clone(), &root);
    let s = settings(1, LongAudio::PerWindow);
    let from_file = c.caption(&[item()], &s, false, &mut |_| {}).unwrap();

    let mut decoded = [item()];
    c.decode_in_place(&mut decoded);
    let samples = match &decoded[0].input {
        earshot::caption::AudioInput::Decoded { samples, span } => {
            assert_eq!(*span, (Some(0.1), Some(0.6)));
            samples.clone()
        }
        _ => panic!("not decoded in place"),
    };
    assert_eq!(samples.len(), 8000, "0.5 s at 16 kHz");
    let before = c.encode_counts();
    let again = c.caption(&decoded, &s, false, &mut |_| {}).unwrap();
    assert_eq!(texts(&again), texts(&from_file));
    let after = c.encode_counts();
    assert_eq!(after.mel_windows, before.mel_windows, "no mel: a cache hit");
    assert_eq!(after.cache_hits - before.cache_hits, 1);

    // An item whose audio cannot be read stays as it is, and captioning reports it.
    let mut missing = [CaptionItem::file(dir.path().join("missing.wav"))];
    c.decode_in_place(&mut missing);
    assert!(matches!(
        missing[0].input,
        earshot::caption::AudioInput::File(_)
    ));
    let failed = c.caption(&missing, &s, false, &mut |_| {}).unwrap();
    assert!(failed[0].as_ref().unwrap_err().contains("missing.wav"));
}
