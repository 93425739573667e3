//! STRICT mTLS enforced in the kernel: plaintext TCP to a STRICT workload is
//! answered with a reset on the host side of its veth, unless it comes from
//! the node proxy (its SO_MARK). Runs on a test node made of network
//! namespaces. Needs root.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Result;
use ebpf_lb::{MtlsMode, ProxyTarget};
use integration::{
    cgroup::TestCgroup,
    lb::TestLb,
    probe::{Attempt, Probe},
    require_root,
    servers::TcpBackend,
    topology::{TestNode, TestPod},
};

const NETPROBE: &str = env!("CARGO_BIN_EXE_netprobe");
const ECONNREFUSED: i32 = 111;
const PROXY_MARK: u32 = 0x5157;

struct Setup {
    // Field order is drop order: pods and node go before the load balancer.
    server: TcpBackend,
    server6: TcpBackend,
    pod: TestPod,
    client: TestPod,
    node: TestNode,
    lb: TestLb,
    _cg: TestCgroup,
}

fn setup() -> Result<Setup> {
    require_root();
    let cg = TestCgroup::new("strict")?;
    let lb = TestLb::attach_to(&cg)?;
    let node = TestNode::new("node")?;
    let pod = node.add_pod(1)?;
    let client = node.add_pod(2)?;
    lb.set_proxy(Some(ProxyTarget {
        v4: None,
        v6: None,
        port: 15001,
        mark: PROXY_MARK,
    }))?;
    node.ns.run(|| lb.guard_interface(&pod.host_if))??;
    let server = TcpBackend::start_in(&pod.ns, SocketAddr::new(pod.ip4.into(), 8080), "pod")?;
    let server6 = TcpBackend::start_in(&pod.ns, SocketAddr::new(pod.ip6.into(), 8080), "pod6")?;
    Ok(Setup {
        server,
        server6,
        pod,
        client,
        node,
        lb,
        _cg: cg,
    })
}

fn connect(
    from: &integration::netns::TestNetns,
    to: SocketAddr,
    mark: Option<u32>,
) -> Result<Vec<Attempt>> {
    let mut args = vec![
        "tcp".to_string(),
        "--to".into(),
        to.to_string(),
        "--count".into(),
        "3".into(),
    ];
    if let Some(m) = mark {
        args.extend(["--mark".into(), m.to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Probe::new(NETPROBE, &args).in_netns(from)?.run()
}

fn assert_refused(attempts: &[Attempt]) {
    assert!(!attempts.is_empty());
    for a in attempts {
        assert_eq!(
            a.errno,
            Some(ECONNREFUSED),
            "expected a refused connect: {a:?}"
        );
    }
}

fn assert_reached(attempts: &[Attempt], id: &str) {
    assert!(!attempts.is_empty());
    for a in attempts {
        assert_eq!(
            a.backend.as_deref(),
            Some(id),
            "expected to reach {id}: {a:?}"
        );
    }
}

#[test]
fn strict_refuses_plaintext_and_lets_the_proxy_through() -> Result<()> {
    let s = setup()?;
    let v4 = s.server.addr();
    let v6 = s.server6.addr();
    // Neighbour discovery between the pods and the node, done once: on a cold
    // IPv6 neighbour cache the first reset can be lost, and the client then
    // gets it with its SYN retransmit a second later (counted twice).
    assert_reached(&connect(&s.client.ns, v6, None)?, "pod6");
    for ip in [IpAddr::from(s.pod.ip4), IpAddr::from(s.pod.ip6)] {
        s.lb.set_workload_mode(ip, Some(MtlsMode::Strict))?;
    }

    // A plaintext client in another (non-enrolled) pod: refused at once.
    assert_refused(&connect(&s.client.ns, v4, None)?);
    assert_refused(&connect(&s.client.ns, v6, None)?);
    // A process on the node that is not the proxy: refused too.
    assert_refused(&connect(&s.node.ns, v4, None)?);
    // The node proxy (its mark) gets through.
    assert_reached(&connect(&s.node.ns, v4, Some(PROXY_MARK))?, "pod");
    assert_reached(&connect(&s.node.ns, v6, Some(PROXY_MARK))?, "pod6");
    // Traffic inside the pod itself never crosses the veth.
    assert_reached(&connect(&s.pod.ns, v4, None)?, "pod");

    assert_eq!(s.lb.refusals(s.pod.ip4.into())?, 6);
    assert_eq!(s.lb.refusals(s.pod.ip6.into())?, 3);
    assert_eq!(
        s.server.hits(),
        6,
        "only the proxy's and the pod's own connections arrived"
    );
    Ok(())
}

#[test]
fn permissive_lets_plaintext_in_and_flipping_back_refuses_new_connections() -> Result<()> {
    let s = setup()?;
    let v4 = s.server.addr();
    let ip: IpAddr = s.pod.ip4.into();

    // No policy at all behaves like PERMISSIVE.
    assert_reached(&connect(&s.client.ns, v4, None)?, "pod");
    s.lb.set_workload_mode(ip, Some(MtlsMode::Permissive))?;
    assert_reached(&connect(&s.client.ns, v4, None)?, "pod");

    // A plaintext connection opened while PERMISSIVE...
    let before = s.server.hits();
    let long = Probe::new(
        NETPROBE,
        &[
            "tcp-session",
            "--to",
            &v4.to_string(),
            "--pings",
            "30",
            "--interval-ms",
            "50",
        ],
    )
    .in_netns(&s.client.ns)?
    .spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while s.server.hits() == before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    // ...survives the switch to STRICT, which refuses new ones at once.
    s.lb.set_workload_mode(ip, Some(MtlsMode::Strict))?;
    assert_refused(&connect(&s.client.ns, v4, None)?);
    let session = long.finish()?;
    assert_eq!(
        session.len(),
        31,
        "the open connection was cut: {session:?}"
    );
    assert!(session.iter().all(|a| a.errno.is_none()), "{session:?}");
    assert_eq!(s.lb.refusals(ip)?, 3);

    // DISABLED lets plaintext in again.
    s.lb.set_workload_mode(ip, Some(MtlsMode::Disabled))?;
    assert_reached(&connect(&s.client.ns, v4, None)?, "pod");
    assert_eq!(s.lb.refusals(ip)?, 3);
    Ok(())
}

#[test]
fn without_the_guard_on_its_veth_nothing_is_refused() -> Result<()> {
    let s = setup()?;
    s.lb.set_workload_mode(s.client.ip4.into(), Some(MtlsMode::Strict))?;
    // The client pod is STRICT but its veth carries no guard; the server's
    // veth does, but the server is not STRICT: traffic is untouched.
    assert_reached(&connect(&s.client.ns, s.server.addr(), None)?, "pod");
    // Removing the guard from the server's veth while it is STRICT lets
    // plaintext in: the guard is what enforces.
    s.lb.set_workload_mode(s.pod.ip4.into(), Some(MtlsMode::Strict))?;
    assert_refused(&connect(&s.client.ns, s.server.addr(), None)?);
    s.node.ns.run(|| s.lb.unguard_interface(&s.pod.host_if))??;
    assert_reached(&connect(&s.client.ns, s.server.addr(), None)?, "pod");
    Ok(())
}

#[test]
fn the_guard_of_a_deleted_pod_goes_with_its_pinned_link() -> Result<()> {
    let s = setup()?;
    let links = s.lb.pin_dir().join("links");
    let guards = || {
        std::fs::read_dir(&links)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("tc-"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(guards(), 1);
    let Setup {
        server,
        server6,
        pod,
        client,
        node,
        lb,
        _cg,
    } = s;
    drop((server, server6));
    let host_if = pod.host_if.clone();
    // The pod's namespace goes, and both ends of its veth with it.
    drop(pod);
    node.ns.run(|| lb.unguard_interface(&host_if))??;
    assert_eq!(guards(), 0, "the dead guard's pin is left in bpffs");
    drop((client, node));
    Ok(())
}

/// What a new agent learns from the pinned state: the guarded interfaces
/// and the modes an earlier one set; the pin of a guard whose interface
/// went with its pod is dropped on the way.
#[test]
fn the_pinned_guards_and_modes_are_listed_and_dead_guards_dropped() -> Result<()> {
    let s = setup()?;
    s.lb.set_workload_mode(s.pod.ip4.into(), Some(MtlsMode::Strict))?;
    let listed = s.node.ns.run(|| s.lb.guarded_interfaces())?;
    let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, [s.pod.host_if.as_str()]);
    assert!(
        s.lb.workload_modes()
            .contains(&(s.pod.ip4.into(), MtlsMode::Strict)),
        "{:?}",
        s.lb.workload_modes()
    );
    let links = s.lb.pin_dir().join("links");
    let Setup {
        server,
        server6,
        pod,
        client,
        node,
        lb,
        _cg,
    } = s;
    drop((server, server6));
    // The pod's namespace goes, and both ends of its veth with it.
    drop(pod);
    // (The kernel deletes a dead namespace's interfaces a moment later.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !node.ns.run(|| lb.guarded_interfaces())?.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the guard of the deleted pod's interface is still listed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pins = std::fs::read_dir(&links)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("tc-"))
        .count();
    assert_eq!(pins, 0, "the dead guard's pin is left in bpffs");
    drop((client, node));
    Ok(())
}
