//! Kernel load balancing, on the real kernel: programs attached to a cgroup
//! each test creates, clients (`netprobe`) started inside it, backends on
//! loopback or inside a test network namespace. Needs root.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use ebpf_lb::{Backend, BackendState, Change, Error, Frontend, ProxyTarget, ServiceSpec};
use integration::{
    cgroup::TestCgroup,
    lb::{TestLb, random_vip_addr, test_options},
    monotonic_ns,
    netns::TestNetns,
    probe::{Attempt, Probe, tally},
    require_root,
    servers::{TcpBackend, UdpBackend, dns_a_responder},
};

const NETPROBE: &str = env!("CARGO_BIN_EXE_netprobe");
const ECONNREFUSED: i32 = 111;

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn tcp_backends(n: usize, bind: SocketAddr) -> Result<Vec<TcpBackend>> {
    (0..n)
        .map(|i| TcpBackend::start(bind, &format!("b{i}")))
        .collect()
}

fn ready(backends: &[TcpBackend]) -> Vec<Backend> {
    backends.iter().map(|b| Backend::ready(b.addr())).collect()
}

fn tcp(to: SocketAddr, count: u64) -> Vec<String> {
    vec![
        "tcp".into(),
        "--to".into(),
        to.to_string(),
        "--count".into(),
        count.to_string(),
    ]
}

fn probe(args: &[String]) -> Probe {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Probe::new(NETPROBE, &args)
}

fn assert_all_ok(attempts: &[Attempt]) {
    for a in attempts {
        assert!(
            a.errno.is_none() && a.backend.is_some(),
            "attempt failed: {a:?}"
        );
    }
}

/// Whether every attempt was answered by `who` (a backend's name, or
/// `decoy`: the VIP's own listener, left alone by the load balancer).
fn all_answered_by(attempts: &[Attempt], who: &str) -> bool {
    attempts.iter().all(|a| a.backend.as_deref() == Some(who))
}

/// A decoy listening on the VIP address itself: a connection that the load
/// balancer leaves alone lands here, and says so.
fn decoy() -> Result<TcpBackend> {
    TcpBackend::start(random_vip_addr(), "decoy")
}

/// A TCP service on a fresh VIP (its decoy listening there) with `n`
/// backends `b0`..; `meshed`: enrolled callers go to the proxy.
fn tcp_service(lb: &TestLb, n: usize, meshed: bool) -> Result<(TcpBackend, Vec<TcpBackend>)> {
    let decoy = decoy()?;
    let backends = tcp_backends(n, loopback())?;
    let mut spec = ServiceSpec::new(Frontend::tcp(decoy.addr()), ready(&backends));
    spec.meshed = meshed;
    lb.upsert_service(&spec)?;
    Ok((decoy, backends))
}

#[test]
fn tcp_v4_reaches_every_backend_and_getpeername_shows_the_vip() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("lb")?;
    let lb = TestLb::attach_to(&cg)?;
    let decoy = decoy()?;
    let vip = decoy.addr();
    let backends = tcp_backends(3, loopback())?;
    lb.upsert_service(&ServiceSpec::new(Frontend::tcp(vip), ready(&backends)))?;

    let attempts = probe(&tcp(vip, 300)).in_cgroup(&cg).run()?;
    assert_eq!(attempts.len(), 300);
    assert_all_ok(&attempts);
    for a in &attempts {
        assert_eq!(
            a.peer.as_deref(),
            Some(vip.to_string().as_str()),
            "getpeername: {a:?}"
        );
    }
    let t = tally(&attempts);
    assert_eq!(
        t.keys().cloned().collect::<Vec<_>>(),
        ["b0", "b1", "b2"],
        "{t:?}"
    );
    assert!(
        t.values().all(|&n| n >= 30),
        "uneven spread over 300 connections: {t:?}"
    );
    assert_eq!(decoy.hits(), 0);
    assert_eq!(lb.counters(&Frontend::tcp(vip))?.balanced, 300);
    // Every connection is closed: no reverse translation is left behind to
    // crowd out those of live sockets.
    assert_nothing_tracked(&lb);
    Ok(())
}

/// Every socket the probes made is closed: their reverse translations went
/// with them (TCP: `sock_ops` at close; UDP: `sock_release`).
fn assert_nothing_tracked(lb: &TestLb) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lb.tracked_sockets() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} reverse translations outlive their sockets",
            lb.tracked_sockets()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn tcp_v6_reaches_every_backend_inside_a_namespace() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("lb6")?;
    let lb = TestLb::attach_to(&cg)?;
    let ns = TestNetns::new("l6")?;
    let backends: Vec<TcpBackend> = (0..3)
        .map(|i| TcpBackend::start_in(&ns, "[::1]:0".parse().unwrap(), &format!("b{i}")))
        .collect::<Result<_>>()?;
    let vip: SocketAddr = "[fd00:96::10]:80".parse().unwrap();
    lb.upsert_service(&ServiceSpec::new(Frontend::tcp(vip), ready(&backends)))?;

    let attempts = probe(&tcp(vip, 300)).in_cgroup(&cg).in_netns(&ns)?.run()?;
    assert_all_ok(&attempts);
    for a in &attempts {
        assert_eq!(
            a.peer.as_deref(),
            Some("[fd00:96::10]:80"),
            "getpeername: {a:?}"
        );
    }
    let t = tally(&attempts);
    assert_eq!(t.len(), 3, "{t:?}");
    assert!(t.values().all(|&n| n >= 30), "{t:?}");
    assert_nothing_tracked(&lb);
    Ok(())
}

#[test]
fn dual_stack_socket_reaches_an_ipv4_service_through_a_mapped_address() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("lbm")?;
    let lb = TestLb::attach_to(&cg)?;
    let decoy = decoy()?;
    let vip = decoy.addr();
    let backends = tcp_backends(2, loopback())?;
    lb.upsert_service(&ServiceSpec::new(Frontend::tcp(vip), ready(&backends)))?;
    let SocketAddr::V4(v4) = vip else {
        unreachable!()
    };
    let mapped = SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port());
    let attempts = probe(&tcp(mapped, 40)).in_cgroup(&cg).run()?;
    assert_all_ok(&attempts);
    for a in &attempts {
        assert_eq!(
            a.peer.as_deref(),
            Some(mapped.to_string().as_str()),
            "{a:?}"
        );
    }
    assert_eq!(tally(&attempts).len(), 2);
    assert_eq!(decoy.hits(), 0);
    // Their reverse translations (stored in the mapped form the socket
    // uses) went when they closed.
    assert_nothing_tracked(&lb);
    Ok(())
}

/// A dual-stack socket sending to an IPv4 service through its mapped
/// address: the kernel hands the datagram to IPv4 (sendmsg4, address
/// unmapped) and the reply back through IPv6 (recvmsg6, address mapped).
#[test]
fn dual_stack_udp_replies_come_from_the_mapped_vip_connected_or_not() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("lbum")?;
    let lb = TestLb::attach_to(&cg)?;
    let vip = SocketAddr::new(integration::lb::random_vip().into(), 5353);
    let backends: Vec<UdpBackend> = (0..2)
        .map(|i| UdpBackend::start(loopback(), &format!("u{i}")))
        .collect::<Result<_>>()?;
    lb.upsert_service(&ServiceSpec::new(
        Frontend::udp(vip),
        backends.iter().map(|b| Backend::ready(b.addr())),
    ))?;
    let SocketAddr::V4(v4) = vip else {
        unreachable!()
    };
    let mapped = SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port());
    for connected in [false, true] {
        let mut args: Vec<String> = ["udp", "--to", &mapped.to_string(), "--count", "40"]
            .map(String::from)
            .into();
        if connected {
            args.push("--connected".into());
        }
        let attempts = probe(&args).in_cgroup(&cg).run()?;
        assert_all_ok(&attempts);
        for a in &attempts {
            assert_eq!(
                a.peer.as_deref(),
                Some(mapped.to_string().as_str()),
                "connected={connected}, reply source: {a:?}"
            );
        }
        assert_eq!(tally(&attempts).len(), 2, "{:?}", tally(&attempts));
        assert_nothing_tracked(&lb);
    }
    Ok(())
}

#[test]
fn udp_replies_come_from_the_vip_connected_or_not() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("lbu")?;
    let lb = TestLb::attach_to(&cg)?;
    let vip = SocketAddr::new(integration::lb::random_vip().into(), 5353);
    let backends: Vec<UdpBackend> = (0..3)
        .map(|i| UdpBackend::start(loopback(), &format!("u{i}")))
        .collect::<Result<_>>()?;
    let spec = ServiceSpec::new(
        Frontend::udp(vip),
        backends.iter().map(|b| Backend::ready(b.addr())),
    );
    lb.upsert_service(&spec)?;

    for connected in [false, true] {
        let mut args = vec![
            "udp".to_string(),
            "--to".into(),
            vip.to_string(),
            "--count".into(),
            "90".into(),
        ];
        if connected {
            args.push("--connected".into());
        }
        let attempts = probe(&args).in_cgroup(&cg).run()?;
        assert_all_ok(&attempts);
        for a in &attempts {
            assert_eq!(
                a.peer.as_deref(),
                Some(vip.to_string().as_str()),
                "reply source: {a:?}"
            );
        }
        assert_eq!(
            tally(&attempts).len(),
            3,
            "connected={connected}: {:?}",
            tally(&attempts)
        );
        // The probe has exited: its sockets (one per query) took their
        // entries with them.
        assert_nothing_tracked(&lb);
    }
    // One socket sending to the VIP again and again (unconnected: each
    // datagram through sendmsg) keeps one backend, as kube-proxy's
    // conntrack keeps a flow: a QUIC client's datagrams must not be spread;
    // each reply is from the VIP, and closed, the socket takes its entry
    // along.
    let args: Vec<String> = [
        "udp",
        "--to",
        &vip.to_string(),
        "--count",
        "60",
        "--one-socket",
    ]
    .map(String::from)
    .into();
    let attempts = probe(&args).in_cgroup(&cg).run()?;
    assert_all_ok(&attempts);
    assert!(
        attempts
            .iter()
            .all(|a| a.peer.as_deref() == Some(vip.to_string().as_str())),
        "{attempts:?}"
    );
    let locals: BTreeSet<_> = attempts.iter().map(|a| a.local.clone()).collect();
    assert_eq!(locals.len(), 1, "one socket: {locals:?}");
    assert_eq!(tally(&attempts).len(), 1, "{:?}", tally(&attempts));
    assert_nothing_tracked(&lb);
    // Socket after socket, each keeping its own: all three get some.
    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        let attempts = probe(&args).in_cgroup(&cg).run()?;
        assert_all_ok(&attempts);
        let t = tally(&attempts);
        assert_eq!(t.len(), 1, "one socket, one backend: {t:?}");
        seen.extend(t.into_keys());
        if seen.len() == 3 {
            break;
        }
    }
    assert_eq!(seen.len(), 3, "sockets spread over the backends: {seen:?}");
    assert_nothing_tracked(&lb);
    Ok(())
}

/// An unconnected UDP socket's datagrams keep going to the backend they
/// went to while backends come and go (a QUIC client's flow would break
/// if they moved, and kube-proxy's conntrack keeps it), and move only when
/// that backend leaves, not back when it returns.
#[test]
fn an_unconnected_udp_flow_keeps_its_backend_while_others_come_and_go() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("udk")?;
    let lb = TestLb::attach_to(&cg)?;
    let decoy = UdpBackend::start(random_vip_addr(), "decoy")?;
    let vip = decoy.addr();
    let backends: Vec<UdpBackend> = (0..8)
        .map(|i| UdpBackend::start(loopback(), &format!("b{i}")))
        .collect::<Result<_>>()?;
    let spec = |n: usize, from: usize| {
        ServiceSpec::new(
            Frontend::udp(vip),
            backends[from..n].iter().map(|b| Backend::ready(b.addr())),
        )
    };
    lb.upsert_service(&spec(1, 0))?;
    // Three sockets, each sending every 20 ms for 3 s; once each has sent
    // (its reverse translation is in the kernel), the service grows from
    // one backend to eight. Were flows chosen afresh by the new count, each
    // would stay by chance 1 in 8.
    let args: Vec<String> = [
        "udp",
        "--to",
        &vip.to_string(),
        "--count",
        "150",
        "--one-socket",
        "--interval-ms",
        "20",
    ]
    .map(String::from)
    .into();
    let probes = (0..3)
        .map(|_| probe(&args).in_cgroup(&cg).spawn())
        .collect::<Result<Vec<_>>>()?;
    // Whether `done` came true within 2 s.
    let wait_for = |done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !done() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    };
    assert!(
        wait_for(&|| lb.tracked_sockets() >= 3),
        "the three sockets sent"
    );
    lb.upsert_service(&spec(8, 0))?;
    // They send on (to b0 if they stay there; not waited for otherwise).
    let hits = backends[0].hits();
    wait_for(&|| backends[0].hits() >= hits + 15);
    // Then the backend they use leaves: they move, and stay where they go,
    // also once it is back.
    lb.upsert_service(&spec(8, 1))?;
    assert!(
        wait_for(&|| lb.tracked_sockets() >= 6),
        "the three sockets sent elsewhere"
    );
    lb.upsert_service(&spec(8, 0))?;
    for p in probes {
        let attempts = p.finish()?;
        assert_all_ok(&attempts);
        let mut runs: Vec<&str> = attempts
            .iter()
            .map(|a| a.backend.as_deref().unwrap_or(""))
            .collect();
        runs.dedup();
        assert_eq!(runs.len(), 2, "one move, when b0 left: {runs:?}");
        assert_eq!(runs[0], "b0", "{runs:?}");
    }
    Ok(())
}

#[test]
fn the_system_resolver_works_against_a_dns_service_vip() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("dns")?;
    let lb = TestLb::attach_to(&cg)?;
    let mut ns = TestNetns::new("dns")?;
    let answer = Ipv4Addr::new(10, 1, 2, 3);
    let servers: Vec<UdpBackend> = (0..2)
        .map(|_| {
            UdpBackend::start_with(
                Some(&ns),
                loopback(),
                dns_a_responder("web.sluice.test", answer),
            )
        })
        .collect::<Result<_>>()?;
    // A ClusterIP that exists nowhere in the namespace: only the load
    // balancer makes it answer.
    let vip: SocketAddr = "10.96.0.10:53".parse().unwrap();
    let spec = ServiceSpec::new(
        Frontend::udp(vip),
        servers.iter().map(|s| Backend::ready(s.addr())),
    );
    lb.upsert_service(&spec)?;
    ns.set_resolv_conf("nameserver 10.96.0.10\noptions timeout:2 attempts:1\n")?;

    for _ in 0..6 {
        let attempts =
            Probe::via_ip_netns_exec(NETPROBE, &ns, &["resolve", "--name", "web.sluice.test"])
                .in_cgroup(&cg)
                .run()?;
        assert_eq!(attempts.len(), 1);
        assert_eq!(
            attempts[0].backend.as_deref(),
            Some("10.1.2.3"),
            "{:?}",
            attempts[0]
        );
    }
    assert!(servers.iter().map(UdpBackend::hits).sum::<u64>() >= 6);
    Ok(())
}

#[test]
fn client_ip_affinity_sticks_and_then_expires() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("aff")?;
    let lb = TestLb::attach_to(&cg)?;
    let decoy = decoy()?;
    let vip = decoy.addr();
    let backends = tcp_backends(3, loopback())?;
    let mut spec = ServiceSpec::new(Frontend::tcp(vip), ready(&backends));
    spec.affinity = Some(Duration::from_secs(1));
    lb.upsert_service(&spec)?;

    // Within the timeout, every connection (each from a new socket and a new
    // process) goes to the same backend. Past it, the next burst chooses
    // again at random: bursts go on until a second backend has been chosen
    // (after at least five), so only an affinity that never expires fails
    // (chance of one that does: 3^-39), not an unlucky draw.
    let mut chosen = BTreeSet::new();
    for burst in 0..40 {
        let attempts = probe(&tcp(vip, 20)).in_cgroup(&cg).run()?;
        assert_all_ok(&attempts);
        let t = tally(&attempts);
        assert_eq!(t.len(), 1, "affinity did not stick within one burst: {t:?}");
        chosen.extend(t.into_keys());
        if burst >= 4 && chosen.len() > 1 {
            break;
        }
        // Let the choice expire.
        std::thread::sleep(Duration::from_millis(1200));
    }
    assert!(chosen.len() > 1, "the affinity never expired: {chosen:?}");
    Ok(())
}

#[test]
fn affinity_never_returns_a_backend_that_left_the_service() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("afr")?;
    let lb = TestLb::attach_to(&cg)?;
    let decoy = decoy()?;
    let vip = decoy.addr();
    let backends = tcp_backends(3, loopback())?;
    let mut spec = ServiceSpec::new(Frontend::tcp(vip), ready(&backends));
    spec.affinity = Some(Duration::from_secs(3600));
    lb.upsert_service(&spec)?;
    let first = probe(&tcp(vip, 5)).in_cgroup(&cg).run()?;
    let t = tally(&first);
    assert_eq!(t.len(), 1, "{t:?}");
    let sticky = t.keys().next().unwrap().clone();
    let idx: usize = sticky[1..].parse()?;

    // The remembered backend turns not-ready: nobody is sent there any more.
    spec.backends[idx].state = BackendState::NotReady;
    lb.upsert_service(&spec)?;
    let after = probe(&tcp(vip, 20)).in_cgroup(&cg).run()?;
    assert_all_ok(&after);
    let t = tally(&after);
    assert!(
        !t.contains_key(&sticky),
        "{sticky} left but still got {t:?}"
    );
    assert_eq!(t.len(), 1, "a new sticky choice is made: {t:?}");
    Ok(())
}

#[test]
fn not_ready_and_terminating_backends_get_no_new_connections() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("nr")?;
    let lb = TestLb::attach_to(&cg)?;
    let decoy = decoy()?;
    let vip = decoy.addr();
    let backends = tcp_backends(3, loopback())?;
    let mut spec = ServiceSpec::new(Frontend::tcp(vip), ready(&backends));
    spec.backends[1].state = BackendState::NotReady;
    spec.backends[2].state = BackendState::Terminating;
    lb.upsert_service(&spec)?;
    let attempts = probe(&tcp(vip, 60)).in_cgroup(&cg).run()?;
    assert_all_ok(&attempts);
    assert_eq!(tally(&attempts).keys().cloned().collect::<Vec<_>>(), ["b0"]);
    Ok(())
}

#[test]
fn a_service_without_ready_backends_refuses_at_once() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("nb")?;
    let lb = TestLb::attach_to(&cg)?;
    let decoy = decoy()?;
    let vip = decoy.addr();
    let backends = tcp_backends(1, loopback())?;
    let mut spec = ServiceSpec::new(Frontend::tcp(vip), ready(&backends));
    spec.backends[0].state = BackendState::Terminating;
    lb.upsert_service(&spec)?;
    let udp_vip = SocketAddr::new(vip.ip(), 53);
    lb.upsert_service(&ServiceSpec::new(Frontend::udp(udp_vip), []))?;

    let attempts = probe(&tcp(vip, 5)).in_cgroup(&cg).run()?;
    for a in &attempts {
        // Refused by the load balancer: not a timeout, and not the decoy
        // (which would accept if the connect passed through untranslated).
        assert_eq!(a.errno, Some(ECONNREFUSED), "{a:?}");
    }
    assert_eq!(decoy.hits(), 0);
    assert_eq!(lb.counters(&Frontend::tcp(vip))?.no_backend, 5);

    let args: Vec<String> = ["udp", "--to", &udp_vip.to_string(), "--count", "2"]
        .map(String::from)
        .into();
    let attempts = probe(&args).in_cgroup(&cg).run()?;
    for a in &attempts {
        assert_eq!(a.errno, Some(ECONNREFUSED), "{a:?}");
    }
    Ok(())
}

#[test]
fn other_addresses_and_processes_outside_the_cgroup_are_untouched() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("out")?;
    let lb = TestLb::attach_to(&cg)?;
    let decoy = decoy()?;
    let vip = decoy.addr();
    let other = TcpBackend::start(SocketAddr::new(vip.ip(), 0), "other-port")?;
    let backends = tcp_backends(2, loopback())?;
    lb.upsert_service(&ServiceSpec::new(Frontend::tcp(vip), ready(&backends)))?;

    // Same IP, another port: not a service.
    let attempts = probe(&tcp(other.addr(), 3)).in_cgroup(&cg).run()?;
    assert_eq!(
        tally(&attempts).keys().cloned().collect::<Vec<_>>(),
        ["other-port"]
    );
    // The VIP from outside the cgroup: no load balancing.
    let attempts = probe(&tcp(vip, 3)).run()?;
    assert_eq!(
        tally(&attempts).keys().cloned().collect::<Vec<_>>(),
        ["decoy"]
    );
    assert_eq!(backends.iter().map(TcpBackend::hits).sum::<u64>(), 0);
    Ok(())
}

#[test]
fn removing_a_backend_under_concurrent_connects_never_reaches_it_afterwards() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("rm")?;
    let lb = TestLb::attach_to(&cg)?;
    let decoy = decoy()?;
    let vip = decoy.addr();
    let backends = tcp_backends(4, loopback())?;
    let all = ServiceSpec::new(Frontend::tcp(vip), ready(&backends));
    lb.upsert_service(&all)?;

    let stop = std::env::temp_dir().join(integration::unique_name("stop"));
    let args: Vec<String> = [
        "tcp",
        "--to",
        &vip.to_string(),
        "--until",
        stop.to_str().unwrap(),
    ]
    .map(String::from)
    .into();
    let running = probe(&args).in_cgroup(&cg).spawn()?;
    let mut removed_at = Vec::new();
    // Flip between the full set and the set without b3, many times.
    let without = ServiceSpec::new(Frontend::tcp(vip), ready(&backends[..3]));
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(15));
        lb.upsert_service(&without)?;
        let removed = monotonic_ns();
        std::thread::sleep(Duration::from_millis(15));
        let readd = monotonic_ns();
        lb.upsert_service(&all)?;
        removed_at.push((removed, readd));
    }
    std::fs::write(&stop, "")?;
    let attempts = running.finish();
    let _ = std::fs::remove_file(&stop);
    let attempts = attempts?;
    assert!(
        attempts.len() > 100,
        "too few connects to judge: {}",
        attempts.len()
    );
    // No connect failed while sets were switched (no partial or empty set).
    assert_all_ok(&attempts);
    let mut checked = 0;
    for a in &attempts {
        // Started after a removal returned and before the re-add began.
        if removed_at
            .iter()
            .any(|(r, s)| a.start_ns > *r && a.start_ns < *s)
        {
            checked += 1;
            assert_ne!(
                a.backend.as_deref(),
                Some("b3"),
                "removed backend reached: {a:?}"
            );
        }
    }
    assert!(
        checked > 20,
        "too few connects inside removal windows: {checked}"
    );
    assert!(
        tally(&attempts).contains_key("b3"),
        "b3 was never reached while present"
    );
    Ok(())
}

#[test]
fn enrolled_cgroup_is_redirected_to_the_proxy_with_its_original_destination() -> Result<()> {
    require_root();
    let root = TestCgroup::new("mesh")?;
    let enrolled = root.child("enrolled")?;
    let plain = root.child("plain")?;
    let lb = TestLb::attach_to(&root)?;
    let (decoy, _backends) = tcp_service(&lb, 2, true)?;
    let vip = decoy.addr();

    // The "proxy": a listener that answers with the original destination the
    // loader reports for each accepted connection.
    let proxy = std::net::TcpListener::bind("127.0.0.1:0")?;
    let proxy_addr = proxy.local_addr()?;
    const MARK: u32 = 0x5157;
    lb.set_proxy(Some(ProxyTarget {
        v4: Some(Ipv4Addr::LOCALHOST),
        v6: None,
        port: proxy_addr.port(),
        mark: MARK,
    }))?;
    lb.enroll(enrolled.path())?;
    let found = std::thread::scope(|s| -> Result<Vec<String>> {
        let lb = &lb;
        let server = s.spawn(move || -> Result<Vec<String>> {
            let mut seen = Vec::new();
            for _ in 0..5 {
                let (mut conn, peer) = proxy.accept()?;
                let local = conn.local_addr()?;
                let orig = lb.original_destination(peer, local)?;
                let line = match orig {
                    Some(o) => format!("orig={} cgroup={}", o.dst, o.cgroup_id),
                    None => "orig=none".to_string(),
                };
                std::io::Write::write_all(&mut conn, format!("{line}\n").as_bytes())?;
                seen.push(line);
            }
            Ok(seen)
        });
        let attempts = probe(&tcp(vip, 5)).in_cgroup(&enrolled).run()?;
        assert_all_ok(&attempts);
        for a in &attempts {
            // The application still sees the service address.
            assert_eq!(a.peer.as_deref(), Some(vip.to_string().as_str()), "{a:?}");
        }
        server.join().expect("proxy thread")
    })?;
    let want = format!("orig={vip} cgroup={}", enrolled.id());
    assert_eq!(found, vec![want; 5]);
    assert_eq!(lb.counters(&Frontend::tcp(vip))?.redirected, 5);

    // A sibling that is not enrolled is balanced by the kernel alone.
    let attempts = probe(&tcp(vip, 10)).in_cgroup(&plain).run()?;
    assert_all_ok(&attempts);
    assert!(
        tally(&attempts).keys().all(|b| b.starts_with('b')),
        "{:?}",
        tally(&attempts)
    );
    // The proxy's own sockets (carrying its mark) are never redirected, even
    // from an enrolled cgroup.
    let mut args = tcp(vip, 10);
    args.extend(["--mark".into(), MARK.to_string()]);
    let attempts = probe(&args).in_cgroup(&enrolled).run()?;
    assert_all_ok(&attempts);
    assert!(
        tally(&attempts).keys().all(|b| b.starts_with('b')),
        "{:?}",
        tally(&attempts)
    );

    // Leaving the mesh takes effect for the next connection.
    lb.unenroll(enrolled.id())?;
    let attempts = probe(&tcp(vip, 5)).in_cgroup(&enrolled).run()?;
    assert!(
        tally(&attempts).keys().all(|b| b.starts_with('b')),
        "{:?}",
        tally(&attempts)
    );
    Ok(())
}

/// An enrolled workload's connection straight to a meshed pod's address
/// (a headless Service's pod, a StatefulSet peer) goes to the proxy as one
/// to a meshed Service does, the pod's address its original destination;
/// a pod not meshed, a client not enrolled and the proxy's own sockets
/// reach the pod directly.
#[test]
fn an_enrolled_connection_to_a_meshed_pods_address_goes_to_the_proxy() -> Result<()> {
    require_root();
    let root = TestCgroup::new("podip")?;
    let enrolled = root.child("enrolled")?;
    let plain = root.child("plain")?;
    let lb = TestLb::attach_to(&root)?;
    // Two "pods" at addresses of their own, answering with their names.
    let pods = [
        TcpBackend::start(random_vip_addr(), "pod0")?,
        TcpBackend::start(random_vip_addr(), "pod1")?,
    ];
    let (meshed, other) = (pods[0].addr(), pods[1].addr());
    assert_ne!(meshed.ip(), other.ip());
    let proxy = std::net::TcpListener::bind("127.0.0.1:0")?;
    const MARK: u32 = 0x5158;
    lb.set_proxy(Some(ProxyTarget {
        v4: Some(Ipv4Addr::LOCALHOST),
        v6: None,
        port: proxy.local_addr()?.port(),
        mark: MARK,
    }))?;
    lb.enroll(enrolled.path())?;
    lb.set_meshed_pods(&[meshed.ip()].into())?;
    assert_eq!(lb.meshed_pods(), [meshed.ip()].into());
    let found = std::thread::scope(|s| -> Result<Vec<String>> {
        let lb = &lb;
        let server = s.spawn(move || -> Result<Vec<String>> {
            let mut seen = Vec::new();
            // Not for ever: connections that do not come fail the test.
            proxy.set_nonblocking(true)?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while seen.len() < 3 && std::time::Instant::now() < deadline {
                let (mut conn, peer) = match proxy.accept() {
                    Ok(c) => c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                conn.set_nonblocking(false)?;
                let orig = lb.original_destination(peer, conn.local_addr()?)?;
                let line = format!("orig={:?}", orig.map(|o| o.dst));
                std::io::Write::write_all(&mut conn, format!("{line}\n").as_bytes())?;
                seen.push(line);
            }
            Ok(seen)
        });
        let attempts = probe(&tcp(meshed, 3)).in_cgroup(&enrolled).run()?;
        assert_all_ok(&attempts);
        for a in &attempts {
            // The application still sees the pod's address.
            assert_eq!(
                a.peer.as_deref(),
                Some(meshed.to_string().as_str()),
                "{a:?}"
            );
        }
        server.join().expect("proxy thread")
    })?;
    assert_eq!(found, vec![format!("orig={:?}", Some(meshed)); 3]);
    // Straight to the pod: a client outside the mesh, the proxy's own
    // socket, and any client to a pod that is not meshed.
    let mut marked = tcp(meshed, 3);
    marked.extend(["--mark".into(), MARK.to_string()]);
    for (args, cg, who) in [
        (tcp(meshed, 3), &plain, "pod0"),
        (marked, &enrolled, "pod0"),
        (tcp(other, 3), &enrolled, "pod1"),
    ] {
        let attempts = probe(&args).in_cgroup(cg).run()?;
        assert_all_ok(&attempts);
        assert!(all_answered_by(&attempts, who), "{attempts:?}");
    }
    // No longer meshed: straight to it from the enrolled cgroup too.
    lb.set_meshed_pods(&Default::default())?;
    let attempts = probe(&tcp(meshed, 3)).in_cgroup(&enrolled).run()?;
    assert!(all_answered_by(&attempts, "pod0"), "{attempts:?}");
    Ok(())
}

/// A client that writes and closes before the proxy has accepted its
/// connection (fire-and-forget: a metrics line, a log record): its original
/// destination is still there when the proxy accepts it, and is read once.
#[test]
fn a_connection_closed_before_the_proxy_accepts_it_keeps_its_original_destination() -> Result<()> {
    require_root();
    let root = TestCgroup::new("early")?;
    let enrolled = root.child("enrolled")?;
    let lb = TestLb::attach_to(&root)?;
    let (decoy, _backends) = tcp_service(&lb, 1, true)?;
    let vip = decoy.addr();
    let proxy = std::net::TcpListener::bind("127.0.0.1:0")?;
    lb.set_proxy(Some(ProxyTarget {
        v4: Some(Ipv4Addr::LOCALHOST),
        v6: None,
        port: proxy.local_addr()?.port(),
        mark: 0,
    }))?;
    lb.enroll(enrolled.path())?;
    // The client has written, closed and exited before the accept.
    let attempts = probe(&[
        "tcp-send".into(),
        "--to".into(),
        vip.to_string(),
        "--message".into(),
        "metric 1\n".into(),
    ])
    .in_cgroup(&enrolled)
    .run()?;
    assert!(
        attempts.len() == 1 && attempts[0].errno.is_none(),
        "{attempts:?}"
    );
    // Once its close has gone through (the FIN acknowledged, the socket
    // in its last states): the kernel's socket is done with by then.
    let client: std::net::SocketAddrV4 = attempts[0].local.as_deref().unwrap_or("").parse()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while matches!(tcp_state(client)?, Some(0x01 | 0x04)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the client's FIN was never acknowledged"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (mut conn, peer) = proxy.accept()?;
    let local = conn.local_addr()?;
    let orig = lb.original_destination(peer, local)?;
    assert_eq!(orig.map(|o| o.dst), Some(vip), "the original destination");
    let mut got = String::new();
    std::io::Read::read_to_string(&mut conn, &mut got)?;
    assert_eq!(got, "metric 1\n");
    // Read once: the map keeps connections not yet accepted only.
    assert_eq!(lb.original_destination(peer, local)?.map(|o| o.dst), None);
    assert_eq!(lb.pending_original_destinations(), 0);
    // A redirect that never connects (nothing listens at the capture
    // address) removes its own entry as it closes.
    drop(proxy);
    let attempts = probe(&tcp(vip, 3)).in_cgroup(&enrolled).run()?;
    assert!(attempts.iter().all(|a| a.errno.is_some()), "{attempts:?}");
    assert_eq!(
        lb.pending_original_destinations(),
        0,
        "refused connects left entries"
    );
    Ok(())
}

/// A loader that attaches to another cgroup than an earlier run did (the
/// agent's cgroup root changed) lets the earlier one go.
#[test]
fn detaching_the_other_cgroups_leaves_the_programs_on_one() -> Result<()> {
    require_root();
    let root = TestCgroup::new("moved")?;
    let old = root.child("old")?;
    let new = root.child("new")?;
    let lb = TestLb::attach_to(&old)?;
    let (decoy, _backends) = tcp_service(&lb, 1, false)?;
    let vip = decoy.addr();
    lb.attach(new.path())?;
    assert_eq!(lb.detach_others(new.path())?, vec![old.id()]);
    let attempts = probe(&tcp(vip, 3)).in_cgroup(&old).run()?;
    assert!(all_answered_by(&attempts, "decoy"), "{attempts:?}");
    let attempts = probe(&tcp(vip, 3)).in_cgroup(&new).run()?;
    assert!(all_answered_by(&attempts, "b0"), "{attempts:?}");
    assert_eq!(lb.detach_others(new.path())?, Vec::<u64>::new());
    Ok(())
}

/// An attach that fails part way (here: the last program's link cannot be
/// pinned) leaves none of its programs attached or pinned: the cgroup's
/// connections are not balanced by half a set, and the instance's other
/// cgroup keeps its programs.
#[test]
fn an_attach_that_fails_part_way_leaves_nothing_attached() -> Result<()> {
    require_root();
    let root = TestCgroup::new("partial")?;
    let attached = root.child("attached")?;
    let other = root.child("other")?;
    let lb = TestLb::attach_to(&attached)?;
    let (decoy, _backends) = tcp_service(&lb, 1, false)?;
    let vip = decoy.addr();
    // A non-empty directory where the last program's link is pinned first
    // (bpffs takes directories); removed before the instance is.
    struct Blocker(std::path::PathBuf);
    impl Drop for Blocker {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(self.0.join("x"));
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let links = lb.pin_dir().join("links");
    let blocker = Blocker(links.join(format!("new-{}-sluice_sock_release", other.id())));
    std::fs::create_dir_all(blocker.0.join("x"))?;
    let e = lb.attach(other.path()).expect_err("the pin is blocked");
    assert!(e.to_string().contains("pinning link"), "{e}");
    let left: Vec<String> = std::fs::read_dir(&links)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&format!("{}-", other.id())) && !blocker.0.ends_with(n))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "links of the failed attach");
    // Not balanced in the other cgroup: its connections reach the VIP's
    // own listener; still balanced in the first.
    let attempts = probe(&tcp(vip, 3)).in_cgroup(&other).run()?;
    assert!(all_answered_by(&attempts, "decoy"), "{attempts:?}");
    let attempts = probe(&tcp(vip, 3)).in_cgroup(&attached).run()?;
    assert!(all_answered_by(&attempts, "b0"), "{attempts:?}");
    drop(blocker);
    Ok(())
}

/// The state (`/proc/net/tcp`'s `st`) of the IPv4 socket bound to `local`
/// with a peer: 0x01 established, 0x04 FIN_WAIT1, 0x05 FIN_WAIT2, 0x06
/// TIME_WAIT.
fn tcp_state(local: std::net::SocketAddrV4) -> Result<Option<u8>> {
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(local.ip().octets()),
        local.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    Ok(table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&want.as_str()) && f.get(2) != Some(&"00000000:0000"))
            .then(|| u8::from_str_radix(f.get(3)?, 16).ok())
            .flatten()
    }))
}

#[test]
fn a_child_cgroup_of_an_enrolled_pod_cgroup_is_enrolled_too() -> Result<()> {
    require_root();
    let root = TestCgroup::new("pod")?;
    let pod = root.child("pod")?;
    let container = pod.child("container")?;
    let lb = TestLb::attach_to(&root)?;
    let (decoy, _backends) = tcp_service(&lb, 1, true)?;
    let vip = decoy.addr();
    let proxy = TcpBackend::start(loopback(), "proxy")?;
    lb.set_proxy(Some(ProxyTarget {
        v4: Some(Ipv4Addr::LOCALHOST),
        v6: None,
        port: proxy.addr().port(),
        mark: 0,
    }))?;
    lb.enroll(pod.path())?;
    let attempts = probe(&tcp(vip, 5)).in_cgroup(&container).run()?;
    assert_eq!(
        tally(&attempts).keys().cloned().collect::<Vec<_>>(),
        ["proxy"]
    );
    Ok(())
}

/// A loader that died between staging a batch and retiring what it
/// replaced leaves backend slots and members no service uses; the next one
/// removes them, so that affinity cannot pick a backend that left.
#[test]
fn a_new_loader_removes_what_a_crashed_one_left_half_done() -> Result<()> {
    use aya::maps::{HashMap, Map, MapData};
    use ebpf_lb_common::{BackendSlot, Endpoint, MemberKey, maps};
    require_root();
    let cg = TestCgroup::new("lf")?;
    let lb = TestLb::attach_to(&cg)?;
    let (decoy, _backends) = tcp_service(&lb, 1, false)?;
    let vip = decoy.addr();
    let pins = lb.options().pin_dir().join("maps");
    let crashed = lb.crash();

    // What a half-done batch leaves: a slot of a set no service points at,
    // and a member of a service that does not exist.
    let open =
        |name: &str| -> Result<Map> { Ok(Map::HashMap(MapData::from_pin(pins.join(name))?)) };
    let mut slots: HashMap<_, BackendSlot, Endpoint> = HashMap::try_from(open(maps::BACKENDS)?)?;
    let stray_slot = BackendSlot {
        backend_set: 4242,
        index: 0,
    };
    slots.insert(stray_slot, Endpoint::default(), 0)?;
    let mut members: HashMap<_, MemberKey, u32> = HashMap::try_from(open(maps::MEMBERS)?)?;
    let stray_member = MemberKey {
        service_id: 4242,
        backend: Endpoint::default(),
    };
    members.insert(stray_member, 1, 0)?;
    let (slot_count, member_count) = (slots.keys().count(), members.keys().count());

    let lb = crashed.reopen()?;
    assert_eq!(
        slots.keys().count(),
        slot_count - 1,
        "the stray slot is gone"
    );
    assert!(slots.get(&stray_slot, 0).is_err());
    assert_eq!(
        members.keys().count(),
        member_count - 1,
        "the stray member is gone"
    );
    assert!(members.get(&stray_member, 0).is_err());
    // The service itself is intact.
    lb.attach(cg.path())?;
    let attempts = probe(&tcp(vip, 5)).in_cgroup(&cg).run()?;
    assert_all_ok(&attempts);
    Ok(())
}

/// The kernel reuses a replaced service's map element at once, so a
/// connect that found a service may read the element after it was
/// rewritten for another one. The programs take a value only under the key
/// it was written for: here a service's entry holds another service's value
/// (what such a reader would see), and connects to it are not sent to the
/// other service's backends.
#[test]
fn a_service_entry_holding_another_services_value_is_not_followed() -> Result<()> {
    use aya::maps::{HashMap, Map, MapData};
    use ebpf_lb_common::{Service, ServiceKey, maps};
    require_root();
    let cg = TestCgroup::new("reu")?;
    let lb = TestLb::attach_to(&cg)?;
    let (vip_decoy, _backends) = tcp_service(&lb, 1, false)?;
    let other_decoy = decoy()?;
    let other = TcpBackend::start(loopback(), "other")?;
    lb.upsert_service(&ServiceSpec::new(
        Frontend::tcp(other_decoy.addr()),
        [Backend::ready(other.addr())],
    ))?;
    let pins = lb.options().pin_dir().join("maps");
    let mut services: HashMap<_, ServiceKey, Service> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(pins.join(maps::SERVICES))?))?;
    let key_of = |addr: SocketAddr| Frontend::tcp(addr).key();
    let (key, other_key) = (key_of(vip_decoy.addr()), key_of(other_decoy.addr()));
    assert_eq!(
        tally(&probe(&tcp(vip_decoy.addr(), 3)).in_cgroup(&cg).run()?)
            .into_keys()
            .collect::<Vec<_>>(),
        ["b0"],
        "balanced before the entry is overwritten"
    );

    services.insert(key, services.get(&other_key, 0)?, 0)?;
    let attempts = probe(&tcp(vip_decoy.addr(), 10)).in_cgroup(&cg).run()?;
    assert_all_ok(&attempts);
    assert_eq!(
        tally(&attempts).into_keys().collect::<Vec<_>>(),
        ["decoy"],
        "went to the address as given, not to the other service's backend"
    );
    // The other service itself is balanced as before.
    let attempts = probe(&tcp(other_decoy.addr(), 3)).in_cgroup(&cg).run()?;
    assert_eq!(tally(&attempts).into_keys().collect::<Vec<_>>(), ["other"]);
    Ok(())
}

/// Service values pinned by a version before the key check carry 0 where
/// the check goes; the next loader gives them their check, so the services
/// go on being balanced across the upgrade.
#[test]
fn a_new_loader_gives_pinned_services_their_key_check() -> Result<()> {
    use aya::maps::{HashMap, Map, MapData};
    use ebpf_lb_common::{Service, ServiceKey, maps};
    require_root();
    let cg = TestCgroup::new("kc")?;
    let lb = TestLb::attach_to(&cg)?;
    let (decoy, _backends) = tcp_service(&lb, 2, false)?;
    let pins = lb.options().pin_dir().join("maps");
    let crashed = lb.crash();
    let mut services: HashMap<_, ServiceKey, Service> =
        HashMap::try_from(Map::HashMap(MapData::from_pin(pins.join(maps::SERVICES))?))?;
    let key = Frontend::tcp(decoy.addr()).key();
    let mut old = services.get(&key, 0)?;
    old.key_check = 0;
    services.insert(key, old, 0)?;

    let lb = crashed.reopen()?;
    assert_ne!(services.get(&key, 0)?.key_check, 0);
    lb.attach(cg.path())?;
    let attempts = probe(&tcp(decoy.addr(), 20)).in_cgroup(&cg).run()?;
    assert_all_ok(&attempts);
    assert_eq!(
        tally(&attempts).into_keys().collect::<Vec<_>>(),
        ["b0", "b1"],
        "balanced over the service's backends"
    );
    Ok(())
}

/// Two loaders on one instance would undo each other's batches: the second
/// is refused, naming the first, and the first goes on undisturbed.
#[test]
fn a_second_loader_on_a_running_instance_is_refused_naming_the_first() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("l2")?;
    let lb = TestLb::attach_to(&cg)?;
    let decoy = decoy()?;
    let vip = decoy.addr();
    let backends = tcp_backends(2, loopback())?;
    lb.upsert_service(&ServiceSpec::new(Frontend::tcp(vip), ready(&backends)))?;
    let err = match ebpf_lb::LoadBalancer::open(lb.options().clone()) {
        Ok(_) => panic!("a second loader opened a running instance"),
        Err(e) => e,
    };
    assert!(matches!(err, Error::InUse { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("(pid {} (", std::process::id())),
        "names the holder: {text}"
    );
    assert!(
        text.contains(&lb.options().pin_dir().display().to_string()),
        "{text}"
    );
    assert!(text.contains("--lb-instance"), "{text}");
    // Nor can its state be removed under it (the next loader would make the
    // folder afresh and run beside it).
    let removed = ebpf_lb::uninstall_at(&lb.options().pin_dir());
    assert!(matches!(removed, Err(Error::InUse { .. })), "{removed:?}");
    // The first one's state and work are untouched.
    assert_eq!(lb.services().len(), 1);
    lb.upsert_service(&ServiceSpec::new(Frontend::tcp(vip), ready(&backends[..1])))?;
    let attempts = probe(&tcp(vip, 10)).in_cgroup(&cg).run()?;
    assert_all_ok(&attempts);
    assert_eq!(tally(&attempts).into_keys().collect::<Vec<_>>(), ["b0"]);
    // Once it is gone (a crash included), the instance opens again.
    let lb = lb.crash().reopen()?;
    assert_eq!(lb.services().len(), 1);
    Ok(())
}

/// An agent whose cluster removed it (its DaemonSet deleted) takes its
/// programs and pinned state away itself, while it still holds the
/// instance: connections go where they are addressed again.
#[test]
fn a_running_instance_uninstalls_itself() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("un")?;
    let lb = TestLb::attach_to(&cg)?;
    let decoy = decoy()?;
    let vip = decoy.addr();
    let backends = tcp_backends(2, loopback())?;
    lb.upsert_service(&ServiceSpec::new(Frontend::tcp(vip), ready(&backends)))?;
    let attempts = probe(&tcp(vip, 10)).in_cgroup(&cg).run()?;
    assert_all_ok(&attempts);
    assert!(!tally(&attempts).contains_key("decoy"));
    lb.remove_pinned_state()?;
    assert!(!lb.options().pin_dir().exists(), "pinned state left");
    let attempts = probe(&tcp(vip, 10)).in_cgroup(&cg).run()?;
    assert_all_ok(&attempts);
    assert_eq!(
        tally(&attempts).into_keys().collect::<Vec<_>>(),
        ["decoy"],
        "not balanced after the uninstall"
    );
    Ok(())
}

#[test]
fn load_balancing_survives_a_loader_restart() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("rs")?;
    let lb = TestLb::attach_to(&cg)?;
    let decoy = decoy()?;
    let vip = decoy.addr();
    let backends = tcp_backends(3, loopback())?;
    lb.upsert_service(&ServiceSpec::new(Frontend::tcp(vip), ready(&backends[..2])))?;
    let crashed = lb.crash();

    // No loader runs: the pinned programs and maps keep balancing.
    let attempts = probe(&tcp(vip, 40)).in_cgroup(&cg).run()?;
    assert_all_ok(&attempts);
    assert_eq!(tally(&attempts).len(), 2);

    // A loader with other map sizes is refused, naming the setting and the
    // fix, and the pinned state stays as it was.
    let mut other = integration::lb::test_options();
    other.instance = crashed.options().instance.clone();
    other.max_sockets *= 2;
    let err = match ebpf_lb::LoadBalancer::open(other) {
        Ok(_) => panic!("opened over pinned maps of other sizes"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("REVNAT")
            && err.contains("Options::max_sockets")
            && err.contains("mesh-agent uninstall"),
        "{err}"
    );
    let attempts = probe(&tcp(vip, 10)).in_cgroup(&cg).run()?;
    assert_all_ok(&attempts);

    // A new loader finds the service and can change it.
    let lb = crashed.reopen()?;
    let services = lb.services();
    assert_eq!(services.len(), 1);
    assert_eq!(
        services[0].backends,
        vec![backends[0].addr(), backends[1].addr()]
    );
    lb.attach(cg.path())?;
    // Its clean-up of slots no service uses left the service's own.
    let attempts = probe(&tcp(vip, 40)).in_cgroup(&cg).run()?;
    assert_all_ok(&attempts);
    assert_eq!(tally(&attempts).len(), 2, "{:?}", tally(&attempts));
    lb.upsert_service(&ServiceSpec::new(Frontend::tcp(vip), ready(&backends[2..])))?;
    let attempts = probe(&tcp(vip, 20)).in_cgroup(&cg).run()?;
    assert_all_ok(&attempts);
    assert_eq!(tally(&attempts).keys().cloned().collect::<Vec<_>>(), ["b2"]);

    // Uninstall removes the pinned state and the programs.
    let pin_dir = lb.pin_dir();
    drop(lb);
    assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
    let attempts = probe(&tcp(vip, 3)).in_cgroup(&cg).run()?;
    assert_eq!(
        tally(&attempts).keys().cloned().collect::<Vec<_>>(),
        ["decoy"]
    );
    Ok(())
}

#[test]
fn a_full_map_is_a_clear_error_and_changes_nothing() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("full")?;
    let mut opts = test_options();
    opts.max_services = 3;
    opts.max_backends = 6;
    let lb = TestLb::attach_with(&cg, opts)?;
    let backends = tcp_backends(3, loopback())?;
    let vips: Vec<SocketAddr> = (0..4)
        .map(|_| decoy().map(|d| d.addr()))
        .collect::<Result<_>>()?;
    for vip in &vips[..3] {
        lb.upsert_service(&ServiceSpec::new(
            Frontend::tcp(*vip),
            ready(&backends[..1]),
        ))?;
    }
    let before = lb.services();

    let err = lb
        .upsert_service(&ServiceSpec::new(
            Frontend::tcp(vips[3]),
            ready(&backends[..1]),
        ))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::MapFull {
                map: "SERVICES",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("max_services"), "{err}");
    assert_eq!(lb.services(), before);

    // A batch whose second change does not fit leaves the first undone too.
    let err = lb
        .apply(&[
            Change::Upsert(ServiceSpec::new(
                Frontend::tcp(vips[0]),
                ready(&backends[..2]),
            )),
            Change::Upsert(ServiceSpec::new(Frontend::tcp(vips[1]), ready(&backends))),
        ])
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::MapFull {
                map: "BACKENDS",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(lb.services(), before);

    // And the services still work.
    let attempts = probe(&tcp(vips[0], 5)).in_cgroup(&cg).run()?;
    assert_eq!(tally(&attempts).keys().cloned().collect::<Vec<_>>(), ["b0"]);
    Ok(())
}

#[test]
fn invalid_services_are_refused_with_the_reason() -> Result<()> {
    require_root();
    let cg = TestCgroup::new("inv")?;
    let lb = TestLb::attach_to(&cg)?;
    let vip: SocketAddr = "127.96.0.1:80".parse().unwrap();
    let err = lb
        .upsert_service(&ServiceSpec::new(
            Frontend::tcp(vip),
            [Backend::ready("[::1]:80".parse().unwrap())],
        ))
        .unwrap_err();
    assert!(
        err.to_string().contains("127.96.0.1:80/TCP") && err.to_string().contains("family"),
        "{err}"
    );
    let err = lb
        .upsert_service(&ServiceSpec::new(
            Frontend::tcp("127.96.0.1:0".parse().unwrap()),
            [],
        ))
        .unwrap_err();
    assert!(err.to_string().contains("port is 0"), "{err}");
    let err = lb.remove_service(&Frontend::tcp(vip)).unwrap_err();
    assert!(matches!(err, Error::UnknownService(_)), "{err}");
    assert!(lb.services().is_empty());
    Ok(())
}

/// A directory with bpffs mounted on it (maybe several times), unmounted and
/// removed on drop.
struct BpffsDir(std::path::PathBuf);

impl BpffsDir {
    /// How many mounts sit on the directory.
    fn mounts(&self) -> usize {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let me = self.0.to_str().unwrap();
        info.lines()
            .filter(|l| l.split(' ').nth(4) == Some(me))
            .count()
    }

    fn unmount_all(&self) {
        let path = std::ffi::CString::new(self.0.to_str().unwrap()).unwrap();
        while self.mounts() > 0 {
            // SAFETY: a valid path; MNT_DETACH never blocks.
            if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
                break;
            }
        }
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        self.unmount_all();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn loaders_starting_together_mount_bpffs_once() {
    require_root();
    let dir = BpffsDir(std::env::temp_dir().join(integration::unique_name("bpffs")));
    // A second mount would hide the first one's pins from the loader that
    // made them; the race is short, so it is run many times.
    for round in 0..50 {
        let go = std::sync::Arc::new(std::sync::Barrier::new(4));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (go, path) = (go.clone(), dir.0.clone());
                std::thread::spawn(move || {
                    go.wait();
                    ebpf_lb::ensure_bpffs(&path)
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(
            dir.mounts(),
            1,
            "round {round}: bpffs mounted more than once"
        );
        dir.unmount_all();
    }
}
