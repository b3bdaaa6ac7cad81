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
    assert!(again.contains("crashed earlier"), "{again}");
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
