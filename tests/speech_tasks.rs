//! The two speech tasks, end to end through the CLI at a small size, with their shipped
//! configs: plugins only (the tuxpaint-stamps adapter, chatml, text-normalize), real speech
//! from tuxpaint-stamps-default. Their full-size results are in BENCHMARKS.md.

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

#[test]
fn speaker_traits_config_scores_the_language() {
    let tmp = tempfile::tempdir().unwrap();
    let config = repo_root().join("configs/cpu-smollm2-speaker-traits.toml");
    // Two clips per language to train on, one held out.
    let sets = [r#"data.options="{\"caption\": \"Spoken in {language}.\", \"languages\": [\"fr\", \"ru\", \"ro\", \"ca\", \"bg\", \"es\", \"be\", \"el\", \"da\"], \"max_per_language\": 2, \"max_eval_per_language\": 1}""#.to_string()];
    let (v, _) = train_then_eval(&config, &tmp.path().join("run"), 6, &sets);
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
    assert_eq!(expected, all, "one held-out clip per language");
    for ex in v["per_example"].as_array().unwrap() {
        let l = ex["attributes"]["language"]["expected"].as_str().unwrap();
        assert_eq!(ex["references"][0], format!("Spoken in {l}."), "{ex}");
    }
    assert!(v["listening_check"]["silence_loss"].as_f64().unwrap() > 0.0);
}

#[test]
fn transcription_config_scores_wer_and_cer_on_normalised_text() {
    let tmp = tempfile::tempdir().unwrap();
    let config = repo_root().join("configs/cpu-smollm2-transcribe-fr.toml");
    let sets = [
        r#"data.options="{\"languages\": [\"fr\"], \"max_per_language\": 8, \"max_eval_per_language\": 4}""#
            .to_string(),
    ];
    let (v, _) = train_then_eval(&config, &tmp.path().join("run"), 6, &sets);
    assert_eq!(v["examples"], 4, "{v:.2000}");
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
