//! The kernel programs: socket-level load balancing (`lb`) and kernel
//! enforcement of STRICT mTLS (`strict`). All maps are declared here, pinned
//! by name, so every program and the loader share them.

mod lb;
mod strict;

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
};
use ebpf_lb_common::{
    AffinityKey, AffinityValue, BackendSlot, Counters, DEFAULT_MAX_AFFINITY, DEFAULT_MAX_BACKENDS,
    DEFAULT_MAX_ENROLLED, DEFAULT_MAX_MESHED_PODS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SOCKETS,
    DEFAULT_MAX_WORKLOADS, Endpoint, FourTuple, LbConfig, MemberKey, OriginalDst, RevNatKey,
    Service, ServiceKey, UdpPeers, WorkloadKey, WorkloadPolicy,
};

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Socket address families, as `bpf_sock` and the sock_addr contexts give them.
pub(crate) const AF_INET: u32 = 2;
pub(crate) const AF_INET6: u32 = 10;

#[map]
pub(crate) static SERVICES: HashMap<ServiceKey, Service> =
    HashMap::pinned(DEFAULT_MAX_SERVICES, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static BACKENDS: HashMap<BackendSlot, Endpoint> =
    HashMap::pinned(DEFAULT_MAX_BACKENDS, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static MEMBERS: HashMap<MemberKey, u32> =
    HashMap::pinned(DEFAULT_MAX_BACKENDS, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(DEFAULT_MAX_AFFINITY, 0);

#[map]
pub(crate) static REVNAT: LruHashMap<RevNatKey, Endpoint> =
    LruHashMap::pinned(DEFAULT_MAX_SOCKETS, 0);

/// The `REVNAT` keys of each UDP socket, deleted with them when it closes
/// (`sock_release`).
#[map]
pub(crate) static UDP_PEERS: LruHashMap<u64, UdpPeers> = LruHashMap::pinned(DEFAULT_MAX_SOCKETS, 0);

#[map]
pub(crate) static COOKIE_ORIG: LruHashMap<u64, OriginalDst> =
    LruHashMap::pinned(DEFAULT_MAX_SOCKETS, 0);

/// Redirected connections the proxy has not accepted yet (it removes each
/// entry as it reads it; a connection that never connected takes its own out
/// as it closes; one connected but never accepted stays until the LRU map,
/// full, evicts it).
#[map]
pub(crate) static ORIG_DST: LruHashMap<FourTuple, OriginalDst> =
    LruHashMap::pinned(DEFAULT_MAX_SOCKETS, 0);

#[map]
pub(crate) static ENROLLED: HashMap<u64, u32> =
    HashMap::pinned(DEFAULT_MAX_ENROLLED, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static CONFIG: Array<LbConfig> = Array::pinned(1, 0);

#[map]
pub(crate) static COUNTERS: PerCpuArray<Counters> =
    PerCpuArray::pinned(DEFAULT_MAX_SERVICES + 1, 0);

#[map]
pub(crate) static WORKLOADS: HashMap<WorkloadKey, WorkloadPolicy> =
    HashMap::pinned(DEFAULT_MAX_WORKLOADS, BPF_F_NO_PREALLOC);

/// Meshed pods' addresses (value unused): an enrolled workload's TCP
/// connection straight to one (a headless Service's pod, a StatefulSet
/// peer) goes to the node proxy, as one to a meshed Service does.
#[map]
pub(crate) static MESHED_PODS: HashMap<WorkloadKey, u32> =
    HashMap::pinned(DEFAULT_MAX_MESHED_PODS, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static REFUSALS: PerCpuHashMap<WorkloadKey, u64> =
    PerCpuHashMap::pinned(DEFAULT_MAX_WORKLOADS, BPF_F_NO_PREALLOC);

/// `::ffff:0:0/96`, third word in network byte order.
pub(crate) const V4_MAPPED_WORD: u32 = 0xffff_u32.to_be();

// Context fields must be read and written with 4-byte accesses; volatile keeps
// the compiler from merging them into wider loads the verifier would refuse.
#[inline(always)]
pub(crate) fn read_ip6(words: *const [u32; 4]) -> [u32; 4] {
    let p = words as *const u32;
    unsafe {
        [
            read_volatile(p),
            read_volatile(p.add(1)),
            read_volatile(p.add(2)),
            read_volatile(p.add(3)),
        ]
    }
}

#[inline(always)]
pub(crate) fn write_ip6(words: *mut [u32; 4], v: [u32; 4]) {
    let p = words as *mut u32;
    unsafe {
        write_volatile(p, v[0]);
        write_volatile(p.add(1), v[1]);
        write_volatile(p.add(2), v[2]);
        write_volatile(p.add(3), v[3]);
    }
}

#[inline(always)]
pub(crate) fn is_v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD
}

#[inline(always)]
pub(crate) fn config() -> Option<LbConfig> {
    CONFIG.get(0).copied()
}
