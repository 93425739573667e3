//! `certs-issue`: workload certificates issued per second on one core, each
//! one key generation + CSR + CA signature + verification of the result
//! against the trust bundle, as a node and the in-process CA do it. Then the
//! same through the identity manager for a whole node's worth of identities.
//! Target: 1,000/s, so 10,000 identities rotate in under 10 s.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use certs::{
    Ca, CaOptions, IdentityManager, IdentityOptions, SpiffeId, SystemClock,
    verify::{self, Usage},
};

use crate::{
    pin::{pin_current_thread, unpin_current_thread},
    report::{Section, ratio},
};

const TARGET_PER_SEC: f64 = 1000.0;

#[derive(Default)]
struct Stages {
    keygen: Duration,
    csr: Duration,
    sign: Duration,
    verify: Duration,
}

fn issue_loop(ca: &Ca, n: usize) -> Result<(Duration, Stages)> {
    let id = SpiffeId::new("cluster.local", "bench", "workload")?;
    let bundle = ca.bundle();
    let mut st = Stages::default();
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        let key = certs::ca::generate_workload_key()?;
        let t1 = Instant::now();
        let csr = certs::ca::csr_for(&id, &key)?;
        let t2 = Instant::now();
        let issued = ca.sign_csr(&csr, &id)?;
        let t3 = Instant::now();
        let peer = verify::verify_chain(
            &bundle,
            &issued.chain[0],
            &issued.chain[1..],
            SystemTime::now(),
            Usage::Server,
        )?;
        let t4 = Instant::now();
        anyhow::ensure!(peer.identity == id, "issued the wrong identity");
        st.keygen += t1 - t;
        st.csr += t2 - t1;
        st.sign += t3 - t2;
        st.verify += t4 - t3;
    }
    Ok((start.elapsed(), st))
}

/// A node taking `n` identities at once through `IdentityManager` (one
/// thread, in-process CA, so CPU-bound).
fn manager_round(n: usize) -> Result<Duration> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let clock: certs::SharedClock = Arc::new(SystemClock);
        let ca = Arc::new(Ca::generate(CaOptions::default(), clock.clone())?);
        let m = IdentityManager::new(ca.clone(), ca.bundle(), clock, IdentityOptions::default());
        let ids: Vec<SpiffeId> = (0..n)
            .map(|i| {
                SpiffeId::new(
                    "cluster.local",
                    &format!("ns{}", i % 100),
                    &format!("sa{i}"),
                )
            })
            .collect::<Result<_, _>>()?;
        let start = Instant::now();
        let report = m.set_identities(ids).await?;
        let took = start.elapsed();
        anyhow::ensure!(
            report.failed.is_empty(),
            "issuance failed: {:?}",
            report.failed.first()
        );
        anyhow::ensure!(
            report.issued.len() == n,
            "issued {} of {n}",
            report.issued.len()
        );
        Ok(took)
    })
}

pub fn run(quick: bool) -> Result<()> {
    let n = if quick { 300 } else { 3000 };
    let node_n = if quick { 1000 } else { 10_000 };
    let pinned = pin_current_thread(0);
    let mut rows = Vec::new();
    for intermediate in [false, true] {
        let ca = Ca::generate(
            CaOptions {
                intermediate,
                ..CaOptions::default()
            },
            Arc::new(SystemClock),
        )
        .context("creating the CA")?;
        issue_loop(&ca, n / 10)?; // warm-up
        let (took, st) = issue_loop(&ca, n)?;
        let rate = n as f64 / took.as_secs_f64();
        let us = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e6 / n as f64);
        rows.push(vec![
            if intermediate {
                "root → intermediate → leaf"
            } else {
                "root → leaf"
            }
            .to_string(),
            format!("{rate:.0}"),
            ratio(rate, TARGET_PER_SEC),
            us(st.keygen),
            us(st.csr),
            us(st.sign),
            us(st.verify),
        ]);
    }
    let took = manager_round(node_n)?;
    let node_rate = node_n as f64 / took.as_secs_f64();
    unpin_current_thread();

    let mut s = Section::new("certs-issue", "Workload certificate issuance (certs)");
    s.line(format!(
        "One core{}: key generation (ECDSA P-256) + CSR + CA signature + verification against the \
         trust bundle, {n} certificates per row{}. Baseline: the target of 1,000 certificates/s.\n",
        if pinned {
            " (thread pinned to CPU 0)"
        } else {
            ""
        },
        if quick { " (--quick)" } else { "" }
    ));
    s.line(format!(
        "Load average at the end of the run: {} (other work on the machine shows here).\n",
        crate::pin::load_average()
    ));
    s.table(
        &[
            "chain",
            "certs/s",
            "× target",
            "keygen µs",
            "CSR µs",
            "sign µs",
            "verify µs",
        ],
        &rows,
    );
    s.line(format!(
        "A node taking {node_n} identities at once through `IdentityManager::set_identities` \
         (in-process CA, one thread, also key checks and rustls key loading): {:.2} s, \
         {node_rate:.0} identities/s, {} × target.",
        took.as_secs_f64(),
        ratio(node_rate, TARGET_PER_SEC)
    ));
    s.write()
}
