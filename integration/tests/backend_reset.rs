//! Sockets pinned to a backend that leaves its service are reset, so clients
//! move on to a live backend. Real kernel, test cgroup, loopback. Needs root.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use ebpf_lb::{Backend, BackendState, Change, Frontend, ServiceSpec};
use integration::{
    cgroup::TestCgroup,
    lb::{TestLb, random_vip},
    monotonic_ns,
    probe::{Attempt, Probe},
    require_root,
    servers::{TcpBackend, UdpBackend},
};

const NETPROBE: &str = env!("CARGO_BIN_EXE_netprobe");

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Polls `f` until it is true or `limit` passes.
fn wait_for(limit: Duration, what: &str, f: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn session(
    cg: &TestCgroup,
    to: SocketAddr,
    pings: u64,
) -> Result<integration::probe::RunningProbe> {
    Probe::new(
        NETPROBE,
        &[
            "tcp-session",
            "--to",
            &to.to_string(),
            "--pings",
            &pings.to_string(),
            "--interval-ms",
            "20",
        ],
    )
    .in_cgroup(cg)
    .spawn()
}

fn is_reset(a: &Attempt) -> bool {
    matches!(
        a.errno,
        Some(libc::ECONNRESET) | Some(libc::ECONNABORTED) | Some(libc::EPIPE)
    )
}

/// A pinned session's pings: answered until the backend left at
/// `gone_at`, and ended by a reset.
fn answered_until_reset(pinned: &[Attempt], gone_at: u64) {
    assert!(
        pinned
            .iter()
            .filter(|p| p.errno.is_none())
            .all(|p| p.start_ns < gone_at),
        "{pinned:?}"
    );
    assert!(is_reset(pinned.last().unwrap()), "{:?}", pinned.last());
}

#[test]
fn a_long_lived_tcp_connection_to_a_removed_backend_is_reset() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("rst")?;
    let lb = TestLb::attach_to(&cg)?;
    let a = TcpBackend::start(loopback(), "a")?;
    let vip = SocketAddr::new(random_vip().into(), 80);
    lb.upsert_service(&ServiceSpec::new(
        Frontend::tcp(vip),
        [Backend::ready(a.addr())],
    ))?;

    // An unrelated connection straight to the same backend address, and one
    // through another service that shares the backend: neither is ours to cut.
    let other_vip = SocketAddr::new(random_vip().into(), 81);
    lb.upsert_service(&ServiceSpec::new(
        Frontend::tcp(other_vip),
        [Backend::ready(a.addr())],
    ))?;
    let pinned = session(&cg, vip, 400)?;
    let direct = session(&cg, a.addr(), 60)?;
    let via_other = session(&cg, other_vip, 60)?;
    wait_for(Duration::from_secs(5), "three connections", || {
        a.hits() == 3
    })?;

    let b = TcpBackend::start(loopback(), "b")?;
    let removed_at = monotonic_ns();
    let report = lb.apply(&[Change::Upsert(ServiceSpec::new(
        Frontend::tcp(vip),
        [Backend::ready(b.addr())],
    ))])?;
    let returned_at = monotonic_ns();
    assert_eq!(report.reset.destroyed, 1, "{report:?}");

    let pinned = pinned.finish()?;
    let last = pinned.last().expect("session output");
    assert!(is_reset(last), "the pinned connection ended with {last:?}");
    // Every ping that started after the removal returned failed.
    assert!(
        pinned
            .iter()
            .filter(|p| p.start_ns > returned_at)
            .all(|p| p.errno.is_some()),
        "{pinned:?}"
    );
    assert!(
        pinned
            .iter()
            .any(|p| p.start_ns < removed_at && p.errno.is_none())
    );

    for untouched in [direct.finish()?, via_other.finish()?] {
        assert_eq!(
            untouched.len(),
            61,
            "an unrelated connection was cut: {:?}",
            untouched.last()
        );
        assert!(untouched.iter().all(|p| p.errno.is_none()), "{untouched:?}");
    }
    // New connections go to the live backend.
    let next = Probe::new(NETPROBE, &["tcp", "--to", &vip.to_string()])
        .in_cgroup(&cg)
        .run()?;
    assert_eq!(next[0].backend.as_deref(), Some("b"));
    Ok(())
}

#[test]
fn a_terminating_backend_keeps_its_connections_until_it_is_removed() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("term")?;
    let lb = TestLb::attach_to(&cg)?;
    let a = TcpBackend::start(loopback(), "a")?;
    let b = TcpBackend::start(loopback(), "b")?;
    let vip = SocketAddr::new(random_vip().into(), 80);
    let fe = Frontend::tcp(vip);
    lb.upsert_service(&ServiceSpec::new(fe, [Backend::ready(a.addr())]))?;
    let pinned = session(&cg, vip, 1000)?;
    wait_for(Duration::from_secs(5), "the connection", || a.hits() == 1)?;

    // a is terminating: no new connections, the open one stays.
    let terminating = ServiceSpec::new(
        fe,
        [
            Backend {
                addr: a.addr(),
                state: BackendState::Terminating,
            },
            Backend::ready(b.addr()),
        ],
    );
    assert_eq!(lb.apply(&[Change::Upsert(terminating)])?.reset.destroyed, 0);
    let next = Probe::new(NETPROBE, &["tcp", "--to", &vip.to_string()])
        .in_cgroup(&cg)
        .run()?;
    assert_eq!(next[0].backend.as_deref(), Some("b"));
    std::thread::sleep(Duration::from_millis(200));

    // a is gone: now its connection is reset.
    let report = lb.apply(&[Change::Upsert(ServiceSpec::new(
        fe,
        [Backend::ready(b.addr())],
    ))])?;
    let gone_at = monotonic_ns();
    assert_eq!(report.reset.destroyed, 1);
    let pinned = pinned.finish()?;
    let ok_while_terminating = pinned.iter().filter(|p| p.errno.is_none()).count();
    assert!(ok_while_terminating > 5, "{pinned:?}");
    answered_until_reset(&pinned, gone_at);
    Ok(())
}

#[test]
fn a_not_ready_tcp_backend_keeps_its_connections_until_it_leaves() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("nrr")?;
    let lb = TestLb::attach_to(&cg)?;
    let a = TcpBackend::start(loopback(), "a")?;
    let b = TcpBackend::start(loopback(), "b")?;
    let vip = SocketAddr::new(random_vip().into(), 80);
    let fe = Frontend::tcp(vip);
    lb.upsert_service(&ServiceSpec::new(fe, [Backend::ready(a.addr())]))?;
    let pinned = session(&cg, vip, 1000)?;
    wait_for(Duration::from_secs(5), "the connection", || a.hits() == 1)?;

    // a fails its readiness probe for a moment: no new connections, but the
    // open one stays, as it does behind kube-proxy.
    let flap = ServiceSpec::new(
        fe,
        [
            Backend {
                addr: a.addr(),
                state: BackendState::NotReady,
            },
            Backend::ready(b.addr()),
        ],
    );
    let flapped_at = monotonic_ns();
    assert_eq!(
        lb.apply(&[Change::Upsert(flap.clone())])?.reset.destroyed,
        0
    );
    let next = Probe::new(NETPROBE, &["tcp", "--to", &vip.to_string()])
        .in_cgroup(&cg)
        .run()?;
    assert_eq!(next[0].backend.as_deref(), Some("b"));
    std::thread::sleep(Duration::from_millis(200));
    let both = [Backend::ready(a.addr()), Backend::ready(b.addr())];
    assert_eq!(
        lb.apply(&[Change::Upsert(ServiceSpec::new(fe, both))])?
            .reset
            .destroyed,
        0
    );
    std::thread::sleep(Duration::from_millis(200));
    // Not ready again, and then gone while still not ready: now its
    // connection is reset.
    assert_eq!(
        lb.apply(&[Change::Upsert(flap.clone())])?.reset.destroyed,
        0
    );
    let report = lb.apply(&[Change::Upsert(ServiceSpec::new(
        fe,
        [Backend::ready(b.addr())],
    ))])?;
    let gone_at = monotonic_ns();
    assert_eq!(report.reset.destroyed, 1, "{report:?}");
    let pinned = pinned.finish()?;
    let answered_while_not_ready = pinned
        .iter()
        .filter(|p| p.errno.is_none() && p.start_ns > flapped_at)
        .count();
    assert!(answered_while_not_ready > 5, "{pinned:?}");
    answered_until_reset(&pinned, gone_at);

    // A removed service resets its connections, whatever their state.
    let second = session(&cg, vip, 1000)?;
    wait_for(Duration::from_secs(5), "the connection", || b.hits() == 2)?;
    assert_eq!(lb.apply(&[Change::Remove(fe)])?.reset.destroyed, 1);
    assert!(is_reset(second.finish()?.last().unwrap()));
    Ok(())
}

#[test]
fn a_connected_udp_client_moves_to_a_live_backend_after_a_removal() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("udpr")?;
    let lb = TestLb::attach_to(&cg)?;
    let u0 = UdpBackend::start(loopback(), "u0")?;
    let u1 = UdpBackend::start(loopback(), "u1")?;
    let vip = SocketAddr::new(random_vip().into(), 53);
    let fe = Frontend::udp(vip);
    let both = [Backend::ready(u0.addr()), Backend::ready(u1.addr())];
    lb.upsert_service(&ServiceSpec::new(fe, both))?;

    let client = Probe::new(
        NETPROBE,
        &[
            "udp-session",
            "--to",
            &vip.to_string(),
            "--count",
            "60",
            "--interval-ms",
            "20",
        ],
    )
    .in_cgroup(&cg)
    .spawn()?;
    wait_for(Duration::from_secs(5), "the first answers", || {
        u0.hits() + u1.hits() >= 5
    })?;
    // The client's socket is pinned to whichever backend answered.
    let (pinned, pinned_id, live) = if u0.hits() > 0 {
        (u0.addr(), "u0", u1.addr())
    } else {
        (u1.addr(), "u1", u0.addr())
    };
    assert!(
        u0.hits() == 0 || u1.hits() == 0,
        "one connected socket, one backend"
    );
    let removed_at = monotonic_ns();
    let spec = ServiceSpec::new(
        fe,
        [
            Backend {
                addr: pinned,
                state: BackendState::NotReady,
            },
            Backend::ready(live),
        ],
    );
    let report = lb.apply(&[Change::Upsert(spec)])?;
    let returned_at = monotonic_ns();
    assert_eq!(report.reset.destroyed, 1, "{report:?}");

    let attempts = client.finish()?;
    // One send fails: the one that met the reset socket. The client opens a
    // new socket (as resolvers do) and every answer after the removal
    // returned comes from the live backend, from the VIP.
    let errors: Vec<&Attempt> = attempts.iter().filter(|a| a.errno.is_some()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].start_ns > removed_at, "{:?}", errors[0]);
    let after: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.start_ns > returned_at && a.errno.is_none())
        .collect();
    assert!(after.len() > 10, "{attempts:?}");
    for a in &after {
        assert_ne!(a.backend.as_deref(), Some(pinned_id), "{a:?}");
        assert_eq!(a.peer.as_deref(), Some(vip.to_string().as_str()), "{a:?}");
    }
    Ok(())
}

/// A batch that removes a frontend and sets it up again (it moved from one
/// Service to another) resets only the connections whose backend is not in
/// the new set.
#[test]
fn a_frontend_removed_and_set_up_again_in_one_batch_keeps_connections_to_staying_backends()
-> Result<()> {
    require_root();
    let cg = TestCgroup::new("mv")?;
    let lb = TestLb::attach_to(&cg)?;
    let a = TcpBackend::start(loopback(), "a")?;
    let vip = SocketAddr::new(random_vip().into(), 80);
    let fe = Frontend::tcp(vip);
    lb.upsert_service(&ServiceSpec::new(fe, [Backend::ready(a.addr())]))?;
    let kept = session(&cg, vip, 60)?;
    wait_for(Duration::from_secs(5), "the connection", || a.hits() == 1)?;

    let b = TcpBackend::start(loopback(), "b")?;
    let report = lb.apply(&[
        Change::Remove(fe),
        Change::Upsert(ServiceSpec::new(
            fe,
            [Backend::ready(a.addr()), Backend::ready(b.addr())],
        )),
    ])?;
    assert_eq!(report.reset.destroyed, 0, "{report:?}");
    let kept = kept.finish()?;
    assert_eq!(kept.len(), 61, "the connection was cut: {:?}", kept.last());
    assert!(kept.iter().all(|p| p.errno.is_none()), "{kept:?}");
    Ok(())
}
