//! Which vector instructions the hand-written CPU kernels (`fused`, `packed`) use, chosen
//! once per process: the widest the CPU runs, or a narrower one named by `EARSHOT_SIMD`.
//!
//! The crate is built for baseline x86-64 (SSE2), so one binary runs on every x86-64 CPU;
//! each hot loop is also compiled for AVX2 + FMA and for AVX-512 and picked here at run
//! time. `EARSHOT_SIMD=avx2` (or `portable`) forces a narrower path on a wider CPU: the test
//! suite runs the oracle comparisons that way, so the AVX2 path stays tested on machines
//! that would never take it. The f32 matrix products of the encoder, the prompt and training
//! go through the gemm crate, which makes its own run-time choice (AVX-512 where present)
//! and is not steered by this variable.

use std::sync::OnceLock;

/// The environment variable that caps the level (`auto`, `avx512`, `avx2`, `portable`).
pub const ENV: &str = "EARSHOT_SIMD";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// What the compiler makes of plain Rust for the baseline target (SSE2 on x86-64).
    Portable,
    /// AVX2 + FMA + F16C: 8 f32 lanes.
    Avx2,
    /// AVX-512 F/BW/DQ/VL (x86-64-v4) on top of AVX2: 16 f32 lanes.
    Avx512,
}

impl SimdLevel {
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// `None` for `auto` (or an empty value): the detected level.
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(None),
            "avx512" | "avx-512" => Ok(Some(Self::Avx512)),
            "avx2" => Ok(Some(Self::Avx2)),
            "portable" | "scalar" | "none" => Ok(Some(Self::Portable)),
            other => Err(format!(
                "{ENV}={other:?}: expected auto, avx512, avx2 or portable"
            )),
        }
    }
}

/// The widest level this CPU runs.
pub fn detected() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx512vl");
        if avx512 {
            SimdLevel::Avx512
        } else if avx2 {
            SimdLevel::Avx2
        } else {
            SimdLevel::Portable
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        SimdLevel::Portable
    }
}

/// The level a `EARSHOT_SIMD` value asks for on this CPU: never above what it runs.
pub fn resolve(value: Option<&str>) -> Result<SimdLevel, String> {
    let cpu = detected();
    Ok(match value.map(SimdLevel::parse).transpose()?.flatten() {
        Some(asked) => asked.min(cpu),
        None => cpu,
    })
}

/// Checks `EARSHOT_SIMD` (the CLI calls this first, so a bad value is an error, not a
/// silent fallback) and says when it asks for more than the CPU has.
pub fn check_env() -> Result<SimdLevel, String> {
    let asked = match std::env::var(ENV) {
        Ok(v) => SimdLevel::parse(&v)?,
        Err(_) => None,
    };
    let level = asked.map_or(detected(), |a| a.min(detected()));
    if let Some(asked) = asked.filter(|a| *a > level) {
        tracing::warn!(
            "{ENV}={}: this CPU runs at most {}; using that",
            asked.name(),
            level.name()
        );
    }
    Ok(level)
}

/// The level the kernels use, fixed at the first call. A bad `EARSHOT_SIMD` (which the CLI
/// refuses before this runs) counts as `auto` here.
pub fn level() -> SimdLevel {
    #[cfg(test)]
    match FORCED.load(std::sync::atomic::Ordering::Relaxed) {
        1 => return SimdLevel::Portable,
        2 => return SimdLevel::Avx2.min(detected()),
        3 => return SimdLevel::Avx512.min(detected()),
        _ => {}
    }
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL
        .get_or_init(|| resolve(std::env::var(ENV).ok().as_deref()).unwrap_or_else(|_| detected()))
}

/// Unit tests run each path of a kernel through `with_level`: process-wide, because the
/// kernels run on rayon's threads (0 = not forced). Other tests running meanwhile may take
/// the forced path too: every path computes the same function, but not to the same bit (the
/// vector paths fuse multiply-adds), so a test that compares two results bit for bit runs
/// both inside one `with_level`.
#[cfg(test)]
static FORCED: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Runs `f` with the kernels capped at `level` (unit tests only; one at a time).
#[cfg(test)]
pub fn with_level<T>(level: SimdLevel, f: impl FnOnce() -> T) -> T {
    use std::sync::atomic::Ordering;
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    FORCED.store(level as u8 + 1, Ordering::Relaxed);
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    FORCED.store(0, Ordering::Relaxed);
    out.unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Every level this CPU runs, narrowest first (unit tests compare them).
#[cfg(test)]
pub fn available() -> Vec<SimdLevel> {
    [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512]
        .into_iter()
        .filter(|l| *l <= detected())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_and_never_exceed_the_cpu() {
        assert_eq!(SimdLevel::parse("auto").unwrap(), None);
        assert_eq!(SimdLevel::parse(" AVX2 ").unwrap(), Some(SimdLevel::Avx2));
        assert_eq!(
            SimdLevel::parse("portable").unwrap(),
            Some(SimdLevel::Portable)
        );
        let err = SimdLevel::parse("sse9").unwrap_err();
        assert!(err.contains("EARSHOT_SIMD=\"sse9\""), "{err}");
        assert_eq!(resolve(None).unwrap(), detected());
        assert_eq!(resolve(Some("avx512")).unwrap(), detected());
        assert_eq!(
            resolve(Some("portable")).unwrap(),
            SimdLevel::Portable,
            "a narrower level is always allowed"
        );
        assert!(resolve(Some("avx2")).unwrap() <= SimdLevel::Avx2);
    }
}
