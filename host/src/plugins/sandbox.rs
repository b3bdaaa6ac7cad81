//! The sandbox every plugin instance runs in: no network, no environment variables, no
//! inherited stdio (stderr is captured, bounded, and logged), only the dataset root visible
//! and read-only at /data, a memory cap, a per-call time limit (epoch interruption) and a
//! cap on returned data.

use std::path::Path;
use std::time::Duration;

use wasmtime::{Engine, ResourceLimiter, Store};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, ResourceTable, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

/// Where a dataset adapter sees the dataset root.
pub const DATA_MOUNT: &str = "/data";
/// How often the engine's epoch advances; the granularity of call time limits.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct SandboxLimits {
    /// Linear-memory cap per plugin instance, in MiB.
    pub memory_mib: usize,
    /// Wall-clock limit for one call into a plugin, in seconds.
    pub call_timeout_s: f64,
    /// Largest result one call may return, in MiB.
    pub max_output_mib: usize,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            memory_mib: 256,
            call_timeout_s: 30.0,
            max_output_mib: 64,
        }
    }
}

impl SandboxLimits {
    pub fn memory_bytes(&self) -> usize {
        self.memory_mib << 20
    }
    pub fn output_bytes(&self) -> usize {
        self.max_output_mib << 20
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.call_timeout_s.max(0.0))
    }
    /// Epoch ticks for one call.
    pub fn deadline_ticks(&self) -> u64 {
        (self.timeout().as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
    }
}

/// Refuses memory growth past the cap and remembers that it did, so a resulting trap can be
/// reported as "out of memory" rather than as a generic crash.
pub(crate) struct CapLimiter {
    memory_cap: usize,
    pub hit: bool,
}

impl ResourceLimiter for CapLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: CapLimiter,
    pub stderr: MemoryOutputPipe,
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
    let stderr = MemoryOutputPipe::new(64 * 1024);
    let mut wasi = WasiCtxBuilder::new();
    // Nothing is inherited: no args, no env, stdin empty, stdout discarded.
    wasi.stderr(stderr.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    if let Some(root) = dataset_root {
        wasi.preopened_dir(root, DATA_MOUNT, FsPerms::ReadOnly)?;
    }
    let state = HostState {
        wasi: wasi.build(),
        table: ResourceTable::new(),
        limiter: CapLimiter {
            memory_cap: limits.memory_bytes(),
            hit: false,
        },
        stderr,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    store.epoch_deadline_trap();
    Ok(store)
}
