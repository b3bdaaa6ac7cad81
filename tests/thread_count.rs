//! The CPU thread count is worked out once per process, not on every matrix product.
//!
//! candle 0.11's CPU matmul asks for its thread count on every call and, without
//! `RAYON_NUM_THREADS`, reads all of `/proc/cpuinfo` to count physical cores: 60 times per
//! decoded token, which cost 16% of decode speed on 2 cores. `count_threads_once` (called
//! first by `earshot`'s `main`) answers it once. Its own test binary: it sets the process's
//! environment and builds rayon's global pool, which no other test may share.

use candle_core::{Device, Tensor};

/// Bytes this process has read through read(2) and friends so far (`rchar`).
fn bytes_read() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("reading /proc/self/io");
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .expect("/proc/self/io has an rchar line")
        .trim()
        .parse()
        .expect("rchar is a number")
}

#[test]
fn candle_products_do_not_reread_proc_cpuinfo_and_the_pools_keep_their_sizes() {
    std::env::remove_var("RAYON_NUM_THREADS");
    let cpuinfo_bytes = std::fs::read("/proc/cpuinfo")
        .expect("reading /proc/cpuinfo")
        .len() as u64;
    assert!(cpuinfo_bytes > 0, "/proc/cpuinfo is empty here");
    // What candle would compute on its own (this call reads /proc/cpuinfo itself).
    let candle_threads = candle_core::utils::get_num_threads();

    earshot::models::device::count_threads_once();

    assert_eq!(
        std::env::var("RAYON_NUM_THREADS").ok(),
        Some(candle_threads.to_string()),
        "RAYON_NUM_THREADS should hold candle's own count"
    );
    assert_eq!(candle_core::utils::get_num_threads(), candle_threads);
    // rayon's pool is its default size (every logical CPU), not candle's count.
    let logical = std::thread::available_parallelism().unwrap().get();
    assert_eq!(rayon::current_num_threads(), logical);

    // 60 products of one decode step's attention shape: a (9, 1, 64) x (9, 64, 200).
    let q = Tensor::ones((9, 1, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
    let k = Tensor::ones((9, 64, 200), candle_core::DType::F32, &Device::Cpu).unwrap();
    let before = bytes_read();
    for _ in 0..60 {
        let s = q.matmul(&k).unwrap();
        assert_eq!(s.dims(), [9, 1, 200]);
    }
    let read = bytes_read() - before;
    // Reading /proc/self/io itself counts a few hundred bytes; one /proc/cpuinfo per product
    // would count 60 times its size.
    assert!(
        read < cpuinfo_bytes,
        "60 products read {read} bytes (/proc/cpuinfo is {cpuinfo_bytes}): the thread count is \
         being worked out per product again"
    );

    // A user's own count is left alone.
    std::env::set_var("RAYON_NUM_THREADS", "3");
    earshot::models::device::count_threads_once();
    assert_eq!(std::env::var("RAYON_NUM_THREADS").as_deref(), Ok("3"));
}
