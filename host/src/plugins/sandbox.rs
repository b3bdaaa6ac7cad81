//! The sandbox every plugin instance runs in: no network, no environment variables, no
//! inherited stdio (stderr is captured per call, bounded, sanitised and logged), only the
//! dataset root visible and read-only at /data, a memory cap over all of the plugin's
//! memories and tables, a cap on the handles (files, streams) it may hold, a per-call time
//! limit that holds however the time is spent (running wasm or blocked in a WASI call), and
//! caps on everything it returns.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::{Engine, ResourceLimiter, Store};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{FsPerms, ResourceTable, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Where a dataset adapter sees the dataset root.
pub const DATA_MOUNT: &str = "/data";
/// How often the engine's epoch advances; the granularity of call time limits.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Table elements are counted against the memory cap at this many bytes each (a funcref
/// slot in wasmtime's tables, rounded up).
const TABLE_ELEMENT_BYTES: usize = 16;
/// Stderr kept from one call; the rest is counted and dropped, never an error.
const STDERR_PER_CALL: usize = 16 * 1024;
/// Stderr lines forwarded to the log per plugin instance and second; the rest are counted.
const STDERR_LINES_PER_S: u32 = 20;

/// The plugin sandbox's limits (`[plugins.sandbox]` in a run config).
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SandboxLimits {
    /// Memory cap per plugin instance, in MiB: all of its linear memories and tables together.
    pub memory_mib: usize,
    /// Wall-clock limit for one call into a plugin, in seconds (instantiation included).
    pub call_timeout_s: f64,
    /// Largest result one call may return, in MiB.
    pub max_output_mib: usize,
    /// Handles (open files, directories, streams, pollables) one plugin instance may hold.
    pub max_handles: usize,
    /// Examples one split of a dataset adapter may yield before the run stops.
    pub max_examples: u64,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            memory_mib: 256,
            call_timeout_s: 30.0,
            max_output_mib: 64,
            max_handles: 256,
            max_examples: 1_000_000,
        }
    }
}

/// Upper bounds on the limits themselves: beyond these a value is a typo, not a choice.
const MAX_MEMORY_MIB: usize = 1 << 16;
const MAX_CALL_TIMEOUT_S: f64 = 24.0 * 3600.0;
const MAX_OUTPUT_MIB: usize = 4096;
const MAX_HANDLES: usize = 65_536;

impl SandboxLimits {
    /// Checks every limit, naming the config key and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        let range = |key: &str, v: String, lo: &str, hi: String| {
            format!("plugins.sandbox.{key} = {v}: must be between {lo} and {hi}")
        };
        if !(1..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(range(
                "memory-mib",
                self.memory_mib.to_string(),
                "1",
                MAX_MEMORY_MIB.to_string(),
            ));
        }
        if !(self.call_timeout_s.is_finite()
            && self.call_timeout_s >= 0.01
            && self.call_timeout_s <= MAX_CALL_TIMEOUT_S)
        {
            return Err(range(
                "call-timeout-s",
                self.call_timeout_s.to_string(),
                "0.01",
                format!("{MAX_CALL_TIMEOUT_S} (one day)"),
            ));
        }
        if !(1..=MAX_OUTPUT_MIB).contains(&self.max_output_mib) {
            return Err(range(
                "max-output-mib",
                self.max_output_mib.to_string(),
                "1",
                MAX_OUTPUT_MIB.to_string(),
            ));
        }
        if !(16..=MAX_HANDLES).contains(&self.max_handles) {
            return Err(range(
                "max-handles",
                self.max_handles.to_string(),
                "16",
                MAX_HANDLES.to_string(),
            ));
        }
        if self.max_examples == 0 {
            return Err("plugins.sandbox.max-examples = 0: must be at least 1".into());
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> usize {
        self.memory_mib.min(MAX_MEMORY_MIB) << 20
    }
    pub fn output_bytes(&self) -> usize {
        self.max_output_mib.min(MAX_OUTPUT_MIB) << 20
    }
    /// The call limit; never panics, whatever the value (validation reports bad ones).
    pub fn timeout(&self) -> Duration {
        let s = self.call_timeout_s;
        let s = if s.is_nan() { 0.0 } else { s };
        Duration::from_secs_f64(s.clamp(0.0, MAX_CALL_TIMEOUT_S))
    }
    /// Epoch ticks for one call.
    pub fn deadline_ticks(&self) -> u64 {
        (self.timeout().as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }
}

/// Refuses growth that would take the plugin's memories and tables together past the cap,
/// and remembers that it did, so a resulting trap is reported as "out of memory" rather than
/// as a generic crash. The total is the plugin's, not one memory's: a component with many
/// memories gets no more than one with a single memory.
pub(crate) struct CapLimiter {
    cap: usize,
    total: usize,
    pub hit: bool,
}

impl CapLimiter {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            total: 0,
            hit: false,
        }
    }

    fn grow(&mut self, current: usize, desired: usize, max: Option<usize>) -> bool {
        if max.is_some_and(|m| desired > m) {
            // Fails anyway (above the memory's own maximum): nothing to account.
            return false;
        }
        let total = self.total.saturating_sub(current).saturating_add(desired);
        if total > self.cap {
            self.hit = true;
            return false;
        }
        self.total = total;
        true
    }
}

impl ResourceLimiter for CapLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.grow(current, desired, max))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let bytes = |n: usize| n.saturating_mul(TABLE_ELEMENT_BYTES);
        Ok(self.grow(bytes(current), bytes(desired), max.map(bytes)))
    }

    // A component is a handful of core instances (a Rust plugin ~5, a Python one ~15): these
    // counts only stop a component that instantiates thousands of them.
    fn instances(&self) -> usize {
        64
    }
    fn tables(&self) -> usize {
        64
    }
    fn memories(&self) -> usize {
        16
    }
}

/// What a plugin wrote to stderr during the current call: kept up to a bound, the rest
/// counted. Writing never fails, so a plugin is never killed for logging.
#[derive(Clone, Default)]
pub(crate) struct StderrSink {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    dropped: usize,
}

impl StderrSink {
    fn accept(&self, bytes: &[u8]) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let room = STDERR_PER_CALL.saturating_sub(c.kept.len());
        let take = room.min(bytes.len());
        c.kept.extend_from_slice(&bytes[..take]);
        c.dropped += bytes.len() - take;
    }

    /// Takes what was written since the last call: (text, bytes dropped).
    pub fn drain(&self) -> (Vec<u8>, usize) {
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let dropped = std::mem::take(&mut c.dropped);
        (std::mem::take(&mut c.kept), dropped)
    }
}

impl IsTerminal for StderrSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrSink {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for StderrSink {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.accept(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(STDERR_PER_CALL)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StderrSink {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for StderrSink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.accept(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Forwards a plugin's stderr to the log, line by line, sanitised, at most
/// [`STDERR_LINES_PER_S`] lines a second; what is held back is counted and said.
pub(crate) struct StderrLog {
    window_start: Instant,
    lines_in_window: u32,
    suppressed: u64,
}

impl StderrLog {
    pub fn new() -> Self {
        Self {
            window_start: Instant::now(),
            lines_in_window: 0,
            suppressed: 0,
        }
    }

    pub fn forward(&mut self, plugin: &str, call: &str, text: &[u8], dropped: usize) {
        if self.window_start.elapsed() >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                tracing::info!(
                    "plugin {plugin}: {} more stderr lines not shown (rate limit)",
                    self.suppressed
                );
            }
            self.window_start = Instant::now();
            self.lines_in_window = 0;
            self.suppressed = 0;
        }
        let text = String::from_utf8_lossy(text);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if self.lines_in_window >= STDERR_LINES_PER_S {
                self.suppressed += 1;
                continue;
            }
            self.lines_in_window += 1;
            tracing::info!(
                "plugin {plugin} ({call}): {}",
                crate::text::display_text(line, 1024)
            );
        }
        if dropped > 0 {
            tracing::info!(
                "plugin {plugin} ({call}): {dropped} more bytes of stderr dropped (over {} KiB in one call)",
                STDERR_PER_CALL >> 10
            );
        }
    }
}

pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: CapLimiter,
    pub stderr: StderrSink,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// A store for one plugin instance. `dataset_root` is mounted read-only at /data.
pub(crate) fn new_store(
    engine: &Engine,
    limits: &SandboxLimits,
    dataset_root: Option<&Path>,
) -> wasmtime::Result<Store<HostState>> {
    let stderr = StderrSink::default();
    let mut wasi = WasiCtxBuilder::new();
    // Nothing is inherited: no args, no env, stdin empty, stdout discarded.
    wasi.stderr(stderr.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    if let Some(root) = dataset_root {
        wasi.preopened_dir(root, DATA_MOUNT, FsPerms::ReadOnly)?;
    }
    let mut table = ResourceTable::new();
    // Each open file or directory is a host file descriptor: bound them.
    table.set_max_capacity(limits.max_handles);
    let state = HostState {
        wasi: wasi.build(),
        table,
        limiter: CapLimiter::new(limits.memory_bytes()),
        stderr,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    store.epoch_deadline_trap();
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_over_all_memories_together() {
        let mut l = CapLimiter::new(64 << 20);
        // Nine memories of 10 MiB each: the seventh no longer fits.
        let grown = (0..9).filter(|_| l.grow(0, 10 << 20, None)).count();
        assert_eq!(grown, 6);
        assert!(l.hit);
        // Growing an existing memory counts only the difference.
        let mut l = CapLimiter::new(64 << 20);
        assert!(l.grow(0, 32 << 20, None));
        assert!(l.grow(32 << 20, 60 << 20, None));
        assert!(!l.grow(60 << 20, 65 << 20, None));
    }

    #[test]
    fn a_component_with_nine_memories_gets_no_more_than_the_cap() {
        let engine = crate::plugins::host::engine();
        // Nine core instances with a 10 MiB memory (160 pages) each, under a 64 MiB cap.
        let mut builder = wasm_encoder::ComponentBuilder::default();
        for _ in 0..9 {
            let mut memories = wasm_encoder::MemorySection::new();
            memories.memory(wasm_encoder::MemoryType {
                minimum: 160,
                maximum: None,
                memory64: false,
                shared: false,
                page_size_log2: None,
            });
            let mut module = wasm_encoder::Module::new();
            module.section(&memories);
            let index = builder.core_module(None, &module);
            builder.core_instantiate(None, index, []);
        }
        let component = wasmtime::component::Component::new(engine, builder.finish()).unwrap();
        let limits = SandboxLimits {
            memory_mib: 64,
            ..SandboxLimits::default()
        };
        let mut store = new_store(engine, &limits, None).unwrap();
        let linker = wasmtime::component::Linker::<HostState>::new(engine);
        let r = crate::plugins::host::executor()
            .block_on(linker.instantiate_async(&mut store, &component));
        assert!(r.is_err(), "nine memories of 10 MiB fit a 64 MiB cap");
        assert!(store.data().limiter.hit);
        assert!(store.data().limiter.total <= 64 << 20);
    }

    #[test]
    fn limits_are_validated_without_panicking() {
        for s in [f64::INFINITY, 1e30, f64::NAN, -1.0, 0.0] {
            let l = SandboxLimits {
                call_timeout_s: s,
                ..SandboxLimits::default()
            };
            let e = l.validate().unwrap_err();
            assert!(e.contains("call-timeout-s"), "{e}");
            // Never a panic, whatever the value.
            let _ = l.timeout();
            let _ = l.deadline_ticks();
        }
        assert!(SandboxLimits::default().validate().is_ok());
    }

    #[test]
    fn stderr_never_fails_and_is_bounded() {
        let mut s = StderrSink::default();
        for _ in 0..10_000 {
            OutputStream::write(&mut s, Bytes::from_static(&[b'x'; 85])).unwrap();
        }
        let (kept, dropped) = s.drain();
        assert_eq!(kept.len(), STDERR_PER_CALL);
        assert_eq!(kept.len() + dropped, 850_000);
        assert_eq!(s.drain(), (Vec::new(), 0));
    }
}
