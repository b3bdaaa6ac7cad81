//! Caption and ASR metrics against the values pycocoevalcap 1.2 and jiwer 4.0 produced for
//! the same items (`../shared/oracle/metrics/`, see its README): PTB tokenisation exactly;
//! BLEU-1..4, ROUGE-L and CIDEr-D within 1e-4, corpus and per item; WER and CER exactly,
//! with their edit counts, raw and normalised; plus edge cases (empty candidate, exact
//! match, no overlap, one vs many references, unicode) and `earshot eval` on a file.

use earshot::eval::metrics::{
    bleu, char_edits, cider_d, error_rate, ptb_tokenize, rouge_l, word_edits, AsrNormalization,
    EditCounts, MetricValues, Scored,
};
use earshot_tests::*;
use serde_json::Value;

fn oracle() -> (Value, Value) {
    let dir = oracle_dir().join("metrics");
    let read = |f: &str| -> Value {
        let p = dir.join(f);
        let text = std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e} (the metrics oracle is required)", p.display()));
        serde_json::from_str(&text).unwrap()
    };
    (read("metrics_case.json"), read("metrics_expected.json"))
}

fn check(name: &str, got: &MetricValues, expected: &Value, ids: &[String]) {
    let want = expected["corpus"].as_f64().unwrap();
    assert!(
        (got.corpus - want).abs() < 1e-4,
        "{name} corpus: {} vs {want}",
        got.corpus
    );
    for (i, id) in ids.iter().enumerate() {
        let want = expected["per_item"][id].as_f64().unwrap();
        assert!(
            (got.per_example[i] - want).abs() < 1e-4,
            "{name} {id}: {} vs {want}",
            got.per_example[i]
        );
    }
}

#[test]
fn caption_metrics_match_pycocoevalcap() {
    let (case, expected) = oracle();
    let items = case["captions"].as_array().unwrap();
    let ids: Vec<String> = items
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    let tokenized: Vec<(String, Vec<String>)> = items
        .iter()
        .map(|i| {
            let refs = i["references"].as_array().unwrap();
            (
                ptb_tokenize(i["candidate"].as_str().unwrap()),
                refs.iter()
                    .map(|r| ptb_tokenize(r.as_str().unwrap()))
                    .collect(),
            )
        })
        .collect();
    for (id, (cand, refs)) in ids.iter().zip(&tokenized) {
        let want = &expected["ptb_tokenized"][id];
        assert_eq!(cand, want["candidate"].as_str().unwrap(), "{id} candidate");
        let want_refs: Vec<&str> = want["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        assert_eq!(refs, &want_refs, "{id} references");
    }
    let scored: Vec<Scored> = tokenized
        .iter()
        .map(|(c, r)| Scored {
            candidate: c,
            references: r,
        })
        .collect();
    let ptb = &expected["ptb"];
    let b = bleu(&scored);
    for (k, name) in ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4"].iter().enumerate() {
        check(name, &b[k], &ptb[name], &ids);
    }
    check("ROUGE_L", &rouge_l(&scored), &ptb["ROUGE_L"], &ids);
    check("CIDEr", &cider_d(&scored), &ptb["CIDEr"], &ids);
}

#[test]
fn wer_and_cer_match_jiwer() {
    let (case, expected) = oracle();
    let asr = &expected["asr"];
    let pairs: Vec<(String, String, String)> = case["asr"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                p["reference"].as_str().unwrap().to_string(),
                p["hypothesis"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let refs: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(_, r, h)| (r.as_str(), h.as_str()))
        .collect();
    for (norm, suffix) in [
        (AsrNormalization::Raw, "raw"),
        (AsrNormalization::Normalized, "norm"),
    ] {
        for (unit, edits) in [
            (
                "wer",
                word_edits as fn(&str, &str, AsrNormalization) -> EditCounts,
            ),
            ("cer", char_edits),
        ] {
            let key = format!("{unit}_{suffix}");
            let (values, counts) = error_rate(&refs, edits, norm);
            assert_eq!(
                values.corpus,
                asr["corpus"][&key].as_f64().unwrap(),
                "{key} corpus"
            );
            for (i, (id, _, _)) in pairs.iter().enumerate() {
                let want = &asr["per_pair"][id];
                assert_eq!(
                    values.per_example[i],
                    want[&key].as_f64().unwrap(),
                    "{key} {id}"
                );
                let c = &want[format!("{key}_counts")];
                let want_counts = EditCounts {
                    hits: c["hits"].as_u64().unwrap() as usize,
                    substitutions: c["substitutions"].as_u64().unwrap() as usize,
                    deletions: c["deletions"].as_u64().unwrap() as usize,
                    insertions: c["insertions"].as_u64().unwrap() as usize,
                };
                assert_eq!(counts[i], want_counts, "{key} {id} counts");
            }
        }
    }
}

#[test]
fn edge_cases_give_the_defined_values() {
    let refs = vec!["a dog barks loudly".to_string()];
    let score = |cand: &str, refs: &[String]| {
        let items = [Scored {
            candidate: cand,
            references: refs,
        }];
        (
            bleu(&items)[3].per_example[0],
            rouge_l(&items).per_example[0],
            cider_d(&items).per_example[0],
        )
    };
    // An empty candidate scores 0 everywhere (no division by zero, no NaN).
    let (b, r, c) = score("", &refs);
    assert!(b.abs() < 1e-9 && r == 0.0 && c == 0.0, "{b} {r} {c}");
    // Equal to the reference: BLEU ~1, ROUGE-L 1. (CIDEr-D of a single item is 0: its idf
    // is log(1) = 0.)
    let (b, r, _) = score("a dog barks loudly", &refs);
    assert!((b - 1.0).abs() < 1e-6 && (r - 1.0).abs() < 1e-12, "{b} {r}");
    // No overlap: 0.
    let (b, r, c) = score("piano music", &refs);
    assert!(b < 1e-9 && r == 0.0 && c == 0.0);
    // Many references: the best-matching one counts for ROUGE-L.
    let many = vec!["a cat meows".to_string(), "a dog barks loudly".to_string()];
    assert_eq!(score("a dog barks loudly", &many).1, 1.0);
    // Unicode: lower-cased, punctuation split off, letters kept.
    assert_eq!(
        ptb_tokenize("Éclair «Über» café, naïve!"),
        "éclair über café naïve"
    );
    assert_eq!(
        ptb_tokenize("It's a dog's life; don't stop."),
        "it 's a dog 's life do n't stop"
    );
    assert_eq!(
        word_edits(
            "Ça va, très bien.",
            "ça va très bien",
            AsrNormalization::Normalized
        )
        .errors(),
        0
    );
    // WER of an empty reference and hypothesis is 0, not NaN.
    let (v, _) = error_rate(&[("", "")], word_edits, AsrNormalization::Raw);
    assert_eq!(v.corpus, 0.0);
}

#[test]
fn eval_scores_a_predictions_file_from_the_cli() {
    let (case, expected) = oracle();
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("predictions.jsonl");
    let mut lines: Vec<String> = case["captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            serde_json::json!({
                "id": i["id"], "audio": "x.wav", "caption": i["candidate"],
                "references": i["references"], "tokens": 3, "seconds": 0.1
            })
            .to_string()
        })
        .collect();
    lines.push(r#"{"id":"bad","audio":"bad.wav","error":"cannot decode"}"#.into());
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let out = expect_success(&earshot([
        "eval".as_ref(),
        "--predictions".as_ref(),
        file.as_os_str(),
        "--json".as_ref(),
    ]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["examples"], 6);
    assert_eq!(v["failed"], 1);
    let want = |m: &str| expected["ptb"][m]["corpus"].as_f64().unwrap();
    for (key, name) in [
        ("bleu_1", "BLEU_1"),
        ("bleu_4", "BLEU_4"),
        ("rouge_l", "ROUGE_L"),
        ("cider_d", "CIDEr"),
    ] {
        let got = v["scores"][key].as_f64().unwrap();
        assert!(
            (got - want(name)).abs() < 1e-4,
            "{key}: {got} vs {}",
            want(name)
        );
    }
    assert_eq!(v["per_example"].as_array().unwrap().len(), 6);
    assert_eq!(v["per_example"][0]["exact_match"], true);
    // The table for people, and a clear error for a file that is not predictions.
    let table = expect_success(&earshot([
        "eval".as_ref(),
        "--predictions".as_ref(),
        file.as_os_str(),
    ]));
    assert!(
        table.contains("CIDEr-D") && table.contains("1 failed"),
        "{table}"
    );
    std::fs::write(&file, "{\"caption\": \"x\"}\n").unwrap();
    let err = expect_failure(&earshot([
        "eval".as_ref(),
        "--predictions".as_ref(),
        file.as_os_str(),
    ]));
    assert!(
        err.contains("line 1") && err.contains("references"),
        "{err}"
    );
}
