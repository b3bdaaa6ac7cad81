//! Hostile plugins, each its own component: every one is contained with a clear error
//! naming the plugin and the call, nothing outside the dataset root is read or changed, and
//! the same host process then runs a good plugin.

use std::path::Path;

use earshot::plugins::{
    CallFailure, DatasetAdapter, PluginError, PluginHost, PostProcessor, PromptTemplate,
    SandboxLimits,
};
use earshot_tests::*;

fn host() -> PluginHost {
    PluginHost::new(
        SandboxLimits {
            memory_mib: 64,
            call_timeout_s: 2.0,
            max_output_mib: 8,
            ..SandboxLimits::default()
        },
        None,
    )
}

/// After any hostile plugin, a good one still works in this process.
fn good_plugin_still_works(h: &PluginHost) {
    let mut t = PromptTemplate::load(h, &first_party("chatml")).unwrap();
    let p = t.render(&[], "").unwrap();
    assert!(p.before_audio.starts_with("<|im_start|>system"));
}

fn call_failure(e: PluginError) -> (String, CallFailure) {
    let text = e.to_string();
    match e {
        PluginError::Call { kind, .. } => (text, kind),
        other => panic!("expected a call failure, got {other}"),
    }
}

fn run_post(name: &str, input: &str) -> Result<String, PluginError> {
    let h = host();
    let mut p = PostProcessor::load(&h, &hostile(name)).unwrap();
    let r = p.process(input, &[], &[]);
    good_plugin_still_works(&h);
    r
}

#[test]
fn infinite_loop_times_out() {
    let started = std::time::Instant::now();
    let (text, kind) = call_failure(run_post("infinite-loop", "").unwrap_err());
    assert!(matches!(kind, CallFailure::Timeout(_)), "{text}");
    assert!(
        text.contains("hostile-infinite-loop")
            && text.contains("process")
            && text.contains("did not finish within 2.0 s"),
        "{text}"
    );
    assert!(started.elapsed().as_secs_f64() < 20.0);
}

#[test]
fn memory_bomb_hits_the_cap() {
    let (text, kind) = call_failure(run_post("memory-bomb", "").unwrap_err());
    assert!(matches!(kind, CallFailure::OutOfMemory(_)), "{text}");
    assert!(text.contains("exceeded its memory cap of 64 MiB"), "{text}");
}

#[test]
fn deep_recursion_overflows_the_stack() {
    let (text, kind) = call_failure(run_post("deep-recursion", "").unwrap_err());
    assert!(matches!(kind, CallFailure::StackOverflow), "{text}");
}

#[test]
fn one_gib_of_text_is_refused() {
    let (text, kind) = call_failure(run_post("huge-output", "").unwrap_err());
    assert!(
        matches!(
            kind,
            CallFailure::OutOfMemory(_) | CallFailure::BadOutput(_)
        ),
        "{text}"
    );
}

#[test]
fn traps_and_panics_are_contained() {
    for name in ["trap-unreachable", "panic"] {
        let (text, kind) = call_failure(run_post(name, "").unwrap_err());
        assert!(matches!(kind, CallFailure::Trap(_)), "{name}: {text}");
        assert!(
            text.contains("panicked or reached `unreachable`"),
            "{name}: {text}"
        );
    }
}

#[test]
fn a_crashed_instance_is_not_entered_again() {
    let h = host();
    let mut p = PostProcessor::load(&h, &hostile("panic")).unwrap();
    assert!(p.process("", &[], &[]).is_err());
    let again = p.process("", &[], &[]).unwrap_err().to_string();
    assert!(again.contains("failed earlier"), "{again}");
}

#[test]
fn no_environment_and_no_arguments() {
    std::env::set_var("EARSHOT_TEST_SECRET", "hunter2");
    let out = run_post("env-var", "").unwrap();
    assert_eq!(out, "vars=[] args=[]");
}

#[test]
fn no_network() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let r = run_post("socket", &addr);
    assert!(r.is_err(), "the plugin connected: {r:?}");
    assert!(listener.accept().is_err(), "a connection reached the host");
}

/// Runs a hostile dataset adapter on `root`; it must fail (denied) without leaking.
fn denied_adapter(name: &str, root: &Path, options: &str) -> String {
    let h = host();
    let r = DatasetAdapter::open(&h, &hostile(name), root, options);
    let err = match r {
        Ok(ds) => panic!("{name} succeeded: {:?}", ds.dataset.warnings),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("hostile-{name}")) && err.contains("open"),
        "{err}"
    );
    assert!(
        !err.contains("SUCCEEDED") && !err.contains("root:x"),
        "{err}"
    );
    good_plugin_still_works(&h);
    err
}

#[test]
fn filesystem_outside_the_root_is_invisible() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let secret = d.path().join("secret.txt");
    std::fs::write(&secret, "the secret").unwrap();
    denied_adapter("read-passwd", &root, "");
    denied_adapter("escape-root", &root, "");
    denied_adapter("absolute-path", &root, secret.to_str().unwrap());
}

#[test]
fn the_root_is_read_only() {
    let d = tempfile::tempdir().unwrap();
    denied_adapter("write-root", d.path(), "");
    assert!(!d.path().join("pwned.txt").exists());
}

#[test]
fn unknown_api_version_is_refused_with_the_supported_list() {
    let out = earshot([
        "plugin".as_ref(),
        "check".as_ref(),
        plugin_dir("tests/plugins")
            .join("wrong_api_version.wasm")
            .as_os_str(),
    ]);
    let err = expect_failure(&out);
    assert!(
        err.contains("9.0.0") && err.contains("supports 0.1.0"),
        "{err}"
    );
    let e = PostProcessor::load(
        &host(),
        &plugin_dir("tests/plugins").join("wrong_api_version.wasm"),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("9.0.0") && e.contains("0.1.0"), "{e}");
}

#[test]
fn not_a_component_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let core = d.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let text = d.path().join("text.wasm");
    std::fs::write(&text, b"hello").unwrap();
    for (f, expect) in [(core, "not a component"), (text, "not a WebAssembly file")] {
        let err = expect_failure(&earshot([
            "plugin".as_ref(),
            "check".as_ref(),
            f.as_os_str(),
        ]));
        assert!(
            err.contains(expect) && err.contains(f.file_name().unwrap().to_str().unwrap()),
            "{err}"
        );
    }
    let missing = d.path().join("nope.wasm");
    let err = expect_failure(&earshot([
        "plugin".as_ref(),
        "check".as_ref(),
        missing.as_os_str(),
    ]));
    assert!(
        err.contains("nope.wasm") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn a_plugin_used_in_the_wrong_role_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let err = DatasetAdapter::open(&host(), &first_party("chatml"), d.path(), "")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("does not implement the dataset-adapter role")
            && err.contains("prompt-template"),
        "{err}"
    );
}

/// Runs `f` on a thread and fails the test if it has not returned after `secs` seconds: a
/// hang is a failure, not a stalled suite.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("still running after {secs} s: the host hangs"))
}

/// A call that must end within the 2 s limit (plus slack), with a timeout naming the call.
fn assert_times_out(
    call: &str,
    started: std::time::Instant,
    r: Result<impl std::fmt::Debug, PluginError>,
) {
    let elapsed = started.elapsed().as_secs_f64();
    let err = match r {
        Ok(v) => panic!("{call} returned {v:?}"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(call) && err.contains("did not finish within 2.0 s"),
        "{call}: {err}"
    );
    assert!(elapsed < 10.0, "{call} took {elapsed:.1} s");
}

#[test]
fn sleeping_in_a_wasi_call_is_interrupted_in_every_call() {
    within(120, sleeping_calls);
}

/// The test host with a compile cache in `dir`, holding `plugins` already compiled: timed
/// calls then measure the call, not the compiler (slow when the suite runs in parallel).
fn warm_host(dir: &Path, plugins: &[&Path]) -> PluginHost {
    let h = PluginHost::new(*host().limits(), Some(dir.to_path_buf()));
    for p in plugins {
        // Compiles and caches; describe itself may time out (sleep-describe), no matter.
        let _ = h.describe(p);
    }
    h
}

fn sleeping_calls() {
    let cache = tempfile::tempdir().unwrap();
    let sleep = hostile("sleep");
    let sleep_describe = hostile("sleep-describe");
    let h = warm_host(cache.path(), &[&sleep, &sleep_describe]);

    let mut p = PostProcessor::load(&h, &sleep).unwrap();
    let t = std::time::Instant::now();
    assert_times_out("process", t, p.process("sleep", &[], &[]));
    // The timed-out instance is thrown away: it is not entered again.
    let again = p.process("awake", &[], &[]).unwrap_err().to_string();
    assert!(again.contains("failed earlier"), "{again}");

    let mut t = PromptTemplate::load(&h, &sleep).unwrap();
    let started = std::time::Instant::now();
    assert_times_out("render", started, t.render(&[], "sleep"));

    let d = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    assert_times_out(
        "open",
        started,
        DatasetAdapter::open(&h, &sleep, d.path(), "sleep").map(|_| ()),
    );
    let mut ds = DatasetAdapter::open(&h, &sleep, d.path(), "").unwrap();
    let started = std::time::Instant::now();
    assert_times_out("read", started, ds.read("sleep", 0, 8));

    let started = std::time::Instant::now();
    assert_times_out(
        "describe",
        started,
        PostProcessor::load(&h, &sleep_describe).map(|_| ()),
    );
    good_plugin_still_works(&h);
}

#[test]
fn a_fifo_in_the_dataset_root_does_not_hang_the_host() {
    let d = tempfile::tempdir().unwrap();
    let pipe = d.path().join("pipe");
    let made = std::process::Command::new("mkfifo").arg(&pipe).status();
    assert!(
        made.is_ok_and(|s| s.success()),
        "mkfifo is needed for this test"
    );
    let cache = tempfile::tempdir().unwrap();
    let fifo = hostile("fifo");
    let h = warm_host(cache.path(), &[&fifo]);
    let started = std::time::Instant::now();
    let root = d.path().to_path_buf();
    let h2 = h.clone();
    let r = within(60, move || {
        DatasetAdapter::open(&h2, &fifo, &root, "").map(|_| ())
    });
    assert_times_out("open", started, r);
    good_plugin_still_works(&h);

    // The host opens an example's audio itself: a path naming the FIFO is refused at once.
    let r = within(10, move || {
        earshot::pipeline::open_beneath(d.path(), "pipe").map(|_| ())
    });
    let err = r.expect_err("a FIFO is not audio").to_string();
    assert!(
        err.contains("pipe") && err.contains("FIFO (named pipe), not a regular file"),
        "{err}"
    );
}

#[test]
fn a_page_that_does_not_advance_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut ds = DatasetAdapter::open(&host(), &hostile("stuck-page"), d.path(), "").unwrap();
    let err = ds.read("train", 7, 8).expect_err("refused").to_string();
    assert!(
        err.contains("hostile-stuck-page")
            && err.contains("position 7")
            && err.contains("does not advance"),
        "{err}"
    );
    // The same through the CLI's paging loop: an error, not a hang.
    let out = earshot_with_timeout(
        &[
            "dataset".as_ref(),
            "list".as_ref(),
            "--adapter".as_ref(),
            hostile("stuck-page").as_os_str(),
            "--root".as_ref(),
            d.path().as_os_str(),
        ],
        60,
    );
    let err = expect_failure(&out);
    assert!(
        err.contains("does not advance") && err.contains("position 0"),
        "{err}"
    );
}

#[test]
fn twenty_million_roles_are_refused() {
    let started = std::time::Instant::now();
    // Under the default 64 MiB output cap: the 20 MB list is refused for what it is.
    let err = PostProcessor::load(
        &PluginHost::new(SandboxLimits::default(), None),
        &hostile("many-roles"),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        err.contains("hostile_many_roles.wasm") && err.contains("20000000 roles"),
        "{err}"
    );
    assert!(started.elapsed().as_secs_f64() < 30.0);
    // `plugin check` says so in a line, instead of printing hundreds of MiB.
    let out = earshot([
        "plugin".as_ref(),
        "check".as_ref(),
        hostile("many-roles").as_os_str(),
    ]);
    let err = expect_failure(&out);
    assert!(out.stdout.is_empty() && err.len() < 4096, "{err}");
}

#[test]
fn logging_on_every_call_never_kills_a_plugin() {
    let d = tempfile::tempdir().unwrap();
    let mut ds = DatasetAdapter::open(&host(), &hostile("chatty"), d.path(), "").unwrap();
    let mut pages = ds.pages("train", 256);
    let mut n = 0;
    while let Some(page) = pages.next_page().unwrap() {
        n += page.len();
    }
    assert_eq!(n, 2000);
}

#[test]
fn a_plugin_cannot_exhaust_the_hosts_file_descriptors() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("f.txt"), "x").unwrap();
    let open_fds = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    let before = open_fds();
    let err = DatasetAdapter::open(&host(), &hostile("fd-hog"), d.path(), "")
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("hostile-fd-hog") && err.contains("open handles"),
        "{err}"
    );
    assert!(!err.contains("SUCCEEDED"), "{err}");
    // The instance is gone and its descriptors with it; the host can still open files.
    assert!(
        open_fds() <= before + 8,
        "{} fds now, {before} before",
        open_fds()
    );
    good_plugin_still_works(&host());
}

#[test]
fn an_endless_split_stops_at_the_example_cap() {
    let d = tempfile::tempdir().unwrap();
    let h = PluginHost::new(
        SandboxLimits {
            max_examples: 1000,
            ..SandboxLimits::default()
        },
        None,
    );
    let root = d.path().to_path_buf();
    let (seen, err) = within(120, move || {
        let mut ds = DatasetAdapter::open(&h, &hostile("endless-split"), &root, "").unwrap();
        let mut pages = ds.pages("train", 256);
        let mut seen = 0;
        loop {
            match pages.next_page() {
                Ok(Some(p)) => seen += p.len(),
                Ok(None) => panic!("the endless split ended"),
                Err(e) => break (seen, e.to_string()),
            }
        }
    });
    assert!(seen <= 1000, "{seen}");
    assert!(
        err.contains("hostile-endless-split") && err.contains("past 1000 examples"),
        "{err}"
    );
}

#[test]
fn the_output_cap_itself_is_enforced() {
    // 8 MiB of text under a 64 MiB memory cap: the output cap, not the memory cap, refuses it.
    let h = PluginHost::new(
        SandboxLimits {
            memory_mib: 64,
            max_output_mib: 1,
            ..SandboxLimits::default()
        },
        None,
    );
    let mut t = PromptTemplate::load(&h, &hostile("huge-prompt")).unwrap();
    let err = t.render(&[], "").unwrap_err();
    let (text, kind) = call_failure(err);
    assert!(matches!(kind, CallFailure::BadOutput(_)), "{text}");
    assert!(text.contains("more than the cap of 1 MiB"), "{text}");
}

#[test]
fn plugin_text_cannot_drive_the_terminal() {
    let nasty = hostile("terminal-escapes");
    for json in [false, true] {
        let mut args = vec!["plugin".as_ref(), "check".as_ref(), nasty.as_os_str()];
        if json {
            args.push("--json".as_ref());
        }
        let out = earshot(args);
        let text = expect_success(&out);
        for bad in ['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}'] {
            assert!(!text.contains(bad), "raw {bad:?} printed: {text:?}");
        }
        if json {
            let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
            assert!(
                v["description"].as_str().unwrap().contains("\\u{1b}]52"),
                "{v}"
            );
        } else {
            // The forged line stays inside the description's line.
            assert_eq!(
                text.lines().filter(|l| l.starts_with("roles:")).count(),
                1,
                "{text}"
            );
        }
    }
    // Warnings and error messages, through `dataset list`.
    let d = tempfile::tempdir().unwrap();
    let out = earshot([
        "dataset".as_ref(),
        "list".as_ref(),
        "--adapter".as_ref(),
        nasty.as_os_str(),
        "--root".as_ref(),
        d.path().as_os_str(),
    ]);
    let err = expect_failure(&out);
    for bad in ['\u{1b}', '\u{7}', '\u{9b}', '\u{202e}'] {
        assert!(!err.contains(bad), "raw {bad:?} printed: {err:?}");
    }
    assert!(err.contains("warning") && err.contains("message"), "{err}");
    // A post-processed caption is data: kept, but escaped when printed.
    let mut p = PostProcessor::load(&host(), &nasty).unwrap();
    let caption = p.process("x", &[], &[]).unwrap();
    assert!(caption.contains('\u{1b}'));
    let safe = earshot::text::terminal_safe_json(serde_json::json!({ "c": caption }).to_string());
    assert!(
        !safe.contains('\u{9b}') && !safe.contains('\u{202e}'),
        "{safe}"
    );
    let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
    assert_eq!(back["c"], caption.as_str());
}
