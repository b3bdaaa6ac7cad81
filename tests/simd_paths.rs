//! The narrower kernel paths, forced with `EARSHOT_SIMD` on whatever CPU runs the suite: the
//! same binary must give the oracle's greedy tokens and encoder output on the AVX2 path and
//! the portable one as on the widest (which the other oracle tests run), so a machine
//! without AVX-512 (or without AVX2) gets checked results. The encoder is also held to
//! earshot's own measured exactness, far inside the oracle's tolerance.

use earshot::models::simd::{self, SimdLevel};
use earshot_tests::*;

fn with_simd(value: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
    earshot_command()
        .env(simd::ENV, value)
        .arg("-v")
        .args(args)
        .output()
        .expect("spawn earshot")
}

/// The kernels line of `-v` output names the level the value resolves to on this CPU.
fn assert_level(out: &std::process::Output, value: &str) {
    let want = simd::resolve(Some(value)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("CPU kernels: {} (", want.name())),
        "EARSHOT_SIMD={value}: expected kernels {}:\n{stderr}",
        want.name()
    );
}

#[test]
fn greedy_tokens_and_the_encoder_match_the_oracles_on_every_narrower_path() {
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(smollm_oracle("greedy.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (_, reference) = read_npy(&whisper_oracle("expected/a_speech_enc_pad30s.npy"));
    let mut levels = vec!["avx2", "portable"];
    if simd::detected() == SimdLevel::Avx512 {
        // Also the widest by name, so the test shows each level really is a different run.
        levels.insert(0, "avx512");
    }
    for value in levels {
        let out = with_simd(
            value,
            &[
                "generate".as_ref(),
                "--llm".as_ref(),
                default_gguf().as_os_str(),
                "--max-tokens".as_ref(),
                "40".as_ref(),
                "--prompt".as_ref(),
                g["prompt"].as_str().unwrap().as_ref(),
            ],
        );
        let stdout = expect_success(&out);
        assert_level(&out, value);
        assert_eq!(
            stdout.trim_end(),
            g["reference_greedy40_text"].as_str().unwrap(),
            "EARSHOT_SIMD={value}"
        );

        let enc = dir.path().join(format!("enc-{value}.npy"));
        let out = with_simd(
            value,
            &[
                "encode".as_ref(),
                whisper_oracle("expected/a_speech_mel_pad30s.npy").as_os_str(),
                "--whisper".as_ref(),
                default_whisper().as_os_str(),
                "--out".as_ref(),
                enc.as_os_str(),
            ],
        );
        expect_success(&out);
        assert_level(&out, value);
        let (shape, got) = read_npy(&enc);
        assert_eq!(shape, vec![1, 1500, 384]);
        let err = rel_l2(&got, &reference);
        assert!(err <= 1e-3, "EARSHOT_SIMD={value}: relative L2 {err}");
        // The oracle's 1e-3 is the bar for any correct f32 encoder; this is earshot's own
        // exactness, so that a kernel change within 1e-3 but less exact fails: 2.1e-6 on
        // both paths of an AVX2 machine (CTranslate2 is 1.3e-6 from a float64 numpy encoder
        // of the same weights; GELU with a rational erf took earshot to 6.3e-6).
        assert!(
            err <= 4e-6,
            "EARSHOT_SIMD={value}: relative L2 {err} to CTranslate2, earshot measured 2.1e-6"
        );
    }
}

#[test]
fn a_bad_value_is_a_usage_error_before_any_work() {
    let out = earshot_command()
        .env(simd::ENV, "sse9")
        .args(["cache", "info"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("EARSHOT_SIMD=\"sse9\": expected auto, avx512, avx2 or portable"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}
