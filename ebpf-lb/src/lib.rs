//! Socket-level ClusterIP load balancing in the kernel, and its typed API.
//!
//! [`LoadBalancer::open`] loads the kernel programs of `ebpf-lb-programs` with
//! their maps pinned under bpffs (re-using maps pinned by an earlier instance,
//! so the service table survives an agent restart), and
//! [`LoadBalancer::attach`] attaches them to a cgroup v2 subtree with pinned
//! links, so load balancing keeps working while no agent runs.
//!
//! Services are updated atomically: [`LoadBalancer::apply`] writes each new
//! backend set beside the old one, switches the service to it in one map
//! update, waits until no program can still be using the old set, and only
//! then frees it. A call that removed a backend has returned only when no new
//! connection can be sent to that backend any more.

mod cgroup;
mod error;
mod reset;
mod service;
mod strict;
mod sys;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, MapInfo, PerCpuArray, PerCpuHashMap, PerCpuValues},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, SchedClassifier, SockOps, links::FdLink,
    },
};
pub use cgroup::{cgroup_id, cgroup_level, cgroup2_mount};
use ebpf_lb_common::{
    BackendSlot, CONFIG_F_STRICT_ALLOWS_NODE, Counters, DEFAULT_MAX_AFFINITY, DEFAULT_MAX_BACKENDS,
    DEFAULT_MAX_ENROLLED, DEFAULT_MAX_MESHED_PODS, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SOCKETS,
    DEFAULT_MAX_WORKLOADS, Endpoint, FourTuple, LbConfig, MAX_ENROL_LEVELS, MemberKey, OriginalDst,
    RevNatKey, SERVICE_F_AFFINITY, SERVICE_F_MESHED, Service, ServiceKey, WorkloadKey,
    WorkloadPolicy, maps, service_key_check,
};
pub use error::{Error, Result};
pub use reset::ResetReport;
pub use service::{Backend, BackendState, Frontend, Protocol, ServiceSpec};
use service::{endpoint, socket_addr};
pub use strict::{MtlsMode, interface_index};
pub use sys::ensure_bpffs;

/// The kernel programs, built by `build.rs` from `ebpf-lb-programs`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ebpf-lb"));

const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    "sluice_connect4",
    "sluice_connect6",
    "sluice_sendmsg4",
    "sluice_sendmsg6",
    "sluice_recvmsg4",
    "sluice_recvmsg6",
    "sluice_getpeername4",
    "sluice_getpeername6",
];
const SOCK_OPS_PROGRAM: &str = "sluice_sockops";
/// Deletes a closing UDP socket's reverse translations.
const SOCK_RELEASE_PROGRAM: &str = "sluice_sock_release";

/// Where bpffs is mounted on a node.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Sizes and locations. The defaults suit a large cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// bpffs mount point (mounted if missing).
    pub bpffs: PathBuf,
    /// Name of this load balancer's folder under `bpffs`: its maps and links
    /// are pinned there. One node agent uses one instance.
    pub instance: String,
    /// Service frontends (`VIP:port/protocol`).
    pub max_services: u32,
    /// Backends over all services.
    pub max_backends: u32,
    /// Remembered (client, service) session-affinity choices.
    pub max_affinity: u32,
    /// Sockets tracked for reverse translation and original destinations.
    pub max_sockets: u32,
    /// Enrolled cgroups.
    pub max_enrolled: u32,
    /// Workloads with an mTLS mode (STRICT enforcement).
    pub max_workloads: u32,
    /// Meshed pods of the cluster (see [`LoadBalancer::set_meshed_pods`]).
    pub max_meshed_pods: u32,
    /// Reset the sockets the load balancer connected to a backend when that
    /// backend leaves its service (see [`LoadBalancer::apply`]).
    pub reset_on_removal: bool,
    /// The STRICT guard lets connections from the node itself through
    /// (kubelet's liveness and readiness probes, host-network processes);
    /// with `false`, only the node proxy's pass, and a STRICT pod with
    /// probes never becomes ready.
    pub strict_allows_node: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bpffs: DEFAULT_BPFFS.into(),
            instance: "sluice".into(),
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            max_affinity: DEFAULT_MAX_AFFINITY,
            max_sockets: DEFAULT_MAX_SOCKETS,
            max_enrolled: DEFAULT_MAX_ENROLLED,
            max_workloads: DEFAULT_MAX_WORKLOADS,
            max_meshed_pods: DEFAULT_MAX_MESHED_PODS,
            reset_on_removal: true,
            strict_allows_node: true,
        }
    }
}

impl Options {
    /// The folder holding this instance's pinned maps and links.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.join(&self.instance)
    }

    /// Every pinned map's entries, and the setting they come from.
    fn sizes(&self) -> [(&'static str, u32, &'static str); 14] {
        [
            (maps::SERVICES, self.max_services, "max_services"),
            (maps::BACKENDS, self.max_backends, "max_backends"),
            (maps::MEMBERS, self.max_backends, "max_backends"),
            (maps::AFFINITY, self.max_affinity, "max_affinity"),
            (maps::REVNAT, self.max_sockets, "max_sockets"),
            // UDP sockets with translations are a fraction of all (a
            // preallocated LRU of 84-byte values: kept small).
            (
                maps::UDP_PEERS,
                self.max_sockets.div_ceil(4),
                "max_sockets / 4",
            ),
            (maps::COOKIE_ORIG, self.max_sockets, "max_sockets"),
            (maps::ORIG_DST, self.max_sockets, "max_sockets"),
            (maps::ENROLLED, self.max_enrolled, "max_enrolled"),
            // Index 0 is never a service id.
            (
                maps::COUNTERS,
                self.max_services.saturating_add(1),
                "max_services + 1",
            ),
            (maps::WORKLOADS, self.max_workloads, "max_workloads"),
            (maps::REFUSALS, self.max_workloads, "max_workloads"),
            (maps::MESHED_PODS, self.max_meshed_pods, "max_meshed_pods"),
            // One entry, whatever the settings; its layout is checked too.
            (maps::CONFIG, 1, "(fixed: one entry)"),
        ]
    }
}

/// A change to the service table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Create the service, or replace its backends and settings.
    Upsert(ServiceSpec),
    /// Delete the service.
    Remove(Frontend),
}

/// What an applied batch did beyond switching services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Sockets reset because their backend left the service.
    pub reset: ResetReport,
    /// Why the replaced backend slots stay allocated until the next start,
    /// when the wait for programs still reading them failed (the batch is
    /// in force all the same).
    pub kept_slots: Option<String>,
    /// Departed backends' `MEMBERS` entries that could not be removed (this
    /// batch's or earlier ones'): tried again by every batch; until then
    /// session affinity may still pick those backends.
    pub stuck_members: usize,
}

/// What the kernel currently holds for one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceState {
    pub frontend: Frontend,
    /// Ready backends, in slot order.
    pub backends: Vec<SocketAddr>,
    pub meshed: bool,
    pub affinity: Option<Duration>,
}

/// Per-service counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Connections (and unconnected UDP datagrams) sent to a backend.
    pub balanced: u64,
    /// Connects refused because no backend was ready.
    pub no_backend: u64,
    /// Connections of enrolled workloads sent to the node proxy.
    pub redirected: u64,
}

/// Run-time statistics of one kernel program (collected only while the
/// kernel's BPF statistics are enabled, see `aya::sys::enable_stats`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramStats {
    pub program: &'static str,
    pub run_count: u64,
    pub run_time: Duration,
}

/// Where connections of enrolled workloads to meshed services are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyTarget {
    /// Capture address for IPv4 clients.
    pub v4: Option<Ipv4Addr>,
    /// Capture address for IPv6 clients.
    pub v6: Option<Ipv6Addr>,
    /// Capture port (15001 in a node).
    pub port: u16,
    /// `SO_MARK` the proxy sets on its own sockets; they are never redirected.
    /// 0 disables the check.
    pub mark: u32,
}

/// The destination a redirected connection was addressed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDestination {
    /// The service `VIP:port` the client connected to.
    pub dst: SocketAddr,
    /// cgroup v2 id of the client process.
    pub cgroup_id: u64,
}

/// Mutable state: the writable maps, plus the allocation bookkeeping that
/// mirrors them (rebuilt from the maps when an instance re-opens them).
struct Tables {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: HashMap<MapData, BackendSlot, Endpoint>,
    members: HashMap<MapData, MemberKey, u32>,
    enrolled: HashMap<MapData, u64, u32>,
    config: Array<MapData, LbConfig>,
    counters: PerCpuArray<MapData, Counters>,
    workloads: HashMap<MapData, WorkloadKey, WorkloadPolicy>,
    refusals: PerCpuHashMap<MapData, WorkloadKey, u64>,
    revnat: HashMap<MapData, RevNatKey, Endpoint>,
    meshed_pods: HashMap<MapData, WorkloadKey, u32>,
    /// Mirror of `MESHED_PODS`.
    meshed: BTreeSet<IpAddr>,
    /// Cgroups this instance attached to (their processes' sockets are the
    /// ones reset when a backend leaves).
    attached: Vec<PathBuf>,
    /// Mirror of `SERVICES`.
    known: BTreeMap<ServiceKey, Service>,
    /// Endpoints of each service that may carry connections (ready or
    /// terminating); one leaving this set gets its sockets reset.
    alive: BTreeMap<ServiceKey, Vec<Endpoint>>,
    /// Ready backends of each service id, in slot order (mirror of `BACKENDS`).
    sets: BTreeMap<u32, Vec<Endpoint>>,
    free_ids: Vec<u32>,
    next_id: u32,
    used_sets: HashSet<u32>,
    next_set: u32,
    /// Enrolled cgroup id -> its level.
    enrolled_ids: BTreeMap<u64, u32>,
    /// Interfaces guarded by this instance -> their index, to find the
    /// pinned link of one that is gone (a deleted pod's veth).
    guarded: BTreeMap<String, u32>,
    /// `MEMBERS` entries of departed backends whose removal failed: tried
    /// again at the next batch (a stale one would let session affinity pick
    /// a backend its service no longer has), forgotten if re-added.
    unlinked: Vec<MemberKey>,
}

/// A loaded, pinned instance of the kernel load balancer.
pub struct LoadBalancer {
    opts: Options,
    tables: Mutex<Tables>,
    /// Taken out as read (`original_destination`).
    orig_dst: Mutex<HashMap<MapData, FourTuple, OriginalDst>>,
    barrier: sys::RcuBarrier,
    nr_cpus: usize,
    /// Last, so that it is released after everything else is closed.
    _lock: sys::PinLock,
}

impl std::fmt::Debug for LoadBalancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadBalancer")
            .field("pin_dir", &self.opts.pin_dir())
            .finish()
    }
}

fn take<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| {
        Error::map(
            name,
            MapError::InvalidName {
                name: name.to_string(),
            },
        )
    })?;
    M::try_from(map).map_err(|e| Error::map(name, e))
}

fn is_full(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG))
}

fn is_not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

/// Key and value sizes of each sized map, as the programs of this version
/// declare them: a pinned map of another layout was left by another version,
/// and reading it with these types would misread every entry.
fn layout(map: &str) -> Option<(u32, u32)> {
    fn kv<K, V>() -> Option<(u32, u32)> {
        Some((size_of::<K>() as u32, size_of::<V>() as u32))
    }
    match map {
        maps::SERVICES => kv::<ServiceKey, Service>(),
        maps::BACKENDS => kv::<BackendSlot, Endpoint>(),
        maps::MEMBERS => kv::<MemberKey, u32>(),
        maps::AFFINITY => kv::<ebpf_lb_common::AffinityKey, ebpf_lb_common::AffinityValue>(),
        maps::REVNAT => kv::<RevNatKey, Endpoint>(),
        maps::UDP_PEERS => kv::<u64, ebpf_lb_common::UdpPeers>(),
        maps::COOKIE_ORIG => kv::<u64, OriginalDst>(),
        maps::ORIG_DST => kv::<FourTuple, OriginalDst>(),
        maps::ENROLLED => kv::<u64, u32>(),
        maps::CONFIG => kv::<u32, LbConfig>(),
        maps::COUNTERS => kv::<u32, Counters>(),
        maps::WORKLOADS => kv::<WorkloadKey, WorkloadPolicy>(),
        maps::REFUSALS => kv::<WorkloadKey, u64>(),
        maps::MESHED_PODS => kv::<WorkloadKey, u32>(),
        _ => None,
    }
}

impl LoadBalancer {
    /// Loads the programs and opens (or creates) the pinned maps of
    /// `opts.instance`. Nothing is attached yet: see [`LoadBalancer::attach`].
    pub fn open(opts: Options) -> Result<Self> {
        sys::ensure_bpffs(&opts.bpffs)?;
        let pin_dir = opts.pin_dir();
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        for d in [&maps_dir, &links_dir] {
            fs::create_dir_all(d).map_err(|e| Error::io("creating pin folder", d, e))?;
        }
        // Before anything is read from the pinned state.
        let lock = sys::lock_pin_dir(&pin_dir)?;
        for (name, wanted, setting) in opts.sizes() {
            let pin = maps_dir.join(name);
            if pin.exists() {
                let info = MapInfo::from_pin(&pin).map_err(|e| Error::map(name, e))?;
                if let Some((key, value)) = layout(name)
                    && (info.key_size(), info.value_size()) != (key, value)
                {
                    return Err(Error::PinnedLayoutMismatch {
                        map: name,
                        dir: maps_dir,
                        pinned_key: info.key_size(),
                        pinned_value: info.value_size(),
                        key,
                        value,
                    });
                }
                if info.max_entries() != wanted {
                    return Err(Error::PinnedSizeMismatch {
                        map: name,
                        dir: maps_dir,
                        pinned: info.max_entries(),
                        wanted,
                        setting,
                    });
                }
            }
        }

        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&maps_dir);
        for (name, size, _) in opts.sizes() {
            loader.map_max_entries(name, size);
        }
        let mut ebpf = loader.load(PROGRAMS).map_err(|e| Error::Load {
            source: Box::new(e),
        })?;
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|e| Error::program(name, e))?;
        }
        let prog: &mut SockOps = program(&mut ebpf, SOCK_OPS_PROGRAM)?;
        prog.load()
            .map_err(|e| Error::program(SOCK_OPS_PROGRAM, e))?;
        let prog: &mut CgroupSock = program(&mut ebpf, SOCK_RELEASE_PROGRAM)?;
        prog.load()
            .map_err(|e| Error::program(SOCK_RELEASE_PROGRAM, e))?;
        let prog: &mut SchedClassifier = program(&mut ebpf, strict::STRICT_PROGRAM)?;
        prog.load()
            .map_err(|e| Error::program(strict::STRICT_PROGRAM, e))?;

        let mut services: HashMap<MapData, ServiceKey, Service> = take(&mut ebpf, maps::SERVICES)?;
        let mut backends: HashMap<MapData, BackendSlot, Endpoint> =
            take(&mut ebpf, maps::BACKENDS)?;
        let mut members: HashMap<MapData, MemberKey, u32> = take(&mut ebpf, maps::MEMBERS)?;
        let enrolled: HashMap<MapData, u64, u32> = take(&mut ebpf, maps::ENROLLED)?;
        let config = take(&mut ebpf, maps::CONFIG)?;
        let counters = take(&mut ebpf, maps::COUNTERS)?;
        let orig_dst = take(&mut ebpf, maps::ORIG_DST)?;
        let workloads = take(&mut ebpf, maps::WORKLOADS)?;
        let refusals = take(&mut ebpf, maps::REFUSALS)?;
        let revnat = take(&mut ebpf, maps::REVNAT)?;
        let meshed_pods: HashMap<MapData, WorkloadKey, u32> = take(&mut ebpf, maps::MESHED_PODS)?;
        let mut meshed = BTreeSet::new();
        for k in meshed_pods.keys() {
            let k = k.map_err(|e| Error::map(maps::MESHED_PODS, e))?;
            if let Some(a) = socket_addr(&Endpoint::new(k.addr, 0, k.family)) {
                meshed.insert(a.ip());
            }
        }

        // Rebuild the bookkeeping from what an earlier instance left pinned.
        let mut known = BTreeMap::new();
        let mut sets = BTreeMap::new();
        let mut used_sets = HashSet::new();
        for entry in services.iter() {
            let (key, svc) = entry.map_err(|e| Error::map(maps::SERVICES, e))?;
            let mut eps = Vec::with_capacity(svc.count as usize);
            for index in 0..svc.count {
                let slot = BackendSlot {
                    backend_set: svc.backend_set,
                    index,
                };
                eps.push(backends.get(&slot, 0).map_err(|e| {
                    Error::Corrupt(format!(
                        "pinned service {} lacks backend {index} of its set {} ({e}); \
                         remove the pinned state (`mesh-agent uninstall`) and start again",
                        Frontend::from_key(&key)
                            .map_or_else(|| "(unreadable key)".to_string(), |f| f.to_string()),
                        svc.backend_set
                    ))
                })?);
            }
            if svc.backend_set != 0 {
                used_sets.insert(svc.backend_set);
            }
            sets.insert(svc.id, eps);
            known.insert(key, svc);
        }
        // A value written by a version before the key check (the field was
        // padding) would be refused by the programs: give it its check.
        for (key, svc) in known.iter_mut() {
            let check = service_key_check(key);
            if svc.key_check != check {
                svc.key_check = check;
                services
                    .insert(*key, *svc, 0)
                    .map_err(|e| Error::map(maps::SERVICES, e))?;
            }
        }
        // An earlier instance that stopped between staging a batch and
        // retiring what it replaced left slots and members no service uses:
        // a stale member would let affinity pick a backend that left.
        // Each set's length, once: a scan of every service per slot would
        // take minutes on a large node.
        let set_len: std::collections::HashMap<u32, u32> = known
            .values()
            .map(|s: &Service| (s.backend_set, s.count))
            .collect();
        let in_use = |slot: &BackendSlot| {
            set_len
                .get(&slot.backend_set)
                .is_some_and(|&count| slot.index < count)
        };
        let stale_slots: Vec<BackendSlot> = backends
            .keys()
            .filter_map(|k| k.ok())
            .filter(|slot| !in_use(slot))
            .collect();
        for slot in stale_slots {
            let _ = backends.remove(&slot);
        }
        let stale_members: Vec<MemberKey> = members
            .keys()
            .filter_map(|k| k.ok())
            .filter(|m| {
                !sets
                    .get(&m.service_id)
                    .is_some_and(|eps: &Vec<Endpoint>| eps.contains(&m.backend))
            })
            .collect();
        for m in stale_members {
            let _ = members.remove(&m);
        }
        let used_ids: BTreeSet<u32> = known.values().map(|s| s.id).collect();
        let next_id = used_ids.last().map_or(1, |m| m + 1);
        let free_ids = (1..next_id)
            .filter(|i| !used_ids.contains(i))
            .rev()
            .collect();
        let next_set = used_sets
            .iter()
            .max()
            .map_or(1, |m| m.wrapping_add(1).max(1));
        // After a restart, terminating and not-ready endpoints are not
        // known: start from the ready ones (one of those that leaves before
        // the first batch keeps its sockets).
        let alive = known
            .iter()
            .map(|(k, s)| (*k, sets.get(&s.id).cloned().unwrap_or_default()))
            .collect();
        let mut enrolled_ids = BTreeMap::new();
        for entry in enrolled.iter() {
            let (id, level) = entry.map_err(|e| Error::map(maps::ENROLLED, e))?;
            enrolled_ids.insert(id, level);
        }

        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| Error::io("reading the number of CPUs from", what, e))?;
        let strict_allows_node = opts.strict_allows_node;
        let lb = Self {
            opts,
            tables: Mutex::new(Tables {
                ebpf,
                services,
                backends,
                members,
                enrolled,
                config,
                counters,
                workloads,
                refusals,
                revnat,
                meshed_pods,
                meshed,
                attached: Vec::new(),
                known,
                alive,
                sets,
                free_ids,
                next_id,
                used_sets,
                next_set,
                enrolled_ids,
                guarded: BTreeMap::new(),
                unlinked: Vec::new(),
            }),
            orig_dst: Mutex::new(orig_dst),
            barrier: sys::RcuBarrier::new()?,
            nr_cpus,
            _lock: lock,
        };
        lb.tables().write_flags(strict_allows_node)?;
        Ok(lb)
    }

    /// The folder under bpffs holding this instance's pinned state.
    pub fn pin_dir(&self) -> PathBuf {
        self.opts.pin_dir()
    }

    /// [`uninstall`](Self::uninstall) through a shared handle: detaches
    /// every program of this instance (cgroups and STRICT guards) and
    /// removes its pinned state while this instance still holds it (an
    /// agent whose cluster removed it). The maps live on, unpinned, until
    /// this value is dropped; nothing runs them any more.
    pub fn remove_pinned_state(&self) -> Result<()> {
        remove_state(&self.opts.pin_dir())
    }

    fn links_dir(&self) -> PathBuf {
        self.opts.pin_dir().join("links")
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A panic while holding the lock leaves the maps consistent (every
        // step is a whole map update), so the guard can be recovered.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches all programs to the cgroup v2 directory `cgroup` (its whole
    /// subtree). The links are pinned, so they outlive this process; attaching
    /// again (a restarted agent) replaces the previous instance's programs.
    /// All or nothing: every program is attached before any is pinned, so a
    /// program the kernel refuses leaves none of the new ones attached (the
    /// previous instance's set, if any, stays whole).
    pub fn attach(&self, cgroup: &Path) -> Result<()> {
        let id = cgroup_id(cgroup)?;
        let dir = fs::File::open(cgroup).map_err(|e| Error::io("opening cgroup", cgroup, e))?;
        let links = self.links_dir();
        let mut t = self.tables();
        // Attached, not yet pinned: dropped on an error, they detach.
        let mut attached: Vec<(FdLink, &str)> = Vec::new();
        // The same steps for each program, of three program types.
        macro_rules! attach {
            ($ty:ty, $name:expr) => {{
                let name = $name;
                let prog: &mut $ty = program(&mut t.ebpf, name)?;
                let link_id = prog
                    .attach(&dir, CgroupAttachMode::Single)
                    .map_err(|e| Error::program(name, e))?;
                let link = prog
                    .take_link(link_id)
                    .map_err(|e| Error::program(name, e))?;
                let link = FdLink::try_from(link)
                    .map_err(|e| Error::io("pinning link", &links, io::Error::other(chain(&e))))?;
                attached.push((link, name));
            }};
        }
        for name in SOCK_ADDR_PROGRAMS {
            attach!(CgroupSockAddr, name);
        }
        attach!(SockOps, SOCK_OPS_PROGRAM);
        attach!(CgroupSock, SOCK_RELEASE_PROGRAM);
        pin_links(attached, &links, id)?;
        if !t.attached.iter().any(|p| p == cgroup) {
            t.attached.push(cgroup.to_path_buf());
        }
        Ok(())
    }

    /// Detaches the programs from every cgroup but `keep`: those an earlier
    /// run attached to a cgroup root it no longer uses (the agent's
    /// `--cgroup-root` changed). Returns the ids of the cgroups let go.
    pub fn detach_others(&self, keep: &Path) -> Result<Vec<u64>> {
        let keep_id = cgroup_id(keep)?;
        let links = self.links_dir();
        // Link pins are named `<cgroup id>-<program>` (`new-` while staged).
        let id_of = |name: &str| -> Option<u64> {
            name.trim_start_matches("new-")
                .split('-')
                .next()?
                .parse()
                .ok()
        };
        let mut others: BTreeSet<u64> = BTreeSet::new();
        if let Ok(entries) = fs::read_dir(&links) {
            for e in entries.flatten() {
                if let Some(id) = id_of(&e.file_name().to_string_lossy())
                    && id != keep_id
                {
                    others.insert(id);
                }
            }
        }
        remove_links(&links, |name| id_of(name).is_some_and(|id| id != keep_id))?;
        self.tables().attached.retain(|p| p == keep);
        Ok(others.into_iter().collect())
    }

    /// Detaches all programs from `cgroup`.
    pub fn detach(&self, cgroup: &Path) -> Result<()> {
        let id = cgroup_id(cgroup)?;
        self.tables().attached.retain(|p| p != cgroup);
        remove_links(&self.links_dir(), |name| {
            name.starts_with(&format!("{id}-"))
        })
    }

    /// Detaches everything and removes every pinned map and link of this
    /// instance. The service table is gone afterwards.
    pub fn uninstall(self) -> Result<()> {
        let dir = self.opts.pin_dir();
        drop(self);
        uninstall_at(&dir)
    }

    /// Applies a batch of changes atomically per service. Either every change
    /// is applied, or (on a full map or invalid input) none is and the
    /// previous state stays in force.
    ///
    /// When it returns, no new connection can reach a backend the batch
    /// removed, and (with `Options::reset_on_removal`) the sockets the load
    /// balancer had connected to a backend that left its service (deleted,
    /// or, for UDP, not ready and not terminating) have been destroyed.
    /// Terminating backends, and not-ready ones of a TCP service, keep their
    /// connections until they are removed.
    pub fn apply(&self, changes: &[Change]) -> Result<ApplyReport> {
        // Validate everything before touching a map.
        let mut planned = Vec::with_capacity(changes.len());
        for change in changes {
            match change {
                Change::Upsert(spec) => {
                    let invalid = |reason| Error::InvalidService {
                        frontend: spec.frontend,
                        reason,
                    };
                    spec.validate().map_err(invalid)?;
                    let eps = spec.ready_endpoints().map_err(invalid)?;
                    if eps.len() > self.opts.max_backends as usize {
                        return Err(Error::MapFull {
                            map: maps::BACKENDS,
                            capacity: self.opts.max_backends,
                            option: "max_backends",
                            what: spec.frontend.to_string(),
                        });
                    }
                    planned.push(Planned::Upsert(spec, eps));
                }
                Change::Remove(fe) => planned.push(Planned::Remove(*fe)),
            }
        }
        let mut t = self.tables();
        let mut undo = Undo::default();
        let retired = match t.stage(&planned, &mut undo, self) {
            Ok(r) => r,
            Err(e) => {
                let switched = !undo.services.is_empty();
                let stuck = t.restore(&mut undo);
                if !stuck.is_empty() {
                    // The kernel still points at what the stage wrote:
                    // nothing it took is freed (a restart's clean-up
                    // reclaims what no service uses), and the caller learns
                    // that the batch is half in force.
                    return Err(Error::Corrupt(format!(
                        "{e}; rolling the batch back failed for {}: those services keep the \
                         new entries, the others are as before. Apply the batch again (the \
                         agent retries it)",
                        stuck.join(", ")
                    )));
                }
                // The batch's members go at once (one that stays would let
                // affinity choose a backend outside its service); one that
                // cannot be removed is retried by the next batch.
                t.unlink_undone_members(std::mem::take(&mut undo.members));
                // A program may still hold a service value staged a moment
                // ago, pointing at slots about to go: free them only once it
                // has finished (if that cannot be known, they stay taken).
                if !switched || self.barrier.wait().is_ok() {
                    t.release(undo);
                }
                return Err(e);
            }
        };
        // The services are switched: the batch is applied. A failure to
        // unlink a member is reported (and retried by the next batch), but
        // the barrier, the cleanup and the reset still run.
        let unlinked = t.unlink_members(&retired);
        // Every program that could still hold a replaced service value (and
        // so an old backend set, or a backend just removed) has finished once
        // the barrier returns. Without it, the old slots cannot be known
        // unused: they stay allocated (a restart's clean-up reclaims them),
        // and the batch, in force, is still reported applied.
        let mut report = ApplyReport::default();
        let barrier = if !retired.sets.is_empty() || !retired.members.is_empty() {
            self.barrier.wait()
        } else {
            Ok(())
        };
        let departed = match barrier {
            Ok(()) => t.retire(retired),
            Err(e) => {
                report.kept_slots = Some(e.to_string());
                t.retire_keeping_slots(retired)
            }
        };
        report.stuck_members = t.unlinked.len();
        if self.opts.reset_on_removal && !departed.is_empty() {
            report.reset = reset::reset(&t.attached, &t.revnat, &departed)?;
        }
        unlinked?;
        Ok(report)
    }

    /// Creates or replaces one service.
    pub fn upsert_service(&self, spec: &ServiceSpec) -> Result<()> {
        self.apply(&[Change::Upsert(spec.clone())]).map(drop)
    }

    /// Removes one service. Removing an unknown service is an error.
    pub fn remove_service(&self, frontend: &Frontend) -> Result<()> {
        if !self.tables().known.contains_key(&frontend.key()) {
            return Err(Error::UnknownService(*frontend));
        }
        self.apply(&[Change::Remove(*frontend)]).map(drop)
    }

    /// The services the kernel holds now.
    pub fn services(&self) -> Vec<ServiceState> {
        let t = self.tables();
        t.known
            .iter()
            .filter_map(|(key, svc)| {
                Some(ServiceState {
                    frontend: Frontend::from_key(key)?,
                    backends: t
                        .sets
                        .get(&svc.id)
                        .map(|eps| eps.iter().filter_map(socket_addr).collect())
                        .unwrap_or_default(),
                    meshed: svc.flags & SERVICE_F_MESHED != 0,
                    affinity: (svc.flags & SERVICE_F_AFFINITY != 0)
                        .then(|| Duration::from_secs(svc.affinity_timeout_s.into())),
                })
            })
            .collect()
    }

    /// Counters of one service, summed over CPUs.
    /// Sockets whose reverse translation is kept (for `getpeername`, UDP
    /// replies and resets): balanced connected sockets, and UDP sockets
    /// that sent to a VIP. A TCP socket's entry goes when it closes.
    pub fn tracked_sockets(&self) -> usize {
        self.tables().revnat.keys().filter(|k| k.is_ok()).count()
    }

    /// Connections redirected to the proxy whose original destination has
    /// not been read yet (not accepted yet, or never).
    pub fn pending_original_destinations(&self) -> usize {
        self.orig_dst
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|k| k.is_ok())
            .count()
    }

    pub fn counters(&self, frontend: &Frontend) -> Result<ServiceCounters> {
        let t = self.tables();
        let svc = t
            .known
            .get(&frontend.key())
            .ok_or(Error::UnknownService(*frontend))?;
        let per_cpu = t
            .counters
            .get(&svc.id, 0)
            .map_err(|e| Error::map(maps::COUNTERS, e))?;
        Ok(per_cpu
            .iter()
            .fold(ServiceCounters::default(), |acc, c| ServiceCounters {
                balanced: acc.balanced + c.balanced,
                no_backend: acc.no_backend + c.no_backend,
                redirected: acc.redirected + c.redirected,
            }))
    }

    /// Run counts and times of this instance's programs.
    pub fn program_stats(&self) -> Result<Vec<ProgramStats>> {
        let t = self.tables();
        SOCK_ADDR_PROGRAMS
            .iter()
            .chain([&SOCK_OPS_PROGRAM, &SOCK_RELEASE_PROGRAM])
            .map(|name| {
                let prog = t.ebpf.program(name).ok_or_else(|| Error::Program {
                    program: name,
                    source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
                })?;
                let info = prog.info().map_err(|e| Error::program(name, e))?;
                Ok(ProgramStats {
                    program: name,
                    run_count: info.run_count(),
                    run_time: info.run_time(),
                })
            })
            .collect()
    }

    /// Sets (or with `None` clears) the node proxy address used for enrolled
    /// workloads.
    pub fn set_proxy(&self, proxy: Option<ProxyTarget>) -> Result<()> {
        let mut t = self.tables();
        let mut cfg = t.current_config()?;
        cfg.proxy_addr4 = 0;
        cfg.proxy_addr6 = [0; 4];
        cfg.proxy_port = 0;
        cfg.proxy_mark = 0;
        if let Some(p) = proxy {
            if p.port == 0 {
                return Err(Error::InvalidProxy(
                    "the capture port is 0; give the port the proxy listens on (15001)".into(),
                ));
            }
            if let Some(v6) = p.v6.filter(|a| a.to_ipv4_mapped().is_some()) {
                return Err(Error::InvalidProxy(format!(
                    "{v6} is an IPv4-mapped address; give it as the IPv4 address"
                )));
            }
            cfg.proxy_port = p.port.to_be();
            cfg.proxy_mark = p.mark;
            if let Some(v4) = p.v4 {
                cfg.proxy_addr4 = endpoint(SocketAddr::new(v4.into(), 0)).addr[0];
            }
            if let Some(v6) = p.v6 {
                cfg.proxy_addr6 = endpoint(SocketAddr::new(v6.into(), 0)).addr;
            }
        }
        t.config
            .set(0, cfg, 0)
            .map_err(|e| Error::map(maps::CONFIG, e))
    }

    /// Enrols the processes of the cgroup at `path` and of every cgroup below
    /// it: their connections to meshed services go to the node proxy.
    pub fn enroll(&self, path: &Path) -> Result<()> {
        let id = cgroup_id(path)?;
        let level = cgroup_level(path)?;
        let mut t = self.tables();
        let mut levels: BTreeSet<u32> = t.enrolled_ids.values().copied().collect();
        levels.insert(level);
        if levels.len() > MAX_ENROL_LEVELS {
            return Err(Error::Cgroup {
                path: path.into(),
                reason: format!(
                    "enrolled cgroups would sit at {} different depths ({levels:?}); at most \
                     {MAX_ENROL_LEVELS} are supported",
                    levels.len()
                ),
            });
        }
        t.enrolled.insert(id, level, 0).map_err(|e| {
            if is_full(&e) {
                Error::MapFull {
                    map: maps::ENROLLED,
                    capacity: self.opts.max_enrolled,
                    option: "max_enrolled",
                    what: format!("cgroup {}", path.display()),
                }
            } else {
                Error::map(maps::ENROLLED, e)
            }
        })?;
        t.enrolled_ids.insert(id, level);
        t.write_levels()
    }

    /// Takes the cgroup with id `id` out of the mesh (the id, because the
    /// cgroup may already be gone).
    pub fn unenroll(&self, id: u64) -> Result<()> {
        let mut t = self.tables();
        if !t.enrolled_ids.contains_key(&id) {
            return Ok(());
        }
        // Forgotten only once the kernel forgot it: a failed delete is
        // tried again by the next call, instead of reporting success while
        // the cgroup stays redirected.
        match t.enrolled.remove(&id) {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(Error::map(maps::ENROLLED, e)),
        }
        t.enrolled_ids.remove(&id);
        t.write_levels()
    }

    /// Ids of the enrolled cgroups.
    pub fn enrolled(&self) -> Vec<u64> {
        self.tables().enrolled_ids.keys().copied().collect()
    }

    /// Makes `pods` the meshed pods' addresses: an enrolled workload's TCP
    /// connection straight to one of them (not through a Service: a headless
    /// Service's pod, a StatefulSet peer, a pod found by its IP) is sent to
    /// the node proxy with the pod's address as its original destination,
    /// as a connection to a meshed Service is. Changes only what differs;
    /// connections already made are left alone. A full map leaves the pods
    /// that did not fit out (their connections go straight, as before) and
    /// says so.
    pub fn set_meshed_pods(&self, pods: &BTreeSet<IpAddr>) -> Result<()> {
        let mut t = self.tables();
        let gone: Vec<IpAddr> = t.meshed.difference(pods).copied().collect();
        for ip in gone {
            match t.meshed_pods.remove(&strict::workload_key(ip)) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(Error::map(maps::MESHED_PODS, e)),
            }
            t.meshed.remove(&ip);
        }
        let new: Vec<IpAddr> = pods.difference(&t.meshed).copied().collect();
        for ip in new {
            t.meshed_pods
                .insert(strict::workload_key(ip), 1, 0)
                .map_err(|e| {
                    if is_full(&e) {
                        Error::MapFull {
                            map: maps::MESHED_PODS,
                            capacity: self.opts.max_meshed_pods,
                            option: "max_meshed_pods",
                            what: format!("meshed pod {ip}"),
                        }
                    } else {
                        Error::map(maps::MESHED_PODS, e)
                    }
                })?;
            t.meshed.insert(ip);
        }
        Ok(())
    }

    /// The meshed pods' addresses the kernel holds.
    pub fn meshed_pods(&self) -> BTreeSet<IpAddr> {
        self.tables().meshed.clone()
    }

    /// The original destination of a connection the kernel redirected to the
    /// proxy, found from the accepted socket's `peer` (the client) and `local`
    /// (the capture listener) addresses. Read once: the entry is taken out
    /// (a second call for the same connection finds nothing).
    pub fn original_destination(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Option<OriginalDestination>> {
        let p = endpoint(peer);
        let l = endpoint(local);
        if p.family != l.family {
            return Ok(None);
        }
        let key = FourTuple {
            local_addr: p.addr,
            remote_addr: l.addr,
            local_port: p.port,
            remote_port: l.port,
            family: p.family,
            _pad: [0; 3],
        };
        let mut map = self.orig_dst.lock().unwrap_or_else(|e| e.into_inner());
        let found = match map.get(&key, 0) {
            Ok(o) => o,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(Error::map(maps::ORIG_DST, e)),
        };
        // Read once, when the connection is accepted: the entry goes, so
        // the map holds connections not yet accepted only. (The kernel
        // deletes it at the close of a connection that never connected
        // only: a connected client's close can come before the accept.)
        // One that cannot be removed stays until the LRU map, full,
        // evicts it.
        let _ = map.remove(&key);
        Ok(socket_addr(&found.dst).map(|dst| OriginalDestination {
            dst,
            cgroup_id: found.cgroup_id,
        }))
    }
}

/// Removes every pinned map and link under `pin_dir` (detaching the
/// programs). Refused (`Error::InUse`) while a loader holds the instance,
/// after waiting a few seconds for one that is stopping: removed under a
/// running agent, the folder would be made afresh by the next loader, which
/// would then run beside it.
pub fn uninstall_at(pin_dir: &Path) -> Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let _lock = loop {
        match sys::lock_pin_dir(pin_dir) {
            Err(Error::InUse { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            // Gone meanwhile: nothing to remove.
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(());
            }
            other => break other?,
        }
    };
    remove_state(pin_dir)
}

/// Detaches every pinned link under `pin_dir` and removes the folder; the
/// caller holds its lock.
fn remove_state(pin_dir: &Path) -> Result<()> {
    remove_links(&pin_dir.join("links"), |_| true)?;
    match fs::remove_dir_all(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing pinned state", pin_dir, e)),
    }
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or_else(|| Error::Program {
        program: name,
        source: Box::new(aya::programs::ProgramError::UnexpectedProgramType),
    })?;
    prog.try_into().map_err(|e| Error::program(name, e))
}

/// Pins `links` (attached to cgroup `cgroup`) in `dir` as
/// `<cgroup id>-<program>`, each replacing (and so detaching) the link a
/// previous instance pinned there. The new program is attached before the
/// old one goes, so no connection passes unbalanced in between; while both
/// run, the second sees an already translated address and leaves it alone.
/// Every one is pinned under a temporary name first: one that cannot be
/// pinned unpins the others, which then detach with their descriptors, and
/// the previous set stays whole.
fn pin_links(links: Vec<(FdLink, &str)>, dir: &Path, cgroup: u64) -> Result<()> {
    let mut staged: Vec<(PathBuf, PathBuf)> = Vec::new();
    // Unpins staged links: with their descriptors gone, they detach.
    let unpin = |staged: &[(PathBuf, PathBuf)]| {
        for (t, _) in staged {
            let _ = fs::remove_file(t);
        }
    };
    for (link, name) in links {
        // bpffs refuses names with dots.
        let path = dir.join(format!("{cgroup}-{name}"));
        let tmp = dir.join(format!("new-{cgroup}-{name}"));
        let _ = fs::remove_file(&tmp);
        if let Err(e) = link.pin(&tmp) {
            unpin(&staged);
            return Err(Error::io("pinning link", &tmp, io::Error::other(chain(&e))));
        }
        staged.push((tmp, path));
    }
    // A rename that fails (it hardly can: same folder) leaves the ones
    // before it in force; the rest are unpinned, and so detach.
    for (i, (tmp, path)) in staged.iter().enumerate() {
        if let Err(e) = fs::rename(tmp, path) {
            unpin(&staged[i..]);
            return Err(Error::io("pinning link", path, e));
        }
    }
    Ok(())
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn remove_links(dir: &Path, which: impl Fn(&str) -> bool) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("listing pinned links", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing pinned links", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if which(name.trim_start_matches("new-")) {
            sys::detach_pinned_link(&entry.path())?;
        }
    }
    Ok(())
}

enum Planned<'a> {
    Upsert(&'a ServiceSpec, Vec<Endpoint>),
    Remove(Frontend),
}

/// What a batch wrote, so it can be taken back if a later step fails.
#[derive(Default)]
struct Undo {
    slots: Vec<BackendSlot>,
    members: Vec<MemberKey>,
    services: Vec<(ServiceKey, Option<Service>)>,
    ids: Vec<u32>,
    sets: Vec<u32>,
    set_mirror: Vec<(u32, Option<Vec<Endpoint>>)>,
}

/// What a batch replaced: freed after the RCU barrier.
#[derive(Default)]
struct Retired {
    sets: Vec<(u32, u32)>,
    members: Vec<MemberKey>,
    ids: Vec<u32>,
    /// New "alive" endpoint lists (None: service removed).
    alive: Vec<(ServiceKey, Option<Vec<Endpoint>>)>,
    departed: Vec<reset::Departed>,
}

impl Tables {
    fn alloc_id(&mut self, lb: &LoadBalancer, what: &Frontend) -> Result<u32> {
        let id = match self.free_ids.pop() {
            Some(id) => id,
            None if self.next_id <= lb.opts.max_services => {
                self.next_id += 1;
                self.next_id - 1
            }
            None => {
                return Err(Error::MapFull {
                    map: maps::SERVICES,
                    capacity: lb.opts.max_services,
                    option: "max_services",
                    what: what.to_string(),
                });
            }
        };
        // Counters start from zero for a new service.
        let zero = PerCpuValues::try_from(vec![Counters::default(); lb.nr_cpus])
            .map_err(|e| Error::io("building counters", "COUNTERS", e))?;
        if let Err(e) = self.counters.set(id, zero, 0) {
            self.free_ids.push(id);
            return Err(Error::map_for(maps::COUNTERS, what, e));
        }
        Ok(id)
    }

    fn alloc_set(&mut self) -> u32 {
        loop {
            let s = self.next_set;
            self.next_set = self.next_set.wrapping_add(1).max(1);
            if self.used_sets.insert(s) {
                return s;
            }
        }
    }

    /// Writes new backend sets and members, then switches the services.
    /// Returns what the switched services no longer use.
    fn stage(
        &mut self,
        planned: &[Planned<'_>],
        undo: &mut Undo,
        lb: &LoadBalancer,
    ) -> Result<Retired> {
        let mut retired = Retired::default();
        let full = |map: &'static str, capacity: u32, option: &'static str, what: &Frontend| {
            Error::MapFull {
                map,
                capacity,
                option,
                what: what.to_string(),
            }
        };
        for p in planned {
            match p {
                Planned::Upsert(spec, eps) => {
                    let key = spec.frontend.key();
                    let old = self.known.get(&key).copied();
                    let id = match old {
                        Some(o) => o.id,
                        None => {
                            let id = self.alloc_id(lb, &spec.frontend)?;
                            undo.ids.push(id);
                            id
                        }
                    };
                    let set = if eps.is_empty() {
                        0
                    } else {
                        let s = self.alloc_set();
                        undo.sets.push(s);
                        s
                    };
                    for (index, ep) in eps.iter().enumerate() {
                        let slot = BackendSlot {
                            backend_set: set,
                            index: index as u32,
                        };
                        self.backends.insert(slot, ep, 0).map_err(|e| {
                            if is_full(&e) {
                                full(
                                    maps::BACKENDS,
                                    lb.opts.max_backends,
                                    "max_backends",
                                    &spec.frontend,
                                )
                            } else {
                                Error::map_for(maps::BACKENDS, &spec.frontend, e)
                            }
                        })?;
                        undo.slots.push(slot);
                    }
                    let old_eps = self.sets.get(&id).cloned().unwrap_or_default();
                    for ep in eps.iter().filter(|ep| !old_eps.contains(ep)) {
                        let m = MemberKey {
                            service_id: id,
                            backend: *ep,
                        };
                        self.members.insert(m, 1, 0).map_err(|e| {
                            if is_full(&e) {
                                full(
                                    maps::MEMBERS,
                                    lb.opts.max_backends,
                                    "max_backends",
                                    &spec.frontend,
                                )
                            } else {
                                Error::map_for(maps::MEMBERS, &spec.frontend, e)
                            }
                        })?;
                        undo.members.push(m);
                        // A member an earlier batch failed to remove is one
                        // again: not removed later. Only once it is in: a
                        // failed insert leaves it for the next batch to
                        // remove, as this batch's undo does not know it (and
                        // an undo that cannot remove it puts it back).
                        self.unlinked.retain(|k| *k != m);
                    }
                    let (flags, timeout) = match spec.affinity {
                        Some(t) => (SERVICE_F_AFFINITY, t.as_secs() as u32),
                        None => (0, 0),
                    };
                    let value = Service {
                        id,
                        backend_set: set,
                        count: eps.len() as u32,
                        flags: flags | if spec.meshed { SERVICE_F_MESHED } else { 0 },
                        affinity_timeout_s: timeout,
                        key_check: service_key_check(&key),
                    };
                    self.services.insert(key, value, 0).map_err(|e| {
                        if is_full(&e) {
                            full(
                                maps::SERVICES,
                                lb.opts.max_services,
                                "max_services",
                                &spec.frontend,
                            )
                        } else {
                            Error::map_for(maps::SERVICES, &spec.frontend, e)
                        }
                    })?;
                    undo.services.push((key, old));
                    self.known.insert(key, value);
                    let alive = spec.alive_endpoints();
                    if let Some(before) = self.alive.get(&key) {
                        retired.departed.extend(
                            before.iter().filter(|ep| !alive.contains(ep)).map(|ep| {
                                reset::Departed {
                                    frontend: key,
                                    backend: *ep,
                                }
                            }),
                        );
                    }
                    retired.alive.push((key, Some(alive)));
                    undo.set_mirror
                        .push((id, self.sets.insert(id, eps.clone())));
                    if let Some(o) = old {
                        if o.backend_set != 0 {
                            retired.sets.push((o.backend_set, o.count));
                        }
                        retired
                            .members
                            .extend(old_eps.iter().filter(|ep| !eps.contains(ep)).map(|ep| {
                                MemberKey {
                                    service_id: id,
                                    backend: *ep,
                                }
                            }));
                    }
                }
                Planned::Remove(fe) => {
                    let key = fe.key();
                    let Some(old) = self.known.get(&key).copied() else {
                        continue;
                    };
                    match self.services.remove(&key) {
                        Ok(()) => {}
                        Err(e) if is_not_found(&e) => {}
                        Err(e) => return Err(Error::map(maps::SERVICES, e)),
                    }
                    undo.services.push((key, Some(old)));
                    self.known.remove(&key);
                    let old_eps = self.sets.remove(&old.id).unwrap_or_default();
                    retired.members.extend(old_eps.iter().map(|ep| MemberKey {
                        service_id: old.id,
                        backend: *ep,
                    }));
                    undo.set_mirror.push((old.id, Some(old_eps)));
                    if old.backend_set != 0 {
                        retired.sets.push((old.backend_set, old.count));
                    }
                    retired.ids.push(old.id);
                    if let Some(before) = self.alive.get(&key) {
                        retired
                            .departed
                            .extend(before.iter().map(|ep| reset::Departed {
                                frontend: key,
                                backend: *ep,
                            }));
                    }
                    retired.alive.push((key, None));
                }
            }
        }
        // One batch may touch a frontend twice (removed from one Service and
        // given to another, say): what departed and which members go are
        // judged from the state before the batch against the state after it,
        // not step by step.
        let mut after: std::collections::HashMap<ServiceKey, Option<&Vec<Endpoint>>> =
            std::collections::HashMap::new();
        for (key, alive) in &retired.alive {
            after.insert(*key, alive.as_ref());
        }
        let mut seen = HashSet::new();
        retired.departed.retain(|d| {
            let stays = after
                .get(&d.frontend)
                .copied()
                .flatten()
                .is_some_and(|eps| eps.contains(&d.backend));
            !stays && seen.insert((d.frontend, d.backend))
        });
        let sets = &self.sets;
        retired.members.retain(|m| {
            !sets
                .get(&m.service_id)
                .is_some_and(|eps| eps.contains(&m.backend))
        });
        Ok(retired)
    }

    /// Backends that left a service stop matching session affinity; called
    /// before the barrier, so no choice made after it can pick them.
    /// Removes the `MEMBERS` entries of departed backends, and those an
    /// earlier batch failed to remove. Each is tried; one that fails is kept
    /// for the next batch. The first failure of this batch's own is
    /// returned (an earlier batch's, already reported, fails no other).
    fn unlink_members(&mut self, retired: &Retired) -> Result<()> {
        let mut first = None;
        let pending = std::mem::take(&mut self.unlinked);
        let earlier = pending.len();
        for (i, m) in pending.iter().chain(&retired.members).enumerate() {
            match self.members.remove(m) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    if !self.unlinked.contains(m) {
                        self.unlinked.push(*m);
                    }
                    if i >= earlier {
                        first.get_or_insert(Error::map(maps::MEMBERS, e));
                    }
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Frees what no program can see any more; returns the backends that
    /// left their services.
    fn retire(&mut self, mut retired: Retired) -> Vec<reset::Departed> {
        for (set, count) in std::mem::take(&mut retired.sets) {
            for index in 0..count {
                let _ = self.backends.remove(&BackendSlot {
                    backend_set: set,
                    index,
                });
            }
            self.used_sets.remove(&set);
        }
        self.free_ids.extend(std::mem::take(&mut retired.ids));
        self.retire_keeping_slots(retired)
    }

    /// [`retire`](Self::retire) without freeing the replaced slots and ids
    /// (programs may still read them): the bookkeeping of what is alive.
    fn retire_keeping_slots(&mut self, retired: Retired) -> Vec<reset::Departed> {
        for (key, alive) in retired.alive {
            match alive {
                Some(a) => self.alive.insert(key, a),
                None => self.alive.remove(&key),
            };
        }
        retired.departed
    }

    /// Takes back a batch that failed half-way.
    /// Rolls back the first half of a failed stage: services and backend
    /// sets as they were. [`release`](Self::release) then frees what the
    /// stage took, once no program can still see it.
    ///
    /// Returns the services whose undo failed (ENOMEM, say): the kernel
    /// keeps their staged entries, which `known` then mirrors, and nothing
    /// the stage took may be freed.
    fn restore(&mut self, undo: &mut Undo) -> Vec<String> {
        let mut failed = Vec::new();
        for (key, old) in std::mem::take(&mut undo.services).into_iter().rev() {
            let r = match old {
                Some(v) => self.services.insert(key, v, 0),
                None => match self.services.remove(&key) {
                    Err(e) if is_not_found(&e) => Ok(()),
                    r => r,
                },
            };
            match (r, old) {
                (Ok(()), Some(v)) => {
                    self.known.insert(key, v);
                }
                (Ok(()), None) => {
                    self.known.remove(&key);
                }
                (Err(e), _) => {
                    let fe = Frontend::from_key(&key)
                        .map_or_else(|| format!("{key:?}"), |f| f.to_string());
                    failed.push(format!("{fe}: {e}"));
                    match self.services.get(&key, 0) {
                        Ok(v) => self.known.insert(key, v),
                        Err(_) => self.known.remove(&key),
                    };
                }
            }
        }
        for (id, eps) in std::mem::take(&mut undo.set_mirror).into_iter().rev() {
            match eps {
                Some(eps) => self.sets.insert(id, eps),
                None => self.sets.remove(&id),
            };
        }
        failed
    }

    /// The second half of a rollback: members, slots and ids the failed
    /// stage took are freed.
    /// Removes the members a failed batch added that the service's set does
    /// not hold; one whose removal fails joins those the next batch retries.
    fn unlink_undone_members(&mut self, members: Vec<MemberKey>) {
        for m in members {
            let still = self
                .sets
                .get(&m.service_id)
                .is_some_and(|eps| eps.contains(&m.backend));
            if still {
                continue;
            }
            match self.members.remove(&m) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(_) => {
                    if !self.unlinked.contains(&m) {
                        self.unlinked.push(m);
                    }
                }
            }
        }
    }

    fn release(&mut self, undo: Undo) {
        for slot in undo.slots {
            let _ = self.backends.remove(&slot);
        }
        for s in undo.sets {
            self.used_sets.remove(&s);
        }
        self.free_ids.extend(undo.ids);
    }

    fn current_config(&self) -> Result<LbConfig> {
        self.config
            .get(&0, 0)
            .map_err(|e| Error::map(maps::CONFIG, e))
    }

    fn write_flags(&mut self, strict_allows_node: bool) -> Result<()> {
        let mut cfg = self.current_config()?;
        cfg.flags = if strict_allows_node {
            cfg.flags | CONFIG_F_STRICT_ALLOWS_NODE
        } else {
            cfg.flags & !CONFIG_F_STRICT_ALLOWS_NODE
        };
        self.config
            .set(0, cfg, 0)
            .map_err(|e| Error::map(maps::CONFIG, e))
    }

    fn write_levels(&mut self) -> Result<()> {
        let levels: BTreeSet<u32> = self.enrolled_ids.values().copied().collect();
        let mut cfg = self.current_config()?;
        cfg.enrol_levels = [0; MAX_ENROL_LEVELS];
        cfg.enrol_level_count = levels.len().min(MAX_ENROL_LEVELS) as u32;
        for (slot, level) in cfg.enrol_levels.iter_mut().zip(levels) {
            *slot = level;
        }
        self.config
            .set(0, cfg, 0)
            .map_err(|e| Error::map(maps::CONFIG, e))
    }
}
