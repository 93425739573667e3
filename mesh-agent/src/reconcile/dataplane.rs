//! The kernel side the reconciler programs, behind a trait so the reconciler
//! can be tested without root against [`MemoryDataplane`].

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Mutex,
};

use std::net::{IpAddr, SocketAddr};

use ebpf_lb::{
    ApplyReport, Change, Frontend, LoadBalancer, MtlsMode, ProxyTarget, ServiceCounters,
    ServiceSpec, ServiceState,
};

/// What the agent needs from ebpf-lb.
pub trait Dataplane: Send + Sync {
    /// Applies a batch atomically per service (all or nothing); sockets of
    /// backends that left are reset.
    fn apply(&self, changes: &[Change]) -> Result<ApplyReport, ebpf_lb::Error>;
    /// Enrols a cgroup; returns its id.
    fn enroll(&self, cgroup: &Path) -> Result<u64, ebpf_lb::Error>;
    fn unenroll(&self, id: u64) -> Result<(), ebpf_lb::Error>;
    fn set_proxy(&self, target: Option<ProxyTarget>) -> Result<(), ebpf_lb::Error>;
    /// What the kernel holds (including what an earlier agent left pinned).
    fn services(&self) -> Vec<ServiceState>;
    fn enrolled(&self) -> Vec<u64>;
    fn counters(&self, frontend: &Frontend) -> Option<ServiceCounters>;
    /// The mTLS mode of a local workload (`None`: no policy).
    fn set_workload_mode(&self, ip: IpAddr, mode: Option<MtlsMode>) -> Result<(), ebpf_lb::Error>;
    /// Puts the STRICT guard on a pod's host-side interface.
    fn guard_interface(&self, ifname: &str) -> Result<(), ebpf_lb::Error>;
    fn unguard_interface(&self, ifname: &str) -> Result<(), ebpf_lb::Error>;
    /// The mTLS modes the kernel holds, an earlier agent's included.
    fn workload_modes(&self) -> Vec<(IpAddr, MtlsMode)>;
    /// The interfaces (name, index) a STRICT guard is pinned on, an earlier
    /// agent's included.
    fn guarded_interfaces(&self) -> Vec<(String, u32)>;
    /// The index of an interface now (a pod recreated with the same veth
    /// name has a new one, and needs the guard again).
    fn interface_index(&self, ifname: &str) -> Option<u32>;
    /// Plaintext connection attempts to a STRICT workload refused.
    fn refusals(&self, ip: IpAddr) -> u64;
    /// Where a connection the kernel redirected to the proxy was going, from
    /// the accepted socket's peer (client) and local (capture) addresses.
    fn original_destination(&self, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr>;
    /// The meshed pods' addresses: enrolled workloads' connections straight
    /// to them go to the proxy.
    fn set_meshed_pods(&self, pods: &BTreeSet<IpAddr>) -> Result<(), ebpf_lb::Error>;
    /// The meshed pods' addresses the kernel holds, an earlier agent's
    /// included.
    fn meshed_pods(&self) -> BTreeSet<IpAddr>;
}

impl Dataplane for LoadBalancer {
    fn apply(&self, changes: &[Change]) -> Result<ApplyReport, ebpf_lb::Error> {
        LoadBalancer::apply(self, changes)
    }
    fn set_meshed_pods(&self, pods: &BTreeSet<IpAddr>) -> Result<(), ebpf_lb::Error> {
        LoadBalancer::set_meshed_pods(self, pods)
    }
    fn meshed_pods(&self) -> BTreeSet<IpAddr> {
        LoadBalancer::meshed_pods(self)
    }

    fn enroll(&self, cgroup: &Path) -> Result<u64, ebpf_lb::Error> {
        let id = ebpf_lb::cgroup_id(cgroup)?;
        LoadBalancer::enroll(self, cgroup)?;
        Ok(id)
    }

    fn unenroll(&self, id: u64) -> Result<(), ebpf_lb::Error> {
        LoadBalancer::unenroll(self, id)
    }

    fn set_proxy(&self, target: Option<ProxyTarget>) -> Result<(), ebpf_lb::Error> {
        LoadBalancer::set_proxy(self, target)
    }

    fn services(&self) -> Vec<ServiceState> {
        LoadBalancer::services(self)
    }

    fn enrolled(&self) -> Vec<u64> {
        LoadBalancer::enrolled(self)
    }

    fn counters(&self, frontend: &Frontend) -> Option<ServiceCounters> {
        LoadBalancer::counters(self, frontend).ok()
    }

    fn set_workload_mode(&self, ip: IpAddr, mode: Option<MtlsMode>) -> Result<(), ebpf_lb::Error> {
        LoadBalancer::set_workload_mode(self, ip, mode)
    }

    fn guard_interface(&self, ifname: &str) -> Result<(), ebpf_lb::Error> {
        LoadBalancer::guard_interface(self, ifname)
    }

    fn unguard_interface(&self, ifname: &str) -> Result<(), ebpf_lb::Error> {
        LoadBalancer::unguard_interface(self, ifname)
    }

    fn workload_modes(&self) -> Vec<(IpAddr, MtlsMode)> {
        LoadBalancer::workload_modes(self)
    }

    fn guarded_interfaces(&self) -> Vec<(String, u32)> {
        LoadBalancer::guarded_interfaces(self)
    }

    fn interface_index(&self, ifname: &str) -> Option<u32> {
        ebpf_lb::interface_index(ifname)
    }

    fn refusals(&self, ip: IpAddr) -> u64 {
        LoadBalancer::refusals(self, ip).unwrap_or(0)
    }

    fn original_destination(&self, peer: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
        match LoadBalancer::original_destination(self, peer, local) {
            Ok(o) => o.map(|o| o.dst),
            Err(e) => {
                tracing::warn!(%peer, error = %e, "original destination lookup");
                None
            }
        }
    }
}

/// An in-memory dataplane with the same batch semantics, recording every
/// call: for tests of the reconciler, and for `mesh-agent run --dataplane
/// none` (no kernel programs, e.g. to check a configuration).
#[derive(Debug, Default)]
pub struct MemoryDataplane {
    inner: Mutex<Memory>,
}

#[derive(Debug, Default)]
struct Memory {
    /// Mode changes fail, as a full WORKLOADS map would make them.
    failing_modes: bool,
    services: BTreeMap<Frontend, ServiceSpec>,
    enrolled: BTreeMap<u64, std::path::PathBuf>,
    proxy: Option<ProxyTarget>,
    modes: BTreeMap<IpAddr, MtlsMode>,
    guarded: BTreeSet<String>,
    /// Interface indexes other than 1 (a veth recreated under its name).
    indexes: BTreeMap<String, u32>,
    original: BTreeMap<SocketAddr, SocketAddr>,
    meshed_pods: BTreeSet<IpAddr>,
    batches: Vec<Vec<Change>>,
    /// Frontends whose upsert fails (to test error handling).
    failing: BTreeSet<Frontend>,
    next_id: u64,
}

impl MemoryDataplane {
    pub fn new() -> Self {
        Self::default()
    }

    /// Meshed pods' addresses an earlier agent left.
    pub fn preload_meshed_pods(&self, pods: &[IpAddr]) {
        self.lock().meshed_pods.extend(pods.iter().copied());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every batch applied so far (successful or not), in order.
    pub fn batches(&self) -> Vec<Vec<Change>> {
        self.lock().batches.clone()
    }

    pub fn clear_batches(&self) {
        self.lock().batches.clear();
    }

    pub fn spec(&self, fe: &Frontend) -> Option<ServiceSpec> {
        self.lock().services.get(fe).cloned()
    }

    pub fn enrolled_paths(&self) -> Vec<std::path::PathBuf> {
        self.lock().enrolled.values().cloned().collect()
    }

    pub fn proxy(&self) -> Option<ProxyTarget> {
        self.lock().proxy
    }

    pub fn modes(&self) -> BTreeMap<IpAddr, MtlsMode> {
        self.lock().modes.clone()
    }

    pub fn guarded(&self) -> BTreeSet<String> {
        self.lock().guarded.clone()
    }

    /// Gives `ifname` a new index, as a veth recreated under the same name
    /// gets; a guard on the old one is gone with it.
    pub fn recreate_interface(&self, ifname: &str, index: u32) {
        let mut m = self.lock();
        m.indexes.insert(ifname.into(), index);
        m.guarded.remove(ifname);
    }

    /// Makes changes of `fe` fail: upserts as a full map would, removals as
    /// a failing map operation.
    pub fn fail_changes_of(&self, fe: Frontend) {
        self.lock().failing.insert(fe);
    }

    /// Records where a client's redirected connection was going, as the
    /// kernel's sockops program would.
    pub fn set_original_destination(&self, peer: SocketAddr, dst: SocketAddr) {
        self.lock().original.insert(peer, dst);
    }

    pub fn clear_failures(&self) {
        let mut m = self.lock();
        m.failing.clear();
        m.failing_modes = false;
    }

    /// Makes every mTLS mode change fail.
    pub fn fail_mode_changes(&self) {
        self.lock().failing_modes = true;
    }

    /// Leaves a service behind as a previous agent run would have.
    pub fn preload(&self, spec: ServiceSpec) {
        self.lock().services.insert(spec.frontend, spec);
    }
}

impl Dataplane for MemoryDataplane {
    fn set_meshed_pods(&self, pods: &BTreeSet<IpAddr>) -> Result<(), ebpf_lb::Error> {
        self.lock().meshed_pods = pods.clone();
        Ok(())
    }
    fn meshed_pods(&self) -> BTreeSet<IpAddr> {
        self.lock().meshed_pods.clone()
    }
    fn apply(&self, changes: &[Change]) -> Result<ApplyReport, ebpf_lb::Error> {
        let mut m = self.lock();
        m.batches.push(changes.to_vec());
        for c in changes {
            let fe = match c {
                Change::Upsert(s) => &s.frontend,
                Change::Remove(fe) => fe,
            };
            if m.failing.contains(fe) {
                return Err(ebpf_lb::Error::MapFull {
                    map: "SERVICES",
                    capacity: 0,
                    option: "max_services",
                    what: fe.to_string(),
                });
            }
        }
        for c in changes {
            match c {
                Change::Upsert(s) => {
                    m.services.insert(s.frontend, s.clone());
                }
                Change::Remove(fe) => {
                    m.services.remove(fe);
                }
            }
        }
        Ok(ApplyReport::default())
    }

    fn enroll(&self, cgroup: &Path) -> Result<u64, ebpf_lb::Error> {
        let mut m = self.lock();
        if let Some((id, _)) = m.enrolled.iter().find(|(_, p)| p.as_path() == cgroup) {
            return Ok(*id);
        }
        m.next_id += 1;
        let id = m.next_id;
        m.enrolled.insert(id, cgroup.into());
        Ok(id)
    }

    fn unenroll(&self, id: u64) -> Result<(), ebpf_lb::Error> {
        self.lock().enrolled.remove(&id);
        Ok(())
    }

    fn set_proxy(&self, target: Option<ProxyTarget>) -> Result<(), ebpf_lb::Error> {
        self.lock().proxy = target;
        Ok(())
    }

    fn services(&self) -> Vec<ServiceState> {
        self.lock()
            .services
            .values()
            .map(|s| ServiceState {
                frontend: s.frontend,
                backends: s
                    .backends
                    .iter()
                    .filter(|b| b.state == ebpf_lb::BackendState::Ready)
                    .map(|b| b.addr)
                    .collect(),
                meshed: s.meshed,
                affinity: s.affinity,
            })
            .collect()
    }

    fn enrolled(&self) -> Vec<u64> {
        self.lock().enrolled.keys().copied().collect()
    }

    fn counters(&self, frontend: &Frontend) -> Option<ServiceCounters> {
        self.lock()
            .services
            .contains_key(frontend)
            .then(ServiceCounters::default)
    }

    fn set_workload_mode(&self, ip: IpAddr, mode: Option<MtlsMode>) -> Result<(), ebpf_lb::Error> {
        let mut m = self.lock();
        if m.failing_modes {
            return Err(ebpf_lb::Error::MapFull {
                map: "WORKLOADS",
                capacity: 0,
                option: "max_workloads",
                what: format!("the mode of {ip}"),
            });
        }
        match mode {
            Some(mode) => m.modes.insert(ip, mode),
            None => m.modes.remove(&ip),
        };
        Ok(())
    }

    fn guard_interface(&self, ifname: &str) -> Result<(), ebpf_lb::Error> {
        self.lock().guarded.insert(ifname.into());
        Ok(())
    }

    fn unguard_interface(&self, ifname: &str) -> Result<(), ebpf_lb::Error> {
        self.lock().guarded.remove(ifname);
        Ok(())
    }

    fn workload_modes(&self) -> Vec<(IpAddr, MtlsMode)> {
        self.lock().modes.iter().map(|(ip, m)| (*ip, *m)).collect()
    }

    fn guarded_interfaces(&self) -> Vec<(String, u32)> {
        let m = self.lock();
        m.guarded
            .iter()
            .map(|n| (n.clone(), m.indexes.get(n).copied().unwrap_or(1)))
            .collect()
    }

    fn interface_index(&self, ifname: &str) -> Option<u32> {
        Some(self.lock().indexes.get(ifname).copied().unwrap_or(1))
    }

    fn refusals(&self, _ip: IpAddr) -> u64 {
        0
    }

    fn original_destination(&self, peer: SocketAddr, _local: SocketAddr) -> Option<SocketAddr> {
        self.lock().original.get(&peer).copied()
    }
}
