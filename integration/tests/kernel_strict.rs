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
    setup_with(integration::lb::test_options())
}

fn setup_with(opts: ebpf_lb::Options) -> Result<Setup> {
    require_root();
    let cg = TestCgroup::new("strict")?;
    let lb = TestLb::attach_with(&cg, opts)?;
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
    // A process on the node itself (kubelet's probes) gets through.
    assert_reached(&connect(&s.node.ns, v4, None)?, "pod");
    // The node proxy (its mark) gets through.
    assert_reached(&connect(&s.node.ns, v4, Some(PROXY_MARK))?, "pod");
    assert_reached(&connect(&s.node.ns, v6, Some(PROXY_MARK))?, "pod6");
    // Traffic inside the pod itself never crosses the veth.
    assert_reached(&connect(&s.pod.ns, v4, None)?, "pod");

    assert_eq!(s.lb.refusals(s.pod.ip4.into())?, 3);
    assert_eq!(s.lb.refusals(s.pod.ip6.into())?, 3);
    assert_eq!(
        s.server.hits(),
        9,
        "only the node's, the proxy's and the pod's own connections arrived"
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

/// The guard lets what it does not refuse go on to the other programs on
/// the veth (a CNI's own, Calico's eBPF dataplane, Cilium's): it says
/// "next", not "pass", which under TCX would end the chain there. Shown
/// with two guards (two instances) on one veth, the pod STRICT in one of
/// them and then in the other: whichever runs first must let the packet
/// on for the other to refuse it.
#[test]
fn traffic_the_guard_lets_through_still_meets_the_other_programs() -> Result<()> {
    let s = setup()?;
    let cg = TestCgroup::new("strict-second")?;
    let second = TestLb::attach_with(&cg, integration::lb::test_options())?;
    s.node.ns.run(|| second.guard_interface(&s.pod.host_if))??;
    let pod = IpAddr::from(s.pod.ip4);
    for (strict, open) in [(&second, &s.lb), (&s.lb, &second)] {
        strict.set_workload_mode(pod, Some(MtlsMode::Strict))?;
        open.set_workload_mode(pod, None)?;
        let before = strict.refusals(pod)?;
        assert_refused(&connect(&s.client.ns, s.server.addr(), None)?);
        assert_eq!(strict.refusals(pod)? - before, 3, "the STRICT guard ran");
    }
    s.lb.set_workload_mode(pod, None)?;
    s.node
        .ns
        .run(|| second.unguard_interface(&s.pod.host_if))??;
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

/// The Internet checksum of `data` (RFC 1071), folded and inverted.
fn inet_csum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A 20-byte TCP SYN from `src:sport` to `dst:dport`, checksum included.
fn tcp_syn(src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr, sport: u16, dport: u16) -> [u8; 20] {
    let mut t = [0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02;
    t[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    pseudo.extend_from_slice(&t);
    let c = inet_csum(&pseudo);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// An IPv4 fragment of a TCP segment: `offset8` in 8-byte units.
fn ipv4_fragment(
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    id: u16,
    more: bool,
    offset8: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut h = vec![0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6..8].copy_from_slice(&((u16::from(more) << 13) | offset8).to_be_bytes());
    h[8] = 64;
    h[9] = 6;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let c = inet_csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// Sends `packets` (whole IPv4 packets) from `from` and says whether a TCP
/// segment from `peer:pport` to port `lport` with SYN|ACK came back within
/// a second.
fn syn_ack_after(
    from: &integration::netns::TestNetns,
    packets: Vec<Vec<u8>>,
    peer: std::net::Ipv4Addr,
    pport: u16,
    lport: u16,
) -> Result<bool> {
    use socket2::{Domain, Protocol, Socket, Type};
    from.run(move || -> std::io::Result<bool> {
        let sniff = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
        sniff.set_read_timeout(Some(Duration::from_millis(200)))?;
        let raw = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )?;
        let to = SocketAddr::new(peer.into(), 0).into();
        for p in &packets {
            raw.send_to(p, &to)?;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
        while std::time::Instant::now() < deadline {
            let n = match sniff.recv(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            // SAFETY: recv initialised the first n bytes.
            let b: Vec<u8> = buf[..n]
                .iter()
                .map(|x| unsafe { x.assume_init() })
                .collect();
            let ihl = usize::from(b[0] & 0x0f) * 4;
            if n < ihl + 14 || b[12..16] != peer.octets() {
                continue;
            }
            let t = &b[ihl..];
            let (sp, dp) = (
                u16::from_be_bytes([t[0], t[1]]),
                u16::from_be_bytes([t[2], t[3]]),
            );
            if sp == pport && dp == lport && t[13] & 0x12 == 0x12 {
                return Ok(true);
            }
        }
        Ok(false)
    })?
    .map_err(Into::into)
}

/// A SYN split into IPv4 fragments: the guard cannot read its flags, and
/// the pod would reassemble it; it is dropped, not let through.
#[test]
fn a_syn_split_into_ipv4_fragments_does_not_reach_a_strict_pod() -> Result<()> {
    let s = setup()?;
    let (src, dst) = (s.client.ip4, s.pod.ip4);
    let syn = tcp_syn(src, dst, 40000, 8080);
    let fragments = |id| {
        vec![
            ipv4_fragment(src, dst, id, true, 0, &syn[..8]),
            ipv4_fragment(src, dst, id, false, 1, &syn[8..]),
        ]
    };
    // Not STRICT: the pod answers the reassembled SYN (so the packets are
    // right, and the test can fail).
    s.lb.set_workload_mode(dst.into(), Some(MtlsMode::Permissive))?;
    assert!(
        syn_ack_after(&s.client.ns, fragments(7), dst, 8080, 40000)?,
        "no SYN-ACK to the fragmented SYN of a PERMISSIVE pod"
    );
    s.lb.set_workload_mode(dst.into(), Some(MtlsMode::Strict))?;
    assert!(
        !syn_ack_after(&s.client.ns, fragments(8), dst, 8080, 40000)?,
        "a STRICT pod answered a fragmented plaintext SYN"
    );
    // A whole SYN is still answered with the guard's reset.
    assert_refused(&connect(&s.client.ns, s.server.addr(), None)?);
    Ok(())
}

/// Fragmented IPv6 datagrams that are not TCP (a large UDP answer) reach a
/// STRICT pod: the guard looks behind the fragment header.
#[test]
fn fragmented_ipv6_udp_reaches_a_strict_pod() -> Result<()> {
    let s = setup()?;
    let udp = integration::servers::UdpBackend::start_in(
        &s.pod.ns,
        SocketAddr::new(s.pod.ip6.into(), 9000),
        "u",
    )?;
    // Neighbour discovery first (the first packets can be lost to it).
    assert_reached(&connect(&s.client.ns, s.server6.addr(), None)?, "pod6");
    s.lb.set_workload_mode(s.pod.ip6.into(), Some(MtlsMode::Strict))?;
    let to = udp.addr();
    s.client.ns.run(move || -> std::io::Result<()> {
        let sock = std::net::UdpSocket::bind("[::]:0")?;
        sock.send_to(&[7u8; 3000], to)?;
        Ok(())
    })??;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while udp.hits() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a fragmented UDP datagram to a STRICT pod was dropped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // TCP to it is still refused.
    assert_refused(&connect(&s.client.ns, s.server6.addr(), None)?);
    Ok(())
}

/// With `strict_allows_node` off, only the proxy's connections from the node
/// pass (and STRICT pods with kubelet probes never become ready).
#[test]
fn strict_can_refuse_the_node_itself_too() -> Result<()> {
    let s = setup_with(ebpf_lb::Options {
        strict_allows_node: false,
        ..integration::lb::test_options()
    })?;
    let v4 = s.server.addr();
    s.lb.set_workload_mode(s.pod.ip4.into(), Some(MtlsMode::Strict))?;
    assert_refused(&connect(&s.node.ns, v4, None)?);
    assert_reached(&connect(&s.node.ns, v4, Some(PROXY_MARK))?, "pod");
    assert_refused(&connect(&s.client.ns, v4, None)?);
    Ok(())
}

/// The proxy's SYN that an iptables rule rewrote on the way (kube-proxy's
/// KUBE-POSTROUTING flips 0x4000, which the proxy's mark has, on what it
/// masquerades, and masquerades it with a random source port) still passes:
/// the socket it carries has the proxy's mark.
#[test]
fn the_proxy_passes_when_iptables_rewrote_its_packets_mark() -> Result<()> {
    let s = setup_with(ebpf_lb::Options {
        strict_allows_node: false,
        ..integration::lb::test_options()
    })?;
    assert_eq!(PROXY_MARK & 0x4000, 0x4000, "the mark has kube-proxy's bit");
    let iptables = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", s.node.ns.name(), "iptables"])
            .args(args)
            .output()?;
        assert!(
            out.status.success(),
            "iptables {args:?} (cargo xtask setup installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    // kube-proxy's KUBE-POSTROUTING, as iptables mode writes it.
    for rule in [
        "-t nat -N KUBE-POSTROUTING",
        "-t nat -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-t nat -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        "-t nat -A KUBE-POSTROUTING -j MASQUERADE --random-fully",
        "-t nat -A POSTROUTING -j KUBE-POSTROUTING",
    ] {
        iptables(&rule.split(' ').collect::<Vec<_>>())?;
    }
    let v4 = s.server.addr();
    s.lb.set_workload_mode(s.pod.ip4.into(), Some(MtlsMode::Strict))?;
    assert_reached(&connect(&s.node.ns, v4, Some(PROXY_MARK))?, "pod");
    // Another mark from the node is still refused.
    assert_refused(&connect(&s.node.ns, v4, Some(0x4000))?);
    assert_refused(&connect(&s.node.ns, v4, None)?);
    Ok(())
}
