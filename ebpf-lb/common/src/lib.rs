//! Layouts of the maps shared by the Sluice kernel programs (`ebpf-lb-programs`)
//! and the user-space loader (`ebpf-lb`).
//!
//! Every type is `#[repr(C)]` with explicit padding fields, so the kernel and user
//! space agree byte for byte and the verifier never sees uninitialised padding in a
//! map key. Addresses and ports are kept in network byte order, exactly as the
//! kernel hands them to `cgroup/connect*` programs: an IPv4 address is stored in
//! `addr[0]` (the other words zero), an IPv6 address in all four words.
#![no_std]

/// `Endpoint::family` / `ServiceKey::family` for IPv4.
pub const FAMILY_V4: u8 = 4;
/// `Endpoint::family` / `ServiceKey::family` for IPv6.
pub const FAMILY_V6: u8 = 6;

/// IANA protocol numbers, as `bpf_sock_addr::protocol` reports them.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `Service::flags`: enrolled clients are redirected to the node proxy.
pub const SERVICE_F_MESHED: u32 = 1 << 0;
/// `Service::flags`: `ClientIP` session affinity is on (`affinity_timeout_s` applies).
pub const SERVICE_F_AFFINITY: u32 = 1 << 1;

/// Default capacities; the loader can override each one.
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
pub const DEFAULT_MAX_BACKENDS: u32 = 262_144;
pub const DEFAULT_MAX_AFFINITY: u32 = 65_536;
pub const DEFAULT_MAX_SOCKETS: u32 = 262_144;
pub const DEFAULT_MAX_ENROLLED: u32 = 16_384;
pub const DEFAULT_MAX_WORKLOADS: u32 = 16_384;
/// Meshed pods of the whole cluster, whose addresses enrolled workloads'
/// connections are sent to the node proxy for.
pub const DEFAULT_MAX_MESHED_PODS: u32 = 65_536;

/// Number of cgroup ancestor levels the programs check for enrolment, besides the
/// current cgroup (a pod cgroup with one cgroup per container below it).
pub const MAX_ENROL_LEVELS: usize = 4;

/// Names of the maps, shared so the loader can find what the programs declare.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const MEMBERS: &str = "MEMBERS";
    pub const AFFINITY: &str = "AFFINITY";
    pub const REVNAT: &str = "REVNAT";
    pub const COOKIE_ORIG: &str = "COOKIE_ORIG";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const ENROLLED: &str = "ENROLLED";
    pub const CONFIG: &str = "CONFIG";
    pub const COUNTERS: &str = "COUNTERS";
    pub const WORKLOADS: &str = "WORKLOADS";
    pub const REFUSALS: &str = "REFUSALS";
    pub const UDP_PEERS: &str = "UDP_PEERS";
    pub const MESHED_PODS: &str = "MESHED_PODS";
}

/// An IP address and port (network byte order), used for backends, VIPs and
/// original destinations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

impl Endpoint {
    /// An endpoint of `family` with the address words and port as the
    /// kernel's socket structures hold them.
    #[inline(always)]
    pub const fn new(addr: [u32; 4], port: u16, family: u8) -> Self {
        Self {
            addr,
            port,
            family,
            _pad: 0,
        }
    }
}

/// Key of `SERVICES`: a frontend `VIP:port/protocol`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// Value of `SERVICES`. The backends of a service live in `BACKENDS` under
/// `(backend_set, 0..count)`; an update writes a whole new set and then replaces
/// this value in one map update, so a reader sees either the old set or the new
/// one, never a mix.
///
/// The kernel reuses a replaced or deleted hash map element at once (6.1+),
/// so a program that looked a service up may find the element rewritten
/// for another service, or half rewritten, by the time it copies the
/// value. The programs therefore copy the value twice, take it only when
/// both copies agree, and check `key_check` against the key they looked
/// up (`service_key_check`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Stable id of the service: index into `COUNTERS`, part of `MEMBERS` and
    /// `AFFINITY` keys. Never 0.
    pub id: u32,
    /// Id of the current backend set (never 0 when `count > 0`).
    pub backend_set: u32,
    /// Number of ready backends in the set.
    pub count: u32,
    /// `SERVICE_F_*`.
    pub flags: u32,
    /// Session affinity timeout, seconds.
    pub affinity_timeout_s: u32,
    /// `service_key_check` of the key this value was written under.
    pub key_check: u32,
}

/// A 64-bit mix (splitmix64's finaliser): inputs that differ in any bit give
/// unrelated outputs.
#[inline(always)]
pub const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The check a `Service` value carries of the key it belongs to: a mix of
/// every field of the key, never 0 (a value written by a version before the
/// check, whose field was padding, never matches).
#[inline(always)]
pub const fn service_key_check(key: &ServiceKey) -> u32 {
    let a = mix64(key.addr[0] as u64 | (key.addr[1] as u64) << 32);
    let b = mix64(a ^ (key.addr[2] as u64 | (key.addr[3] as u64) << 32));
    let c = mix64(b ^ (key.port as u64 | (key.proto as u64) << 16 | (key.family as u64) << 24));
    let check = (c ^ (c >> 32)) as u32;
    if check == 0 { 1 } else { check }
}

/// Key of `BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendSlot {
    pub backend_set: u32,
    pub index: u32,
}

/// Key of `MEMBERS`: present while `backend` is a ready backend of service `id`.
/// Session affinity checks it, so a remembered backend that left the service is
/// never used again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MemberKey {
    pub service_id: u32,
    pub backend: Endpoint,
}

/// Key of `AFFINITY`: one client (its network namespace, as `ClientIP` affinity
/// is per pod address) and one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub netns_cookie: u64,
    pub service_id: u32,
    pub _pad: u32,
}

/// Value of `AFFINITY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend: Endpoint,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// Key of `REVNAT`: a socket (by cookie) and the address the load balancer wrote
/// into it. `getpeername*` and `recvmsg*` translate that address back to the VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub peer: Endpoint,
    pub _pad: u32,
}

impl RevNatKey {
    /// The key of socket `cookie` whose remote end was written as `peer`.
    #[inline(always)]
    pub const fn new(cookie: u64, peer: Endpoint) -> Self {
        Self {
            cookie,
            peer,
            _pad: 0,
        }
    }
}

/// Backends of one UDP socket whose reverse translations `UDP_PEERS` lists,
/// for deleting them when the socket closes; a socket that sent to more
/// leaves the rest to the LRU.
pub const MAX_UDP_PEERS: usize = 4;

/// Value of `UDP_PEERS` (by socket cookie): the addresses the load balancer
/// wrote into one UDP socket, each a `REVNAT` key with that cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpPeers {
    pub peers: [Endpoint; MAX_UDP_PEERS],
    pub count: u32,
}

/// What a redirected connection was addressed to, and who made it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalDst {
    pub dst: Endpoint,
    pub service_id: u32,
    /// cgroup v2 id of the connecting process.
    pub cgroup_id: u64,
}

/// Key of `ORIG_DST`: the 4-tuple of a redirected connection, as the client's
/// socket sees it (`local` is the client, `remote` the proxy). Ports in network
/// byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FourTuple {
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The single entry of `CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LbConfig {
    /// Node proxy capture address for IPv4 clients (0: none).
    pub proxy_addr4: u32,
    /// Node proxy capture port, network byte order (0: no proxy, meshed
    /// services are balanced directly).
    pub proxy_port: u16,
    /// `CONFIG_F_*` bits.
    pub flags: u16,
    /// Node proxy capture address for IPv6 clients (all zero: none).
    pub proxy_addr6: [u32; 4],
    /// Sockets carrying this `SO_MARK` (the proxy's own) are never redirected.
    /// 0 disables the check.
    pub proxy_mark: u32,
    /// Number of valid entries in `enrol_levels`.
    pub enrol_level_count: u32,
    /// cgroup depths (root = 0) at which enrolled cgroups sit, so a process in
    /// a child of an enrolled cgroup (a container in a pod) is enrolled too.
    pub enrol_levels: [u32; MAX_ENROL_LEVELS],
}

/// `LbConfig::flags`: the STRICT guard lets connections from the node itself
/// through (a packet carrying the socket that sent it: kubelet's probes, and
/// any host-network process), as Cilium and Istio do for the host.
pub const CONFIG_F_STRICT_ALLOWS_NODE: u16 = 1;

/// `WorkloadPolicy::mode`: plaintext to the workload is refused in the kernel.
pub const MODE_STRICT: u32 = 1;
/// `WorkloadPolicy::mode`: plaintext and mTLS are both accepted.
pub const MODE_PERMISSIVE: u32 = 2;
/// `WorkloadPolicy::mode`: no mTLS enforcement.
pub const MODE_DISABLED: u32 = 3;

/// Key of `WORKLOADS`, `REFUSALS` and `MESHED_PODS`: a workload (pod)
/// address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Value of `WORKLOADS`: how plaintext to this workload is treated.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadPolicy {
    /// `MODE_*`.
    pub mode: u32,
    pub _pad: u32,
}

/// Per-service counters (a per-CPU array indexed by `Service::id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections (or unconnected datagrams) sent to a backend.
    pub balanced: u64,
    /// Connections refused because the service had no ready backend (or,
    /// for an enrolled workload's connection to a meshed service, because
    /// its original destination could not be recorded for the proxy).
    pub no_backend: u64,
    /// Connections of enrolled workloads sent to the node proxy.
    pub redirected: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are #[repr(C)], Copy, and made only of integers with
    // explicit padding fields, so any bit pattern is valid.
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for BackendSlot {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for UdpPeers {}
    unsafe impl aya::Pod for OriginalDst {}
    unsafe impl aya::Pod for FourTuple {}
    unsafe impl aya::Pod for LbConfig {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for WorkloadKey {}
    unsafe impl aya::Pod for WorkloadPolicy {}
}

/// Compile-time proof that no type has implicit padding: each size equals the
/// sum of its fields.
const _: () = {
    use core::mem::size_of;
    assert!(size_of::<Endpoint>() == 20);
    assert!(size_of::<ServiceKey>() == 20);
    assert!(size_of::<Service>() == 24);
    assert!(size_of::<BackendSlot>() == 8);
    assert!(size_of::<MemberKey>() == 24);
    assert!(size_of::<AffinityKey>() == 16);
    assert!(size_of::<AffinityValue>() == 32);
    assert!(size_of::<RevNatKey>() == 32);
    assert!(size_of::<UdpPeers>() == 84);
    assert!(size_of::<OriginalDst>() == 32);
    assert!(size_of::<FourTuple>() == 40);
    assert!(size_of::<LbConfig>() == 48);
    assert!(size_of::<Counters>() == 24);
    assert!(size_of::<WorkloadKey>() == 20);
    assert!(size_of::<WorkloadPolicy>() == 8);
};
