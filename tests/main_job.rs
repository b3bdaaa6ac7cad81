//! The main job (README command 1, scripts/demo.sh) at a small size: the shipped soundfont
//! config trains on real FluidR3 GM notes and `earshot eval` captions the held-out presets,
//! scores family and register, runs the listening check and writes the report in the run
//! folder. The full size (accuracy targets) is measured in BENCHMARKS.md, not here: it takes
//! ~12 minutes.

use earshot_tests::*;

#[test]
fn soundfont_config_trains_evaluates_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let config = repo_root().join("configs/cpu-smollm2-soundfont.toml");
    // Two recordings per family and split: 16 train, 16 eval.
    let sets =
        [r#"data.options="{\"file\": \"FluidR3_GM.sf2\", \"max_per_family\": 2}""#.to_string()];
    let (v, stderr) = train_then_eval(&config, &run, 12, &sets);
    assert_eq!(v["examples"], 16, "{v:.2000}");
    for attribute in ["family", "register"] {
        let a = &v["attributes"][attribute];
        assert_eq!(a["examples"], 16, "{attribute}: {a}");
        let accuracy = a["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&accuracy), "{attribute}: {a}");
        for hearing in ["silence", "shuffled"] {
            assert_eq!(
                v["listening_check"][hearing]["attributes"][attribute]["examples"], 16,
                "{hearing}"
            );
        }
    }
    // The loss `eval` computes is the one training computed on the same split and projector
    // (two code paths: the training session's eval, the listening check's).
    let eval_lines = std::fs::read_to_string(run.join("eval.jsonl")).unwrap();
    let last: serde_json::Value =
        serde_json::from_str(eval_lines.lines().last().expect("an eval at the end")).unwrap();
    let trained = last["eval_loss"].as_f64().unwrap();
    let measured = v["eval_loss"].as_f64().unwrap();
    assert!(
        (trained - measured).abs() < 1e-4,
        "eval loss {measured} vs training's {trained}"
    );
    for hearing in ["real_loss", "silence_loss", "shuffled_loss"] {
        let l = v["listening_check"][hearing].as_f64().unwrap();
        assert!(l.is_finite() && l > 0.0, "{hearing}: {l}");
    }
    // Every example is a held-out preset's note, scored against its caption template.
    for ex in v["per_example"].as_array().unwrap() {
        let family = ex["attributes"]["family"]["expected"].as_str().unwrap();
        let register = ex["attributes"]["register"]["expected"].as_str().unwrap();
        assert_eq!(
            ex["references"][0],
            format!("A {family} note in the {register} register."),
            "{ex}"
        );
    }
    let report = run.join("report.html");
    assert!(
        stderr.contains(&format!("report: {}", report.display())),
        "{stderr}"
    );
    let html = std::fs::read_to_string(&report).unwrap();
    assert_eq!(html.matches("<tr class=\"example\">").count(), 16);
    assert_eq!(html.matches("<audio controls").count(), 16);
    assert!(html.contains("data-attribute=\"family\""));
    assert!(html.contains("data-attribute=\"register\""));
}
