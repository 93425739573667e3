//! Support for Sluice's privileged tests, benchmarks and demo: test cgroups and
//! network namespaces that remove themselves, processes started inside them,
//! and small backends that say who answered.
//!
//! Everything here follows the test networking rule: traffic stays on loopback
//! or inside namespaces created here, with no route out.

pub mod cgroup;
pub mod demo;
pub mod lb;
pub mod netns;
pub mod probe;
pub mod servers;
pub mod topology;

use std::sync::atomic::{AtomicU32, Ordering};

/// Fails the calling test with a clear message unless it runs as root: the
/// privileged tests need cgroups, bpf and network namespaces, and must never
/// pass silently without them.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this test needs root (cgroup v2, bpf, network namespaces); run it with \
         `sudo -E env \"PATH=$PATH:/usr/sbin:/sbin\" cargo xtask test` (sudo's own PATH has no \
         ~/.cargo/bin; euid is {euid})"
    );
}

/// A name no other test, run or process uses at the same time: `prefix`, the
/// pid, a per-process counter and a random suffix. Short enough for interface
/// names when `prefix` is at most 4 characters.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let r: u16 = rand::random();
    format!("{prefix}{:x}{n:x}{r:04x}", std::process::id() % 0xfff)
}

/// `CLOCK_MONOTONIC` in nanoseconds, comparable across processes on this
/// machine (the probe stamps its connects with it).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
