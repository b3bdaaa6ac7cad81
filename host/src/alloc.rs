//! Allocator tuning for large tensors.
//!
//! glibc serves allocations above its mmap threshold (128 KiB, rising dynamically) with
//! fresh mappings, so every activation, KV cache copy and gradient of a forward/backward is
//! page-faulted and zeroed by the kernel again: a batched decode ran 4x slower the first
//! time a shape appeared, and a training step spent most of its time in the kernel. Keeping
//! such blocks in the heap and not trimming it makes repeated shapes reuse memory.

/// Raises glibc's mmap and trim thresholds (no-op elsewhere). Call once at start-up.
pub fn tune_for_tensors() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; it is called before other threads
    // allocate heavily and its failure (return 0) leaves the defaults in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
