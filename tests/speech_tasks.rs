//! The two speech tasks, end to end through the CLI at a small size, with their shipped
//! configs: plugins only (the tuxpaint-stamps adapter, chatml, text-normalize), real speech
//! from tuxpaint-stamps-default. Each trains until it has learned a few clips, shows that it
//! learned them from the audio (the learning check of issue #25: real audio beats silence,
//! shuffled audio and the label-only baselines on the clips trained on), then scores its
//! test split. Their full-size results come from scripts/bench_tasks.sh (BENCHMARKS.md).

use earshot_tests::*;

const LANGUAGES: [&str; 9] = [
    "French",
    "Russian",
    "Romanian",
    "Catalan",
    "Bulgarian",
    "Spanish",
    "Belarusian",
    "Greek",
    "Danish",
];

/// A short schedule with a higher rate: enough to learn 9 clips, or 4 transcripts.
fn learning_sets(options: &str, more: &[&str]) -> Vec<String> {
    let mut sets = vec![
        format!("data.options={options:?}"),
        r#"data.valid-split="train""#.to_string(),
        "train.lr=5e-3".to_string(),
        "train.min-lr=5e-4".to_string(),
        "train.warmup-steps=5".to_string(),
    ];
    sets.extend(more.iter().map(|s| s.to_string()));
    sets
}

#[test]
fn speaker_traits_config_learns_and_scores_the_language() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let config = repo_root().join("configs/cpu-smollm2-speaker-traits.toml");
    // One clip per language to train on, one held out in test.
    let options = r#"{"caption": "Spoken in {language}.", "languages": ["fr", "ru", "ro", "ca", "bg", "es", "be", "el", "da"], "max_per_language": 1}"#;
    let sets = learning_sets(options, &[]);
    // One run on this machine kind: training loss 0.02 at step 20 (4 languages, 8 clips).
    train_run(&config, &run, 30, &sets);

    // Learned from the audio: 9 clips in 9 languages, so a caption that does not follow the
    // audio names the right language of about 1 clip in 9.
    let (v, _) = eval_run(&config, &run, &sets, Some("train"));
    assert_eq!(v["examples"], 9, "{v:.2000}");
    assert_learned(&v, "language", 0.75, 0.5);

    let (v, _) = eval_run(&config, &run, &sets, None);
    assert_eq!(v["examples"], 9, "{v:.2000}");
    let language = &v["attributes"]["language"];
    assert_eq!(language["examples"], 9, "{language}");
    let expected: Vec<&str> = language["confusion"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut all = LANGUAGES.to_vec();
    all.sort();
    assert_eq!(expected, all, "one test clip per language");
    for ex in v["per_example"].as_array().unwrap() {
        let l = ex["attributes"]["language"]["expected"].as_str().unwrap();
        assert_eq!(ex["references"][0], format!("Spoken in {l}."), "{ex}");
    }
    assert!(v["listening_check"]["silence_loss"].as_f64().unwrap() > 0.0);
}

#[test]
fn transcription_config_learns_and_scores_wer_and_cer_on_normalised_text() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let config = repo_root().join("configs/cpu-smollm2-transcribe-fr.toml");
    let options = r#"{"languages": ["fr"], "max_per_language": 4, "max_eval_per_language": 2}"#;
    let sets = learning_sets(options, &["train.batch-size=4"]);
    // One run on this machine kind: training loss 0.10 at step 30, 0.02 at step 35.
    train_run(&config, &run, 50, &sets);

    // Learned from the audio: the 4 transcripts are reproduced (CER <= 0.25), and silence,
    // shuffled audio and the most common training transcript are at least 0.4 worse.
    let (v, _) = eval_run(&config, &run, &sets, Some("train"));
    assert_eq!(v["examples"], 4, "{v:.2000}");
    assert_learned(&v, "cer", 0.75, 0.4);

    let (v, _) = eval_run(&config, &run, &sets, None);
    assert_eq!(v["examples"], 2, "{v:.2000}");
    for key in ["wer", "cer"] {
        let x = v["scores"][key].as_f64().unwrap();
        assert!(x >= 0.0 && x.is_finite(), "{key}: {x}");
    }
    for ex in v["per_example"].as_array().unwrap() {
        // The post-processor's output: lower case, no punctuation, single spaces.
        let caption = ex["caption"].as_str().unwrap();
        assert!(
            !caption
                .chars()
                .any(|c| c.is_uppercase() || c.is_ascii_punctuation())
                && !caption.contains("  ")
                && caption == caption.trim(),
            "{caption:?}"
        );
        // References are the French transcripts as written.
        let reference = ex["references"][0].as_str().unwrap();
        assert!(!reference.is_empty(), "{ex}");
    }
}
