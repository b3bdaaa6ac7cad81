//! Data-parallel training on MPI (issue #28), on this machine with Open MPI's `mpirun`
//! (scripts/setup.sh installs it and builds earshot with the `mpi` feature): 2 ranks x half
//! a batch train the projector 1 rank x the whole batch trains, step for step; a run begun
//! on 2 ranks resumes on 1 and ends where the uninterrupted run does; kill -9 of a rank ends
//! the job, naming it, and the run resumes from its last complete checkpoint; a hung rank
//! ends the job within --rank-timeout-s; the ranks share the encoding of the clips;
//! `caption`, `eval` and `cache fill` shard their work and give what one process gives. Needs
//! mpirun and the mpi build: without mpirun these tests fail, saying so. A plain build (no
//! MPI: the set-up could not install Open MPI, and said so) cannot run them; there each test
//! checks instead what a plain build promises, that a job launched on several ranks is
//! refused, saying how to build (`earshot --version` says which build it is).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use earshot_tests::*;

/// Whether the binary under test has MPI (`earshot --version` names its cargo features).
/// Without it, checks that a job launched on 2 ranks is refused by name and says how to
/// build, and returns false: the test has nothing more it can run.
fn mpi_build() -> bool {
    let version = expect_success(&earshot(["--version"])).trim().to_string();
    if version.contains("mpi") {
        return true;
    }
    let d = tempfile::tempdir().unwrap();
    // What mpirun puts in each rank's environment.
    let out = earshot_command()
        .env("OMPI_COMM_WORLD_RANK", "0")
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .args(train_args(&d.path().join("run"), &[]))
        .output()
        .unwrap();
    let stderr = expect_failure(&out);
    assert!(
        stderr.contains("launched as rank 0 of 2") && stderr.contains("built without MPI"),
        "{stderr}"
    );
    eprintln!(
        "{version}: a plain build (no MPI); checked that it refuses a job of 2 ranks. The \
         data-parallel tests need the mpi build (scripts/setup.sh makes it as root)"
    );
    false
}

fn mpirun() -> PathBuf {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("mpirun"))
        .find(|p| p.is_file());
    found.expect("mpirun not found: scripts/setup.sh installs Open MPI (apt-get, as root)")
}

/// The tones config with a global batch of 4, `steps` steps and a checkpoint every 2.
fn train_args(run: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "train".into(),
        repo_root()
            .join("configs/cpu-smollm2-tones.toml")
            .display()
            .to_string(),
        "--set".into(),
        format!("train.run-dir=\"{}\"", run.display()),
        "--set".into(),
        "train.steps=4".into(),
        "--set".into(),
        "train.batch-size=4".into(),
        "--set".into(),
        "train.checkpoint-every=2".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `earshot ARGS` on `ranks` ranks under mpirun, one thread each.
fn on_ranks(ranks: usize, args: &[String]) -> Output {
    on_ranks_in(&test_home(), ranks, args)
}

/// [`on_ranks`] with `home` as $EARSHOT_HOME.
fn on_ranks_in(home: &Path, ranks: usize, args: &[String]) -> Output {
    ranks_command(home, ranks, args, &[])
        .output()
        .expect("mpirun runs")
}

/// `mpirun` starting `earshot ARGS` on `ranks` ranks, one thread each, with `home` as
/// $EARSHOT_HOME and the environment variables `env` passed on to every rank.
fn ranks_command(home: &Path, ranks: usize, args: &[String], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(mpirun());
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(ranks.to_string())
        .args(["-x", "EARSHOT_HOME", "-x", "RAYON_NUM_THREADS"]);
    for (name, value) in env {
        cmd.args(["-x", name]).env(name, value);
    }
    cmd.arg(earshot_bin())
        .args(args)
        .env("EARSHOT_HOME", home)
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("RUST_LOG");
    cmd
}

/// A fresh $EARSHOT_HOME under `dir`: the set-up's models and data (links), empty caches.
fn fresh_home(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for name in ["models", "data"] {
        std::os::unix::fs::symlink(test_home().join(name), dir.join(name)).unwrap();
    }
    dir.to_path_buf()
}

/// Two fresh $EARSHOT_HOMEs under `dir` (one process's, the ranks'), empty caches.
fn two_homes(dir: &Path) -> (PathBuf, PathBuf) {
    (
        fresh_home(&dir.join("home-one")),
        fresh_home(&dir.join("home-two")),
    )
}

/// Every file under `dir` (relative path, bytes), sorted.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

/// The ranks share the encoding: each encodes its half of the clips into the shared cache
/// and reads the other half from it, and the cache they leave is the one a single process
/// leaves, file for file.
#[test]
fn ranks_share_the_encoding_and_leave_the_cache_one_process_leaves() {
    if !mpi_build() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (alone, shared) = two_homes(d.path());
    let out = alone_in(
        &alone,
        &train_args(&d.path().join("one"), &["--max-steps", "1"]),
    );
    expect_success(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("encoder: 8 clip(s) encoded, 0 from the cache"),
        "{stderr}"
    );
    let out = on_ranks_in(
        &shared,
        2,
        &train_args(&d.path().join("two"), &["--max-steps", "1"]),
    );
    expect_success(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("encoder: 4 clip(s) encoded, 4 from the cache"),
        "rank 0 did not encode half: {stderr}"
    );
    let (a, b) = (
        files_under(&alone.join("cache/encoder")),
        files_under(&shared.join("cache/encoder")),
    );
    assert_eq!(
        a.len(),
        8,
        "{:?}",
        a.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    assert!(
        a == b,
        "the caches differ: {:?} vs {:?}",
        a.iter().map(|f| &f.0).collect::<Vec<_>>(),
        b.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
}

/// Relative difference of two runs' final projectors, the largest over their tensors
/// (|a - b| / |a|, Frobenius norms).
fn projector_difference(a: &Path, b: &Path) -> f64 {
    tensors_difference(a, b, "projector.safetensors")
}

/// [`projector_difference`] for the tensors of `file` in each run folder.
fn tensors_difference(a: &Path, b: &Path, file: &str) -> f64 {
    let load = |run: &Path| candle_core::safetensors::load(run.join(file), &Device::Cpu).unwrap();
    let (ta, tb) = (load(a), load(b));
    assert_eq!(
        ta.keys().collect::<std::collections::BTreeSet<_>>(),
        tb.keys().collect::<std::collections::BTreeSet<_>>()
    );
    let norm = |t: &Tensor| {
        t.to_dtype(candle_core::DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    };
    ta.iter()
        .map(|(name, x)| {
            let y = &tb[name];
            let d = norm(&(x - y).unwrap());
            d / norm(x).max(1e-12)
        })
        .fold(0.0, f64::max)
}

fn assert_same_losses(a: &[(u64, f64)], b: &[(u64, f64)]) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for ((sa, la), (sb, lb)) in a.iter().zip(b) {
        assert_eq!(sa, sb);
        assert!(
            (la - lb).abs() <= 1e-5 * la.abs(),
            "step {sa}: loss {la} on one rank, {lb} on two"
        );
    }
}

#[test]
fn two_ranks_train_what_one_rank_trains_and_a_run_resumes_on_fewer_ranks() {
    if !mpi_build() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (one, two, moved) = (
        d.path().join("one"),
        d.path().join("two"),
        d.path().join("moved"),
    );
    expect_success(&earshot(train_args(&one, &[])));
    let out = on_ranks(2, &train_args(&two, &[]));
    let stdout = expect_success(&out);
    // Rank 0 alone reports, once.
    assert_eq!(
        stdout.matches("trained to step 4").count(),
        1,
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("data-parallel over 2 ranks"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_losses(&run_losses(&one), &run_losses(&two));
    let diff = projector_difference(&one, &two);
    assert!(diff <= 1e-5, "projectors differ by {diff:e} (relative)");

    // Two steps on 2 ranks, then the rest on 1, from the checkpoint at step 2.
    expect_success(&on_ranks(2, &train_args(&moved, &["--max-steps", "2"])));
    assert!(moved.join("checkpoints/step-00000002/state.json").is_file());
    let stdout = expect_success(&earshot(train_args(&moved, &["--resume"])));
    assert!(
        stdout.contains("trained to step 4 (2 step(s) now)"),
        "{stdout}"
    );
    assert_same_losses(&run_losses(&one), &run_losses(&moved));
    let diff = projector_difference(&one, &moved);
    assert!(
        diff <= 1e-5,
        "resumed projector differs by {diff:e} (relative)"
    );
}

/// With LoRA and its dropout, 2 ranks still train what 1 rank trains: each example draws
/// its dropout masks from its own sample position, whichever rank computes it. The losses
/// agree within 1e-5 at every step (with masks drawn per rank's forward, as before, they
/// differed by 1e-2 from step 2 and the adapters by 0.7, relative). The adapters agree to
/// rounding, which Adam magnifies here: lora_B starts at zero, so lora_A's first gradients
/// are near zero and Adam's normalisation turns the last bits of the summed gradient into
/// visible differences. The test measures that floor too (the same runs without dropout on
/// 1 and 2 ranks) and prints both figures; 1e-3 for the tensors is the bound.
#[test]
fn two_ranks_train_lora_with_dropout_as_one_rank_does() {
    if !mpi_build() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (one, two) = (d.path().join("one"), d.path().join("two"));
    let lora = ["--set", "lora.rank=4", "--set", "lora.dropout=0.3"];
    expect_success(&earshot(train_args(&one, &lora)));
    expect_success(&on_ranks(2, &train_args(&two, &lora)));
    assert_same_losses(&run_losses(&one), &run_losses(&two));
    for file in ["projector.safetensors", "adapter/adapter_model.safetensors"] {
        let diff = tensors_difference(&one, &two, file);
        assert!(diff <= 1e-3, "{file} differs by {diff:e} (relative)");
    }
    // The dropout is on: without it the same run ends elsewhere.
    let off = d.path().join("off");
    expect_success(&earshot(train_args(
        &off,
        &["--set", "lora.rank=4", "--set", "lora.dropout=0.0"],
    )));
    let diff = tensors_difference(&one, &off, "adapter/adapter_model.safetensors");
    assert!(
        diff > 1e-3,
        "dropout 0.3 and 0 trained the same adapter ({diff:e})"
    );
    // The rounding floor: without dropout, 1 and 2 ranks differ only by the order in which
    // the gradients are summed.
    let off_two = d.path().join("off-two");
    expect_success(&on_ranks(
        2,
        &train_args(
            &off_two,
            &["--set", "lora.rank=4", "--set", "lora.dropout=0.0"],
        ),
    ));
    let adapter = "adapter/adapter_model.safetensors";
    let (with_dropout, floor) = (
        tensors_difference(&one, &two, adapter),
        tensors_difference(&off, &off_two, adapter),
    );
    eprintln!(
        "adapter, 1 rank vs 2 ranks (relative): {with_dropout:e} with dropout 0.3, \
         {floor:e} without dropout"
    );
    assert!(
        floor <= 1e-3,
        "without dropout the ranks differ by {floor:e}"
    );
}

/// More ranks than examples in a batch is refused by name on every rank, not left to hang.
#[test]
fn more_ranks_than_the_batch_is_refused() {
    if !mpi_build() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let out = on_ranks(2, &train_args(&run, &["--set", "train.batch-size=1"]));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("2 ranks but a batch of 1 example(s)"),
        "{stderr}"
    );
}

/// The pid of the process of `rank` under mpirun (from its environment), once it runs.
fn rank_pid(rank: usize, run: &Path) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let env = String::from_utf8_lossy(&env);
        let cmdline = String::from_utf8_lossy(&cmdline);
        if env
            .split('\0')
            .any(|v| v == format!("OMPI_COMM_WORLD_RANK={rank}"))
            && cmdline.contains(&run.display().to_string())
        {
            return Some(pid);
        }
    }
    None
}

/// kill -9 of one rank mid-run: mpirun ends the job on every rank within 60 s, naming the
/// rank that died, and the run resumes (on one rank) from its last complete checkpoint.
#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes() {
    if !mpi_build() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let mut args = train_args(&run, &["--set", "train.checkpoint-every=1"]);
    args.extend(["--set".to_string(), "train.steps=400".to_string()]);
    let mut cmd = ranks_command(&test_home(), 2, &args, &[]);
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("mpirun runs");
    // Once a checkpoint exists, rank 1 dies.
    let started = std::time::Instant::now();
    while !run.join("checkpoints/step-00000002/state.json").is_file() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(120),
            "no checkpoint after 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let pid = rank_pid(1, &run).expect("rank 1 is running");
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let killed = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        killed.elapsed() < std::time::Duration::from_secs(60),
        "the job took {:?} to end",
        killed.elapsed()
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rank 1"),
        "the message does not name rank 1: {stderr}"
    );
    // The newest complete checkpoint (rank 0 may have been stopped while writing one:
    // checkpoints are written aside and renamed, so no half-written one counts).
    let latest = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().join("state.json").is_file())
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("step-")?
                .parse::<usize>()
                .ok()
        })
        .max()
        .expect("a complete checkpoint");
    let next = (latest + 1).to_string();
    let mut resume = args.clone();
    resume.extend([
        "--resume".to_string(),
        "--max-steps".to_string(),
        next.clone(),
    ]);
    let stdout = expect_success(&earshot(resume));
    assert!(
        stdout.contains(&format!("trained to step {next} (1 step(s) now)")),
        "{stdout}"
    );
}

/// A rank that hangs (stops answering mid-step): every rank gives up within
/// --rank-timeout-s, the hung one naming itself and the step, and the job ends non-zero.
#[test]
fn a_hung_rank_ends_the_job_within_the_timeout() {
    if !mpi_build() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let mut args = train_args(&run, &["--rank-timeout-s", "5"]);
    args.extend(["--set".to_string(), "train.steps=50".to_string()]);
    let mut cmd = ranks_command(&test_home(), 2, &args, &[("EARSHOT_TEST_HANG", "1@3")]);
    let started = std::time::Instant::now();
    let out = cmd.output().expect("mpirun runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rank 1 of 2: step 3 has not finished after 5 s (this rank is computing"),
        "{stderr}"
    );
    // Loading and two steps take seconds; the timeout 5 s more.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(90),
        "{:?}",
        started.elapsed()
    );
}

/// The tones config's path.
fn tones_config() -> String {
    repo_root()
        .join("configs/cpu-smollm2-tones.toml")
        .display()
        .to_string()
}

/// `earshot ARGS` alone in `home`, one thread (as each rank has).
fn alone_in(home: &Path, args: &[String]) -> Output {
    earshot_command()
        .env("EARSHOT_HOME", home)
        .env("RAYON_NUM_THREADS", "1")
        .args(args)
        .output()
        .unwrap()
}

/// Caption lines without their timings (`seconds` differs from run to run).
fn caption_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("seconds");
            v
        })
        .collect()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// `caption --split` and `eval --config` on 2 ranks: each rank captions its chunks (8 clips
/// in chunks of 3: rank 0 the 1st and 3rd, 5 clips; rank 1 the 2nd, 3 clips, and nothing in
/// the second round) and rank 0 writes in split order what one process writes: the same
/// captions, the same scores and listening check, the same predictions file and HTML report.
#[test]
fn sharded_caption_and_eval_give_what_one_process_gives() {
    if !mpi_build() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (home_one, home_two) = two_homes(d.path());
    let config = tones_config();
    // The same split, chunks and token limit for caption and eval.
    let split = [
        "--config",
        &config,
        "--split",
        "train",
        "--batch-size",
        "3",
        "--max-tokens",
        "8",
    ];
    let caption = strings(&[&["-v", "caption"][..], &split].concat());
    let one = alone_in(&home_one, &caption);
    expect_success(&one);
    let two = on_ranks_in(&home_two, 2, &caption);
    expect_success(&two);
    let (a, b) = (caption_lines(&one.stdout), caption_lines(&two.stdout));
    assert_eq!(a.len(), 8);
    assert_eq!(a, b, "2 ranks captioned differently from one process");
    // Each rank encoded only its own clips (empty caches: every window went through it).
    let stderr = String::from_utf8_lossy(&two.stderr);
    for share in [
        "5 window(s) went through the encoder",
        "3 window(s) went through the encoder",
    ] {
        assert!(stderr.contains(share), "no rank says {share:?}: {stderr}");
    }
    let eval = |dir: &Path| {
        let (report, predictions) = (
            dir.join("report.html").display().to_string(),
            dir.join("predictions.jsonl").display().to_string(),
        );
        let files = ["--report", &report, "--save-predictions", &predictions];
        strings(&[&["eval"][..], &split, &files].concat())
    };
    let (dir_one, dir_two) = (d.path().join("eval-one"), d.path().join("eval-two"));
    std::fs::create_dir_all(&dir_one).unwrap();
    std::fs::create_dir_all(&dir_two).unwrap();
    let one = alone_in(&home_one, &eval(&dir_one));
    let two = on_ranks_in(&home_two, 2, &eval(&dir_two));
    // Without a checkpoint the model does not listen: the check warns, the status is 0.
    let (stdout_one, stdout_two) = (expect_success(&one), expect_success(&two));
    assert!(stdout_one.contains("listening check"), "{stdout_one}");
    assert_eq!(stdout_one, stdout_two, "the scores differ");
    for file in ["report.html", "predictions.jsonl", "eval.json"] {
        // The report names the models by path, beneath each run's own $EARSHOT_HOME.
        let read = |dir: &Path, home: &Path| {
            std::fs::read_to_string(dir.join(file))
                .unwrap()
                .replace(&home.display().to_string(), "$EARSHOT_HOME")
        };
        let (a, b) = (read(&dir_one, &home_one), read(&dir_two, &home_two));
        assert!(a.contains("Tone number"), "{file}: {a}");
        if file == "report.html" {
            // The players of what the model heard came from both ranks.
            assert_eq!(a.matches("<audio").count(), 8, "{file}");
        }
        assert!(a == b, "{file} differs between 1 and 2 ranks");
    }
}

/// `cache fill` on 2 ranks: each encodes half the clips, and the cache they leave is the
/// one a single process leaves, file for file; `train` then encodes nothing, and a second
/// fill finds everything there.
#[test]
fn sharded_cache_fill_leaves_the_cache_one_process_leaves() {
    if !mpi_build() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (alone, shared) = two_homes(d.path());
    let fill = strings(&["-v", "cache", "fill", &tones_config()]);
    let one = expect_success(&alone_in(&alone, &fill));
    assert!(
        one.contains("8 clip(s): 8 window(s) encoded, 0 already in the cache, 0 failed;"),
        "{one}"
    );
    let two = on_ranks_in(&shared, 2, &fill);
    let stdout = expect_success(&two);
    assert!(
        stdout.contains(
            "8 clip(s): 8 window(s) encoded, 0 already in the cache, 0 failed (over 2 ranks)"
        ),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&two.stderr);
    for rank in 0..2 {
        let share = format!("rank {rank} of 2: 4 window(s) encoded, 0 from the cache");
        assert!(stderr.contains(&share), "no {share:?}: {stderr}");
    }
    let (a, b) = (
        files_under(&alone.join("cache/encoder")),
        files_under(&shared.join("cache/encoder")),
    );
    assert_eq!(a.len(), 8);
    assert!(a == b, "the caches differ");
    let out = alone_in(
        &shared,
        &train_args(&d.path().join("run"), &["--max-steps", "1"]),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("encoder: 0 clip(s) encoded, 8 from the cache"),
        "{stderr}"
    );
    let again = expect_success(&on_ranks_in(&shared, 2, &fill));
    assert!(
        again.contains("8 clip(s): 0 window(s) encoded, 8 already in the cache"),
        "{again}"
    );
}

/// `mpirun` with one rank started as `first` and one as `second` (MPMD), one thread each.
fn two_programs(first: &[String], second: &[String]) -> Command {
    let mut cmd = Command::new(mpirun());
    cmd.args(["--allow-run-as-root", "--oversubscribe"])
        .args(["-x", "EARSHOT_HOME", "-x", "RAYON_NUM_THREADS", "-np", "1"])
        .arg(earshot_bin())
        .args(first)
        .args([":", "-np", "1"])
        .arg(earshot_bin())
        .args(second)
        .env("EARSHOT_HOME", test_home())
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("RUST_LOG");
    cmd
}

/// Runs `cmd`, failing the test if it has not ended within `secs` (it is killed then).
fn within(mut cmd: Command, secs: u64) -> Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mpirun runs");
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(secs) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the job had not ended after {secs} s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// A rank that fails while the others go on (here: rank 1 is given a split that does not
/// exist) ends every rank at once, naming itself and the cause, instead of leaving rank 0
/// waiting for it in the next collective forever: in `train` (while loading, before the
/// step watchdog starts) and in sharded `eval`.
#[test]
fn a_rank_that_fails_ends_every_rank() {
    if !mpi_build() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let train = train_args(&run, &[]);
    let mut bad_train = train.clone();
    bad_train.extend(strings(&["--set", "data.train-split=\"nosuch\""]));
    let config = tones_config();
    let eval = strings(&[
        "eval",
        "--config",
        &config,
        "--split",
        "train",
        "--max-tokens",
        "4",
        "--no-report",
    ]);
    let mut bad_eval = eval.clone();
    *bad_eval.last_mut().unwrap() = "--no-listening-check".into();
    bad_eval[4] = "nosuch".into();
    for (good, bad) in [(train, bad_train), (eval, bad_eval)] {
        let out = within(two_programs(&good, &bad), 60);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("rank 1 of 2: ") && stderr.contains("no split \"nosuch\""),
            "{stderr}"
        );
    }
}
