//! The learning test on the real default models: overfitting 8 short clips with distinct
//! targets drives the training loss from > 3 to < 0.5, through `earshot train`, and greedy
//! captions of the clips then reproduce their targets.

use std::path::Path;

use earshot::caption::{CaptionSettings, Captioner, ItemSource};
use earshot::config::RunConfig;
use earshot_tests::*;

const NAMES: [&str; 8] = [
    "one", "two", "three", "four", "five", "six", "seven", "eight",
];

/// 8 one-second tones, each with its own pitch and on/off rhythm, and a jsonl dataset.
fn make_dataset(root: &Path) {
    std::fs::create_dir_all(root.join("clips")).unwrap();
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut lines = String::new();
    for (i, name) in NAMES.iter().enumerate() {
        let freq = [220.0, 330.0, 440.0, 550.0, 660.0, 880.0, 1100.0, 1320.0][i];
        let mut w = hound::WavWriter::create(root.join(format!("clips/{name}.wav")), spec).unwrap();
        for t in 0..16000u32 {
            let on = (t / (800 * (i as u32 + 1))).is_multiple_of(2);
            let v = 12000.0
                * (2.0 * std::f64::consts::PI * freq * t as f64 / 16000.0).sin()
                * if on { 1.0 } else { 0.2 };
            w.write_sample(v as i16).unwrap();
        }
        w.finalize().unwrap();
        lines.push_str(&format!(
            "{{\"id\": \"{name}\", \"audio\": \"clips/{name}.wav\", \"text\": \"Tone number {name}.\", \"number\": \"{name}\"}}\n"
        ));
    }
    std::fs::write(root.join("train.jsonl"), lines).unwrap();
}

fn write_config(dir: &Path, steps: usize) -> std::path::PathBuf {
    let train = format!(
        "steps = {steps}\nbatch-size = 4\nlr = 5e-3\nbeta1 = 0.9\nlog-every = 5\nrun-dir = \"run\""
    );
    write_run_config(dir, Path::new("data"), &train)
}

/// Steps of the overfitting run: the 220 Hz and 330 Hz clips take the longest to tell apart
/// (at 50 steps one run still captioned "two" as "one", with a training loss of 0.02).
const STEPS: usize = 70;

#[test]
fn overfitting_eight_clips_learns_their_captions() {
    let d = tempfile::tempdir().unwrap();
    make_dataset(&d.path().join("data"));
    let cfg_path = write_config(d.path(), STEPS);
    let out = earshot(["train".as_ref(), cfg_path.as_os_str()]);
    let stdout = expect_success(&out);
    assert!(
        stdout.contains(&format!("trained to step {STEPS}")),
        "{stdout}"
    );

    let metrics: Vec<serde_json::Value> =
        std::fs::read_to_string(d.path().join("run/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(metrics.len(), STEPS);
    let loss = |i: usize| metrics[i]["loss"].as_f64().unwrap();
    assert!(loss(0) > 3.0, "initial loss {}", loss(0));
    let final_loss = loss(STEPS - 1);
    assert!(
        final_loss < 0.5,
        "final loss {final_loss}; losses: {:?}",
        (0..STEPS).map(loss).collect::<Vec<_>>()
    );
    for m in &metrics {
        let ratios = m["update_ratio_log10"].as_object().unwrap();
        assert_eq!(
            ratios.len(),
            3,
            "every projector tensor is updated every step: {m}"
        );
    }

    // Greedy captions of the training clips reproduce their targets, captioned in process
    // through the library `Captioner` (the CLI below goes through the same type).
    let config = RunConfig::load(&cfg_path, &[]).unwrap();
    let mut captioner = Captioner::load(config, Some(&d.path().join("run")), false).unwrap();
    let mut dataset = captioner.open_dataset("train").unwrap();
    let root = captioner.config.data.root.clone();
    let items = ItemSource::Split {
        pages: dataset.pages("train", 256),
        root,
    }
    .next_chunk(64)
    .unwrap();
    assert_eq!(items.len(), 8);
    let settings = CaptionSettings {
        max_tokens: 12,
        ..CaptionSettings::default()
    };
    let results = captioner
        .caption(&items, &settings, false, &mut |_| {})
        .unwrap();
    let mut right = 0;
    let mut report = Vec::new();
    for (item, result) in items.iter().zip(&results) {
        let text = &result.as_ref().unwrap()[0].text;
        let expected = format!("Tone number {}.", item.id);
        if text.trim() == expected {
            right += 1;
        }
        report.push(format!("{}: {text:?}", item.id));
    }
    assert_eq!(
        right, 8,
        "{right}/8 captions reproduce their targets: {report:#?}"
    );

    // The same through `earshot caption --split`.
    let ckpt = d.path().join("run/projector.safetensors");
    let caption = |extra: &[&std::ffi::OsStr]| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "caption".as_ref(),
            "--config".as_ref(),
            cfg_path.as_os_str(),
            "--checkpoint".as_ref(),
            ckpt.as_os_str(),
        ];
        args.extend_from_slice(extra);
        earshot(args)
    };
    let out = caption(&["--split".as_ref(), "train".as_ref()]);
    let lines: Vec<serde_json::Value> = expect_success(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 8);
    for v in &lines {
        assert_eq!(v["caption"], v["references"][0], "{v}");
    }
    check_eval(d.path(), &cfg_path, &ckpt);
    // Seeded sampling is deterministic.
    let clip = d.path().join("data/clips/five.wav");
    let sampled = |seed: &str| {
        expect_success(&caption(&[
            clip.as_os_str(),
            "--temperature".as_ref(),
            "1.5".as_ref(),
            "--seed".as_ref(),
            seed.as_ref(),
        ]))
    };
    assert_eq!(sampled("3"), sampled("3"));
    // One bad input: an error line for it, the others captioned, exit 3 (partial failure)
    // with a count; every input failing is a failed run (exit 1).
    let missing = d.path().join("data/clips/missing.wav");
    let out = caption(&[clip.as_os_str(), missing.as_os_str()]);
    let err = expect_exit(&out, EXIT_PARTIAL);
    assert!(
        err.contains("missing.wav") && err.contains("1 of 2 input(s) failed"),
        "{err}"
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["caption"], "Tone number five.");
    assert!(lines[1]["error"].as_str().unwrap().contains("missing.wav"));
    let out = caption(&[missing.as_os_str(), missing.as_os_str()]);
    let err = expect_failure(&out);
    assert!(err.contains("all 2 input(s) failed"), "{err}");

    check_caption_cli(d.path(), &caption);
}

/// Batches, long audio, token limits and terminal streaming through `earshot caption`, with
/// the trained projector.
fn check_caption_cli(dir: &Path, caption: &dyn Fn(&[&std::ffi::OsStr]) -> std::process::Output) {
    let data = dir.join("data");
    // 40 s: "two" and 29 s of silence, then "seven" and 9 s of silence: each window looks
    // like a training clip.
    let long = dir.join("long.wav");
    {
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let read = |n: &str| -> Vec<i16> {
            hound::WavReader::open(data.join(format!("clips/{n}.wav")))
                .unwrap()
                .into_samples::<i16>()
                .map(|s| s.unwrap())
                .collect()
        };
        let mut w = hound::WavWriter::create(&long, spec).unwrap();
        for (name, silence) in [("two", 29), ("seven", 9)] {
            for s in read(name) {
                w.write_sample(s).unwrap();
            }
            for _ in 0..silence * 16000 {
                w.write_sample(0i16).unwrap();
            }
        }
        w.finalize().unwrap();
    }
    let clips: Vec<std::path::PathBuf> = ["three", "one", "eight"]
        .iter()
        .map(|n| data.join(format!("clips/{n}.wav")))
        .collect();
    let json_lines = |out: &std::process::Output| -> Vec<serde_json::Value> {
        expect_success(out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let run = |extra: &[&str], files: &[&Path]| {
        let mut args: Vec<&std::ffi::OsStr> = vec!["--jsonl".as_ref()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        args.extend(files.iter().map(|p| p.as_os_str()));
        json_lines(&caption(&args))
    };
    let mut files: Vec<&Path> = clips.iter().map(|p| p.as_path()).collect();
    files.insert(1, long.as_path());

    // Per window: the long file gives two captions with their spans.
    let per_window = run(&["--batch-size", "8"], &files);
    let spans: Vec<(String, f64, f64)> = per_window
        .iter()
        .map(|v| {
            (
                v["caption"].as_str().unwrap().to_string(),
                v["start_s"].as_f64().unwrap(),
                v["end_s"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(spans.len(), 5, "{per_window:#?}");
    assert_eq!(spans[0].0, "Tone number three.");
    assert_eq!(spans[1], ("Tone number two.".to_string(), 0.0, 30.0));
    assert_eq!(spans[2], ("Tone number seven.".to_string(), 30.0, 40.0));
    assert_eq!(spans[4].0, "Tone number eight.");

    // Concatenated windows: one caption per file; its prompt is longer than the others', so
    // the batch is padded. Batched and one-at-a-time decoding agree.
    let concat = ["--long-audio", "concat"];
    let batched = run(&[&concat[..], &["--batch-size", "4"]].concat(), &files);
    let single = run(&[&concat[..], &["--batch-size", "1"]].concat(), &files);
    assert_eq!(batched.len(), 4);
    for (a, b) in batched.iter().zip(&single) {
        assert_eq!(a["caption"], b["caption"], "{a} vs {b}");
        assert_eq!(a["tokens"], b["tokens"]);
        assert!(a.get("start_s").is_none(), "{a}");
    }
    assert_eq!(batched[0]["caption"], "Tone number three.");

    // The token limit.
    let limited = run(&["--max-tokens", "2"], &files[..1]);
    assert_eq!(limited[0]["tokens"], 2);
    let text = limited[0]["caption"].as_str().unwrap();
    assert!(
        !text.is_empty()
            && "Tone number three."
                .strip_prefix(text)
                .is_some_and(|r| r.len() > 2),
        "two tokens of the caption: {text:?}"
    );

    // A terminal gets the raw caption streamed as it is generated, then the post-processed
    // caption in its place (a post-processor that upper-cases makes the two differ).
    let script = std::process::Command::new("script")
        .arg("--version")
        .output()
        .expect("the streaming test needs `script` (util-linux) for a pseudo-terminal");
    assert!(script.status.success());
    let shout = plugin_dir("tests/plugins").join("shout_post_processor.wasm");
    let on_terminal = |post: Option<&Path>| {
        let mut cmd = format!(
            "{} caption --config {} --checkpoint {}",
            earshot_bin().display(),
            dir.join("run.toml").display(),
            dir.join("run/projector.safetensors").display(),
        );
        if let Some(p) = post {
            cmd.push_str(&format!(" --set plugins.post-processor={}", p.display()));
        }
        cmd.push_str(&format!(" {}", clips[0].display()));
        let tty = std::process::Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .output()
            .unwrap();
        assert!(tty.status.success(), "{tty:?}");
        String::from_utf8_lossy(&tty.stdout).to_string()
    };
    let plain = on_terminal(None);
    assert_eq!(plain.trim_end(), "Tone number three.", "{plain:?}");
    let screen = on_terminal(Some(&shout));
    let (streamed, after_clear) = screen
        .split_once("\x1b[2K")
        .unwrap_or_else(|| panic!("the streamed line is cleared: {screen:?}"));
    assert!(streamed.contains("Tone number three."), "{screen:?}");
    assert!(
        after_clear.trim_end().ends_with("TONE NUMBER THREE."),
        "{screen:?}"
    );
}

/// `earshot eval` on the trained run: the training clips' captions match their targets, each
/// names the number in its metadata, and the listening check sees the model use the audio
/// (with silence every caption is the same, with shuffled audio each names another clip's
/// number); the saved predictions score the same through `--predictions`.
fn check_eval(dir: &Path, cfg: &Path, ckpt: &Path) {
    let numbers = format!("number={}", NAMES.join(","));
    let saved = dir.join("predictions.jsonl");
    // `eval --config` on the training split with the tones' attribute, then `rest`.
    let eval_train = |rest: &[&std::ffi::OsStr]| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "eval".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
            "--checkpoint".as_ref(),
            ckpt.as_os_str(),
            "--split".as_ref(),
            "train".as_ref(),
            "--max-tokens".as_ref(),
            "12".as_ref(),
            "--attribute".as_ref(),
            numbers.as_ref(),
        ];
        args.extend_from_slice(rest);
        earshot(args)
    };
    let report = dir.join("report.html");
    let out = eval_train(&[
        "--save-predictions".as_ref(),
        saved.as_os_str(),
        "--report".as_ref(),
        report.as_os_str(),
        "--json".as_ref(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&expect_success(&out)).unwrap();
    check_report(&dir.join("report.html"));
    assert_eq!(v["examples"], 8, "{v}");
    assert_eq!(v["scores"]["exact_match"], 1.0, "{v}");
    assert_eq!(v["attributes"]["number"]["accuracy"], 1.0, "{v}");
    let check = &v["listening_check"];
    assert_eq!(check["clearly_better"], true, "{check}");
    assert!(
        check["silence_score"].as_f64().unwrap() <= 0.125 + 1e-9,
        "{check}"
    );
    assert!(check["shuffled_score"].as_f64().unwrap() <= 0.25, "{check}");
    // Baselines: eight clips, each its own number: the training split's majority and
    // uniform chance name the right number once in eight; intervals bracket each score.
    let majority = &check["baselines"]["majority"]["number"];
    assert_eq!(majority["accuracy"], 0.125, "{check}");
    assert_eq!(check["baselines"]["uniform"]["number"], 0.125, "{check}");
    assert_eq!(check["majority_score"], 0.125, "{check}");
    assert!(
        check["best_baseline_score"].as_f64().unwrap() >= 0.125,
        "{check}"
    );
    // Wilson's interval for 8 of 8 (statsmodels: 0.6756, 1.0).
    let ci = &v["attributes"]["number"]["ci95"];
    assert!(
        (ci[0].as_f64().unwrap() - 0.6756).abs() < 1e-3 && ci[1] == 1.0,
        "{ci}"
    );
    assert!(
        v["ci95"]["cer"].is_array() && v["ci95"]["cider_d"].is_array(),
        "{v}"
    );
    // The same scores as JSON beside the report page.
    let beside: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
    assert_eq!(beside["scores"], v["scores"]);
    assert_eq!(
        beside["listening_check"]["best_baseline"],
        check["best_baseline"]
    );
    // The summary a person reads (--brief: no metric and confusion tables).
    let brief = expect_success(&eval_train(&["--no-report".as_ref(), "--brief".as_ref()]));
    assert!(
        brief.starts_with("split train: 8 example(s) (0 failed)")
            && brief.contains("number     accuracy 1.000 [0.676, 1.000]")
            && brief.contains("majority 0.125")
            && brief.contains("listening check: attribute accuracy 1.000 real vs")
            && !brief.contains("expected \\ named"),
        "{brief}"
    );
    // The memorised captions are likely only with their own audio.
    let loss = |k: &str| check[k].as_f64().unwrap();
    assert!(
        loss("real_loss") < 0.1 && loss("silence_loss") > 1.0 && loss("shuffled_loss") > 1.0,
        "{check}"
    );
    let out = earshot([
        "eval".as_ref(),
        "--predictions".as_ref(),
        saved.as_os_str(),
        "--attribute".as_ref(),
        numbers.as_ref(),
        "--json".as_ref(),
    ]);
    let again: serde_json::Value = serde_json::from_str(&expect_success(&out)).unwrap();
    assert_eq!(again["scores"], v["scores"]);
    assert_eq!(again["attributes"], v["attributes"]);
}

/// The HTML report as Chromium renders it: every section, one row with an audio player per
/// example, the confusion table's diagonal (all right), the loss curve; and a screenshot that
/// shows the page drawn (the diagonal's green among other colours).
fn check_report(page: &Path) {
    let dom = headless_chromium(page, &["--dump-dom"]);
    assert!(
        dom.contains("<h1 id=\"title\">earshot evaluation"),
        "{dom:.2000}"
    );
    assert_eq!(
        dom.matches("<tr class=\"example\">").count(),
        8,
        "{dom:.2000}"
    );
    assert_eq!(
        dom.matches("<audio controls=\"\" preload=\"none\" src=\"data:audio/wav;base64,")
            .count(),
        8,
        "{dom:.3000}"
    );
    assert!(dom.contains("<table class=\"confusion\" data-attribute=\"number\">"));
    assert_eq!(dom.matches("class=\"num diag\">1</td>").count(), 8);
    assert!(dom.contains("id=\"listening-verdict\" class=\"ok\""));
    assert!(dom.contains("<img id=\"loss-curve\""), "no loss curve");
    assert!(dom.contains("<td class=\"caption\">Tone number three.</td>"));
    assert!(!dom.contains("<script"), "a script in the report");

    let shot = tempfile::tempdir().unwrap();
    let png_path = shot.path().join("report.png");
    headless_chromium(
        page,
        &[
            &format!("--screenshot={}", png_path.display()),
            "--window-size=1280,4000",
        ],
    );
    let decoder = png::Decoder::new(std::fs::File::open(&png_path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1280, 4000));
    let channels = info.color_type.samples();
    let pixels: Vec<&[u8]> = buf[..info.buffer_size()].chunks(channels).collect();
    let diag = pixels
        .iter()
        .filter(|p| p[..3] == [0xd9, 0xf2, 0xd9])
        .count();
    let ink = pixels
        .iter()
        .filter(|p| p[..3].iter().any(|&c| c < 200))
        .count();
    assert!(
        diag > 100,
        "the confusion diagonal is not drawn ({diag} pixels)"
    );
    assert!(
        ink as f64 / pixels.len() as f64 > 0.005,
        "the page looks blank ({ink} dark pixels)"
    );
}
