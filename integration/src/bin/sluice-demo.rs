//! sluice-demo: the standalone demo behind `cargo xtask demo` (needs root).
//! Builds a node out of network namespaces, runs mesh-agent on
//! examples/demo, sends real traffic and prints what happened.

use std::{path::PathBuf, process::ExitCode, sync::atomic::Ordering};

use integration::demo::{self, DemoReport, ECHO_VIP, REVIEWS_VIP, WEB_1_POD, WEB_VIP};

extern "C" fn on_stop_signal(_: libc::c_int) {
    demo::INTERRUPTED.store(true, Ordering::Relaxed);
}

fn line(ok: bool, text: String) -> bool {
    println!("  {} {text}", if ok { "[ok]  " } else { "[FAIL]" });
    ok
}

fn summary(r: &DemoReport) -> bool {
    let mut all = true;
    let pct = |m: &std::collections::BTreeMap<String, usize>, k: &str| {
        let total: usize = m.values().sum();
        100.0 * *m.get(k).unwrap_or(&0) as f64 / total.max(1) as f64
    };
    println!("\nWhat happened:");
    all &= line(
        r.web.len() == 3 && r.web_failures.is_empty(),
        format!(
            "frontend -> {WEB_VIP} (web) through the node proxy and mTLS: {:?}, {} failed",
            r.web,
            r.web_failures.len()
        ),
    );
    all &= line(
        r.reviews.len() == 2 && r.reviews_failures.is_empty(),
        format!(
            "frontend -> {REVIEWS_VIP} (reviews), HTTPRoute 90/10: v1 {:.0}%, v2 {:.0}% of {} requests",
            pct(&r.reviews, "reviews-v1"),
            pct(&r.reviews, "reviews-v2"),
            r.reviews.values().sum::<usize>()
        ),
    );
    all &= line(
        r.direct.len() == 1 && r.direct.contains_key("web-1") && r.direct_failures.is_empty(),
        format!(
            "frontend -> {WEB_1_POD} (web-1's own address, no Service) through the node proxy and mTLS: {:?}, {} failed",
            r.direct,
            r.direct_failures.len()
        ),
    );
    let refused =
        |a: &[integration::probe::Attempt]| a.iter().all(|a| a.errno == Some(libc::ECONNREFUSED));
    all &= line(
        refused(&r.plaintext_direct) && refused(&r.plaintext_vip),
        format!(
            "legacy-client plaintext -> {WEB_1_POD} and -> {WEB_VIP}: refused by STRICT ({} and {} connects, {:?})",
            r.plaintext_direct.len(),
            r.plaintext_vip.len(),
            r.plaintext_direct.first().and_then(|a| a.error.clone())
        ),
    );
    all &= line(
        r.echo.len() == 2 && r.echo_failures.is_empty(),
        format!(
            "legacy-client -> {ECHO_VIP} (echo), kernel load balancing only: {:?}",
            r.echo
        ),
    );
    println!("\n$ sluice status\n{}", r.status);
    println!("$ sluice workloads\n{}", r.workloads);
    println!("$ sluice tls\n{}", r.tls);
    all
}

fn main() -> ExitCode {
    // SAFETY: installing a handler that only stores to an atomic. SIGTERM
    // too (a `kill`, a closed terminal's HUP, a test runner's timeout): the
    // demo stops at its next step and removes its namespaces, cgroups and
    // pinned maps, which a default death leaves behind.
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
    let manifests = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/demo"));
    let bins = match demo::Binaries::beside_current_exe() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("sluice-demo: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let mut say = |s: &str| println!("-- {s}");
    match demo::run(bins, &manifests, &mut say) {
        Ok(report) => {
            if summary(&report) {
                println!("The demo ran as expected; everything it created is removed.");
                ExitCode::SUCCESS
            } else {
                println!("Some outcomes were not as expected (see [FAIL] above).");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("sluice-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
