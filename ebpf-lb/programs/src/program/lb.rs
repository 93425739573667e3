//! Socket-level ClusterIP load balancing.
//!
//! `connect*` and `sendmsg*` rewrite a service `VIP:port` to one ready backend
//! (or, for enrolled workloads and meshed services, to the node proxy), and
//! remember the translation per socket in `REVNAT` so that `getpeername*` and
//! `recvmsg*` show the VIP again. `sock_ops` turns the per-socket note of a
//! redirected connection into an entry keyed by its 4-tuple, which is what the
//! proxy can see on the accepted side.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, BPF_TCP_SYN_SENT, bpf_sock_addr,
    },
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval,
    },
    macros::{cgroup_sock, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockContext, SockOpsContext},
};
use ebpf_lb_common::{
    AffinityKey, AffinityValue, BackendSlot, Counters, Endpoint, FAMILY_V4, FAMILY_V6, FourTuple,
    LbConfig, MAX_ENROL_LEVELS, MAX_UDP_PEERS, MemberKey, OriginalDst, PROTO_TCP, PROTO_UDP,
    RevNatKey, SERVICE_F_AFFINITY, SERVICE_F_MESHED, Service, ServiceKey, UdpPeers, WorkloadKey,
    mix64, service_key_check,
};

use super::{
    AF_INET, AF_INET6, AFFINITY, BACKENDS, COOKIE_ORIG, COUNTERS, ENROLLED, MEMBERS, MESHED_PODS,
    ORIG_DST, REVNAT, SERVICES, UDP_PEERS, V4_MAPPED_WORD, config, is_v4_mapped, read_ip6,
    write_ip6,
};

const ECONNREFUSED: i32 = 111;
/// Outcome of looking a destination up in the service table.
enum Verdict {
    /// Not a service: leave the socket alone.
    Pass,
    /// Rewrite the destination to this endpoint (in the family of the key).
    Rewrite(Endpoint),
    /// A service with no ready backend: fail the call with `ECONNREFUSED`.
    NoBackend,
}

#[inline(always)]
fn sa(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

#[inline(always)]
fn counters(id: u32) -> Option<*mut Counters> {
    COUNTERS.get_ptr_mut(id)
}

/// Is the calling process enrolled in the mesh: its own cgroup, or an
/// ancestor at one of the levels where enrolled cgroups sit?
#[inline(always)]
fn enrolled(cfg: &LbConfig) -> bool {
    let id = unsafe { bpf_get_current_cgroup_id() };
    if ENROLLED.get_ptr(id).is_some() {
        return true;
    }
    let n = cfg.enrol_level_count as usize;
    let mut i = 0;
    while i < MAX_ENROL_LEVELS {
        if i >= n {
            break;
        }
        let anc = unsafe { bpf_get_current_ancestor_cgroup_id(cfg.enrol_levels[i] as i32) };
        if anc != 0 && ENROLLED.get_ptr(anc).is_some() {
            return true;
        }
        i += 1;
    }
    false
}

/// The socket's `SO_MARK`: the node proxy marks its own sockets.
#[inline(always)]
fn socket_mark(ctx: &SockAddrContext) -> u32 {
    unsafe {
        let sk = (*sa(ctx)).__bindgen_anon_1.sk;
        if sk.is_null() { 0 } else { (*sk).mark }
    }
}

/// An endpoint as the service tables hold it: an IPv4 address a dual-stack
/// socket holds mapped (`::ffff:a.b.c.d`) back in IPv4 form.
#[inline(always)]
fn unmapped(ep: Endpoint) -> Endpoint {
    if ep.family == FAMILY_V6 && is_v4_mapped(&ep.addr) {
        Endpoint::new([ep.addr[3], 0, 0, 0], ep.port, FAMILY_V4)
    } else {
        ep
    }
}

/// The backend UDP socket `cookie`'s earlier datagrams to `key` went to,
/// while it is still a ready backend of `svc`: found through the reverse
/// translations the socket has (`UDP_PEERS`, then `REVNAT` for the VIP
/// each stands for).
#[inline(always)]
fn udp_kept(cookie: u64, svc: &Service, key: &ServiceKey) -> Option<Endpoint> {
    // SAFETY: a pointer into the map's value, copied at once.
    let peers = unsafe { *UDP_PEERS.get_ptr(cookie)? };
    // The newest first: a flow that moved off a backend while it was not
    // ready stays where it went when that one is ready again.
    for j in 0..MAX_UDP_PEERS {
        let i = MAX_UDP_PEERS - 1 - j;
        if i as u32 >= peers.count {
            continue;
        }
        let written = peers.peers[i];
        // SAFETY: as above.
        let Some(vip) = REVNAT
            .get_ptr(RevNatKey::new(cookie, written))
            .map(|v| unsafe { *v })
        else {
            continue;
        };
        let vip = unmapped(vip);
        if vip.family != key.family || vip.addr != key.addr || vip.port != key.port {
            continue;
        }
        let backend = unmapped(written);
        let member = MemberKey {
            service_id: svc.id,
            backend,
        };
        if MEMBERS.get_ptr(member).is_some() {
            return Some(backend);
        }
    }
    None
}

/// Pick one ready backend of `svc`: the remembered one under `ClientIP`
/// affinity while it is fresh and still a member; for UDP, the one the
/// socket sent to before while it is still a member, else one the socket's
/// cookie picks (an unconnected socket's datagrams come through sendmsg
/// one by one: a QUIC or WireGuard client's flow must not be spread over
/// the backends, nor moved when backends come and go, as kube-proxy's
/// conntrack entry per flow keeps it); else a random one.
#[inline(always)]
fn select_backend(ctx: &SockAddrContext, svc: &Service, key: &ServiceKey) -> Option<Endpoint> {
    let proto = key.proto;
    if svc.count == 0 || svc.backend_set == 0 {
        return None;
    }
    let affinity = svc.flags & SERVICE_F_AFFINITY != 0;
    let now = if affinity {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    let akey = AffinityKey {
        netns_cookie: if affinity {
            unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
        } else {
            0
        },
        service_id: svc.id,
        _pad: 0,
    };
    if affinity && let Some(prev) = AFFINITY.get_ptr_mut(akey) {
        let timeout = svc.affinity_timeout_s as u64 * 1_000_000_000;
        let backend = unsafe { (*prev).backend };
        let fresh = now.wrapping_sub(unsafe { (*prev).last_used_ns }) < timeout;
        let member = MemberKey {
            service_id: svc.id,
            backend,
        };
        if fresh && MEMBERS.get_ptr(member).is_some() {
            unsafe { (*prev).last_used_ns = now };
            return Some(backend);
        }
    }
    let index = if proto == PROTO_UDP {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if let Some(kept) = udp_kept(cookie, svc, key) {
            return Some(kept);
        }
        (mix64(cookie ^ ((svc.id as u64) << 40)) % svc.count as u64) as u32
    } else {
        let r = unsafe { bpf_get_prandom_u32() };
        r % svc.count
    };
    let slot = BackendSlot {
        backend_set: svc.backend_set,
        index,
    };
    let backend = unsafe { *BACKENDS.get_ptr(slot)? };
    if affinity {
        let v = AffinityValue {
            backend,
            _pad: 0,
            last_used_ns: now,
        };
        let _ = AFFINITY.insert(akey, v, BPF_ANY as u64);
    }
    Some(backend)
}

/// The service at `key`, as it was written for that key. A hash map element
/// is reused by the kernel as soon as it is replaced or deleted, so the one
/// just found may be rewritten for another service while it is read: the
/// value is taken only when two copies agree and it carries `key`'s check,
/// else looked up afresh (the service's current element is in the map by
/// then). A value rewritten three times over during one connect is not
/// taken at all (the call goes to the address as given).
#[inline(always)]
fn service(key: &ServiceKey) -> Option<Service> {
    let check = service_key_check(key);
    for _ in 0..3 {
        let ptr = SERVICES.get_ptr(key)?;
        let first = unsafe { read_volatile(ptr) };
        let second = unsafe { read_volatile(ptr) };
        if first == second && first.key_check == check {
            return Some(first);
        }
    }
    None
}

/// Decide what a connect/sendmsg to `key` becomes. Redirects to the proxy
/// (only when `may_redirect`) record the original destination by socket cookie.
#[inline(always)]
fn decide(ctx: &SockAddrContext, key: &ServiceKey, may_redirect: bool) -> Verdict {
    let Some(svc) = service(key) else {
        return if may_redirect {
            meshed_pod(ctx, key)
        } else {
            Verdict::Pass
        };
    };
    let ctr = counters(svc.id);
    if may_redirect
        && svc.flags & SERVICE_F_MESHED != 0
        && let Some(verdict) = to_proxy(ctx, key, svc.id)
    {
        if let Some(c) = ctr {
            match verdict {
                Verdict::Rewrite(_) => unsafe { (*c).redirected += 1 },
                _ => unsafe { (*c).no_backend += 1 },
            }
        }
        return verdict;
    }
    match select_backend(ctx, &svc, key) {
        Some(backend) => {
            if let Some(c) = ctr {
                unsafe { (*c).balanced += 1 };
            }
            Verdict::Rewrite(backend)
        }
        None => {
            if let Some(c) = ctr {
                unsafe { (*c).no_backend += 1 };
            }
            Verdict::NoBackend
        }
    }
}

/// A TCP connect to a meshed destination (`service_id`'s VIP, or a meshed
/// pod's address: 0): for an enrolled workload, not the proxy's own
/// socket, with a proxy configured, to the proxy, its original destination
/// noted by socket cookie (`None`: none of that, it goes as it would).
/// Without its original destination the proxy cannot serve the connection,
/// and letting it go directly would carry a meshed workload's traffic
/// around the proxy in plaintext: it is refused, as the mesh does whenever
/// it cannot carry a connection (the insert of an LRU map fails only when
/// the kernel is short of memory).
#[inline(always)]
fn to_proxy(ctx: &SockAddrContext, key: &ServiceKey, service_id: u32) -> Option<Verdict> {
    let cfg = config()?;
    let proxy = proxy_endpoint(&cfg, key.family)?;
    if (cfg.proxy_mark != 0 && socket_mark(ctx) == cfg.proxy_mark) || !enrolled(&cfg) {
        return None;
    }
    let orig = OriginalDst {
        dst: Endpoint::new(key.addr, key.port, key.family),
        service_id,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    Some(
        if COOKIE_ORIG.insert(cookie, orig, BPF_ANY as u64).is_ok() {
            Verdict::Rewrite(proxy)
        } else {
            Verdict::NoBackend
        },
    )
}

/// A TCP connect straight to a pod's address (a headless Service's pod, a
/// StatefulSet peer): an enrolled workload's goes to the node proxy when
/// the pod is meshed, as one to a meshed Service does, so that it crosses
/// in mTLS with the caller's identity (a STRICT pod would refuse it in
/// plaintext, and a PERMISSIVE one's AccessPolicies would not see who
/// calls).
#[inline(always)]
fn meshed_pod(ctx: &SockAddrContext, key: &ServiceKey) -> Verdict {
    let pod = WorkloadKey {
        addr: key.addr,
        family: key.family,
        _pad: [0; 3],
    };
    if MESHED_PODS.get_ptr(pod).is_none() {
        return Verdict::Pass;
    }
    to_proxy(ctx, key, 0).unwrap_or(Verdict::Pass)
}

#[inline(always)]
fn proxy_endpoint(cfg: &LbConfig, family: u8) -> Option<Endpoint> {
    if cfg.proxy_port == 0 {
        return None;
    }
    if family == FAMILY_V4 {
        if cfg.proxy_addr4 == 0 {
            return None;
        }
        Some(Endpoint::new(
            [cfg.proxy_addr4, 0, 0, 0],
            cfg.proxy_port,
            family,
        ))
    } else {
        let a = cfg.proxy_addr6;
        if a[0] | a[1] | a[2] | a[3] == 0 {
            return None;
        }
        Some(Endpoint::new(a, cfg.proxy_port, family))
    }
}

/// Notes that UDP socket `cookie` has the reverse translation of `peer`, so
/// that closing the socket deletes it (`sluice_sock_release`). Beyond
/// [`MAX_UDP_PEERS`] backends per socket, the LRU removes them.
#[inline(always)]
fn track_udp(cookie: u64, peer: Endpoint) {
    match UDP_PEERS.get_ptr_mut(cookie) {
        // SAFETY: a pointer into the map's value; a racing send on the same
        // socket can at worst lose a note (left to the LRU).
        Some(p) => unsafe {
            let n = (*p).count as usize;
            for i in 0..MAX_UDP_PEERS {
                if i < n && (*p).peers[i] == peer {
                    return;
                }
            }
            if n < MAX_UDP_PEERS {
                (*p).peers[n] = peer;
                (*p).count = n as u32 + 1;
            }
        },
        None => {
            let mut v = UdpPeers::default();
            v.peers[0] = peer;
            v.count = 1;
            let _ = UDP_PEERS.insert(cookie, v, BPF_ANY as u64);
        }
    }
}

/// Remember, per socket, that `written` stands for `vip`. A TCP socket's
/// entry goes when it closes (`sluice_sockops`), a UDP socket's when it is
/// released (`sluice_sock_release`).
#[inline(always)]
fn remember(cookie: u64, written: Endpoint, vip: Endpoint, udp: bool) {
    let key = RevNatKey::new(cookie, written);
    // A socket that sends to two VIPs sharing a backend (a resolver asking
    // two DNS Services) must get replies from the VIP it sent to last.
    // SAFETY: a pointer into the map's value, read at once.
    let known = REVNAT.get_ptr(key).map(|v| unsafe { *v });
    if known != Some(vip) {
        let _ = REVNAT.insert(key, vip, BPF_ANY as u64);
        if udp && known.is_none() {
            track_udp(cookie, written);
        }
    }
}

/// A UDP socket closes: its reverse translations go with it, so that the LRU
/// map holds live sockets only (a DNS client opens one socket per query; left
/// to the LRU, they would crowd out long-lived sockets' entries).
#[cgroup_sock(sock_release)]
pub fn sluice_sock_release(ctx: SockContext) -> i32 {
    let proto = unsafe { read_volatile(&(*ctx.sock).protocol) } as u8;
    if proto == PROTO_UDP {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock as *mut _) };
        // SAFETY: a pointer into the map's value, copied at once.
        if let Some(p) = UDP_PEERS.get_ptr(cookie).map(|p| unsafe { *p }) {
            for i in 0..MAX_UDP_PEERS {
                if (i as u32) < p.count {
                    let _ = REVNAT.remove(RevNatKey::new(cookie, p.peers[i]));
                }
            }
            let _ = UDP_PEERS.remove(cookie);
        }
    }
    1
}

/// Refuse the call with ECONNREFUSED (a connect to a Service without
/// endpoints is refused, as kube-proxy's REJECT rule does).
#[inline(always)]
fn refuse() -> i32 {
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    0
}

fn xlate4(ctx: &SockAddrContext, may_redirect: bool) -> i32 {
    let s = sa(ctx);
    let proto = unsafe { read_volatile(&(*s).protocol) } as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return 1;
    }
    let ip = unsafe { read_volatile(&(*s).user_ip4) };
    let port = unsafe { read_volatile(&(*s).user_port) } as u16;
    let key = ServiceKey {
        addr: [ip, 0, 0, 0],
        port,
        proto,
        family: FAMILY_V4,
    };
    match decide(ctx, &key, may_redirect && proto == PROTO_TCP) {
        Verdict::Pass => 1,
        Verdict::NoBackend => refuse(),
        Verdict::Rewrite(to) => {
            unsafe {
                write_volatile(&mut (*s).user_ip4, to.addr[0]);
                write_volatile(&mut (*s).user_port, to.port as u32);
            }
            // A dual-stack (AF_INET6) UDP socket's datagram to ::ffff:VIP
            // comes through here, its address unmapped by the kernel, while
            // its replies go up through recvmsg6 with the peer mapped: the
            // translation is remembered in the socket's own (mapped) form.
            // SAFETY: the kernel always sets the context's socket.
            let sk = unsafe { (*s).__bindgen_anon_1.sk };
            let v6_socket = unsafe { read_volatile(&(*sk).family) } == AF_INET6;
            let (written, vip) = if v6_socket {
                (
                    Endpoint::new([0, 0, V4_MAPPED_WORD, to.addr[0]], to.port, FAMILY_V6),
                    Endpoint::new([0, 0, V4_MAPPED_WORD, key.addr[0]], port, FAMILY_V6),
                )
            } else {
                (to, Endpoint::new(key.addr, port, FAMILY_V4))
            };
            remember(
                unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
                written,
                vip,
                proto == PROTO_UDP,
            );
            1
        }
    }
}

fn xlate6(ctx: &SockAddrContext, may_redirect: bool) -> i32 {
    let s = sa(ctx);
    let proto = unsafe { read_volatile(&(*s).protocol) } as u8;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return 1;
    }
    let ip = read_ip6(unsafe { &(*s).user_ip6 });
    let port = unsafe { read_volatile(&(*s).user_port) } as u16;
    // A dual-stack socket reaching an IPv4 service through ::ffff:a.b.c.d.
    let mapped = is_v4_mapped(&ip);
    let key = if mapped {
        ServiceKey {
            addr: [ip[3], 0, 0, 0],
            port,
            proto,
            family: FAMILY_V4,
        }
    } else {
        ServiceKey {
            addr: ip,
            port,
            proto,
            family: FAMILY_V6,
        }
    };
    match decide(ctx, &key, may_redirect && proto == PROTO_TCP) {
        Verdict::Pass => 1,
        Verdict::NoBackend => refuse(),
        Verdict::Rewrite(to) => {
            let written = if mapped {
                [0, 0, V4_MAPPED_WORD, to.addr[0]]
            } else {
                to.addr
            };
            write_ip6(unsafe { &mut (*s).user_ip6 }, written);
            unsafe { write_volatile(&mut (*s).user_port, to.port as u32) };
            let written = Endpoint::new(written, to.port, FAMILY_V6);
            let vip = Endpoint::new(ip, port, FAMILY_V6);
            remember(
                unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
                written,
                vip,
                proto == PROTO_UDP,
            );
            1
        }
    }
}

/// Show the VIP instead of the backend (or proxy) the socket really talks to.
fn revnat4(ctx: &SockAddrContext) -> i32 {
    let s = sa(ctx);
    let ip = unsafe { read_volatile(&(*s).user_ip4) };
    let port = unsafe { read_volatile(&(*s).user_port) } as u16;
    let key = RevNatKey::new(
        unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        Endpoint::new([ip, 0, 0, 0], port, FAMILY_V4),
    );
    if let Some(vip) = unsafe { REVNAT.get(key) } {
        unsafe {
            write_volatile(&mut (*s).user_ip4, vip.addr[0]);
            write_volatile(&mut (*s).user_port, vip.port as u32);
        }
    }
    1
}

fn revnat6(ctx: &SockAddrContext) -> i32 {
    let s = sa(ctx);
    let ip = read_ip6(unsafe { &(*s).user_ip6 });
    let port = unsafe { read_volatile(&(*s).user_port) } as u16;
    let key = RevNatKey::new(
        unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        Endpoint::new(ip, port, FAMILY_V6),
    );
    if let Some(vip) = unsafe { REVNAT.get(key) } {
        let vip = *vip;
        write_ip6(unsafe { &mut (*s).user_ip6 }, vip.addr);
        unsafe { write_volatile(&mut (*s).user_port, vip.port as u32) };
    }
    1
}

#[cgroup_sock_addr(connect4)]
pub fn sluice_connect4(ctx: SockAddrContext) -> i32 {
    xlate4(&ctx, true)
}

#[cgroup_sock_addr(connect6)]
pub fn sluice_connect6(ctx: SockAddrContext) -> i32 {
    xlate6(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sluice_sendmsg4(ctx: SockAddrContext) -> i32 {
    xlate4(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sluice_sendmsg6(ctx: SockAddrContext) -> i32 {
    xlate6(&ctx, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sluice_recvmsg4(ctx: SockAddrContext) -> i32 {
    revnat4(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sluice_recvmsg6(ctx: SockAddrContext) -> i32 {
    revnat6(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sluice_getpeername4(ctx: SockAddrContext) -> i32 {
    revnat4(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sluice_getpeername6(ctx: SockAddrContext) -> i32 {
    revnat6(&ctx)
}

/// The 4-tuple of a socket as seen from its own side, IPv4-mapped addresses
/// folded to IPv4 (the proxy accepts those as IPv4 connections).
#[inline(always)]
fn four_tuple(ctx: &SockOpsContext) -> FourTuple {
    let ops = ctx.ops;
    let family = unsafe { read_volatile(&(*ops).family) };
    let local_port = (unsafe { read_volatile(&(*ops).local_port) } as u16).to_be();
    let remote_port = (unsafe { read_volatile(&(*ops).remote_port) } >> 16) as u16;
    let mut t = FourTuple {
        local_addr: [0; 4],
        remote_addr: [0; 4],
        local_port,
        remote_port,
        family: FAMILY_V4,
        _pad: [0; 3],
    };
    if family == AF_INET {
        t.local_addr[0] = unsafe { read_volatile(&(*ops).local_ip4) };
        t.remote_addr[0] = unsafe { read_volatile(&(*ops).remote_ip4) };
    } else if family == AF_INET6 {
        let l = read_ip6(unsafe { &(*ops).local_ip6 });
        let r = read_ip6(unsafe { &(*ops).remote_ip6 });
        if is_v4_mapped(&r) {
            t.local_addr[0] = l[3];
            t.remote_addr[0] = r[3];
        } else {
            t.local_addr = l;
            t.remote_addr = r;
            t.family = FAMILY_V6;
        }
    }
    t
}

/// The reverse-translation key of a connected TCP socket: its cookie and the
/// address its connect was rewritten to (its remote end), in the form the
/// connect wrote it: an IPv6 socket's IPv4-mapped peer stays mapped, as
/// `xlate6` stored it (folding it, as [`four_tuple`] does, would miss the
/// entry, and every dual-stack connection would leave its entry behind).
#[inline(always)]
fn revnat_key(ctx: &SockOpsContext, cookie: u64, t: &FourTuple) -> RevNatKey {
    let ops = ctx.ops;
    let family = unsafe { read_volatile(&(*ops).family) };
    let remote = if family == AF_INET6 && t.family == FAMILY_V4 {
        Endpoint::new(
            [0, 0, V4_MAPPED_WORD, t.remote_addr[0]],
            t.remote_port,
            FAMILY_V6,
        )
    } else {
        Endpoint::new(t.remote_addr, t.remote_port, t.family)
    };
    RevNatKey::new(cookie, remote)
}

#[sock_ops]
pub fn sluice_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let t = four_tuple(&ctx);
        // A balanced connection: its reverse translation goes when it
        // closes, so that the map holds live sockets only (an LRU eviction
        // would cost a long-lived one its VIP and its reset).
        let mut watch = REVNAT.get_ptr(revnat_key(&ctx, cookie, &t)).is_some();
        // The local port is bound by now: move the note of a redirected
        // connection from its cookie to its 4-tuple. The proxy takes it out
        // when it accepts the connection (user space), not this socket's
        // close once connected: a client that writes and closes at once is
        // closed before the proxy has accepted it. One that never connects
        // (refused, timed out) takes it out as it closes.
        if let Some(orig) = unsafe { COOKIE_ORIG.get(cookie) } {
            let orig = *orig;
            let _ = ORIG_DST.insert(t, orig, BPF_ANY as u64);
            let _ = COOKIE_ORIG.remove(cookie);
            watch = true;
        }
        if watch {
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let t = four_tuple(&ctx);
        let _ = REVNAT.remove(revnat_key(&ctx, cookie, &t));
        if ctx.arg(0) == BPF_TCP_SYN_SENT {
            let _ = ORIG_DST.remove(t);
        }
    }
    1
}
