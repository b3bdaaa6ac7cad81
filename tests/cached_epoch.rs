//! An epoch served from the encoder cache computes no log-mel and runs no encoder: the
//! second load of the same split under the same `EARSHOT_HOME` takes every window from the
//! cache (the counters of the clip encoder say so), gives bit-identical encoder outputs, and
//! trains an epoch on them. Its own test binary: it points `EARSHOT_HOME` (process-wide) at a
//! fresh home.

use earshot::config::RunConfig;
use earshot::train::{train, Session, Start};
use earshot_tests::*;

#[test]
fn an_epoch_served_from_the_encoder_cache_computes_no_mel_and_runs_no_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let home = fresh_home(dir.path());
    std::env::set_var("EARSHOT_HOME", &home);
    let run_dir = format!("train.run-dir={}", dir.path().join("run").display());
    let load = || {
        let cfg = RunConfig::load(
            &repo_root().join("configs/cpu-smollm2-tones.toml"),
            &[run_dir.clone(), "train.steps=2".into()],
        )
        .unwrap();
        Session::load(cfg).unwrap()
    };
    let cold = load();
    let n = cold.examples.len();
    assert_eq!(n, 8);
    let c = cold.encode_counts;
    assert_eq!(
        (c.mel_windows, c.encoder_runs, c.cache_hits),
        (n, n, 0),
        "{c:?}"
    );

    let warm = load();
    let w = warm.encode_counts;
    assert_eq!(
        (w.mel_windows, w.encoder_runs, w.cache_hits),
        (0, 0, n),
        "{w:?}"
    );
    for (a, b) in cold.examples.iter().zip(&warm.examples) {
        assert_eq!(a.id, b.id);
        let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = max_abs_diff(&flat(&a.encoded), &flat(&b.encoded));
        assert_eq!(diff, 0.0, "example {}: cached output differs", a.id);
    }
    drop(cold);
    // One epoch (8 examples, batch 4) on the cached outputs.
    let outcome = train(
        &warm,
        &earshot::dist::World::single(),
        2,
        Start::Fresh { overwrite: false },
        None,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(outcome.metrics.len(), 2);
    assert!((outcome.metrics[1].epoch - 1.0).abs() < 1e-9);
    assert!(outcome.metrics.iter().all(|m| m.loss.is_finite()));
}
