//! Kernel enforcement of STRICT mTLS (user side): which workloads are
//! STRICT, which veths carry the guard program, and how many plaintext
//! connection attempts were refused.

use std::{fs, io, net::IpAddr};

use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, LinkError, PinnedLink},
    tc::TcAttachOptions,
};
use ebpf_lb_common::{
    MODE_DISABLED, MODE_PERMISSIVE, MODE_STRICT, WorkloadKey, WorkloadPolicy, maps,
};

use crate::{Error, LoadBalancer, Result, is_full, is_not_found, service::endpoint};

pub(crate) const STRICT_PROGRAM: &str = "sluice_strict";

/// mTLS mode of a workload, as a `MeshPolicy` sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    /// Plaintext to the workload is refused: only the node proxy may connect.
    Strict,
    /// Plaintext and mTLS are both accepted.
    Permissive,
    /// No mTLS.
    Disabled,
}

impl MtlsMode {
    fn code(self) -> u32 {
        match self {
            MtlsMode::Strict => MODE_STRICT,
            MtlsMode::Permissive => MODE_PERMISSIVE,
            MtlsMode::Disabled => MODE_DISABLED,
        }
    }

    fn from_code(code: u32) -> Option<MtlsMode> {
        [MtlsMode::Strict, MtlsMode::Permissive, MtlsMode::Disabled]
            .into_iter()
            .find(|m| m.code() == code)
    }
}

pub(crate) fn workload_key(ip: IpAddr) -> WorkloadKey {
    let ep = endpoint(std::net::SocketAddr::new(ip, 0));
    WorkloadKey {
        addr: ep.addr,
        family: ep.family,
        _pad: [0; 3],
    }
}

/// The index of interface `name` now, if there is one.
pub fn interface_index(name: &str) -> Option<u32> {
    ifindex(name).ok()
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| Error::Cgroup {
        path: name.into(),
        reason: "interface name contains NUL".into(),
    })?;
    // SAFETY: c is a valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(Error::io(
            "looking up interface",
            name,
            io::Error::last_os_error(),
        ));
    }
    Ok(idx)
}

impl LoadBalancer {
    /// Puts the STRICT guard on the host side of a workload's veth
    /// (`ifname`, in the caller's network namespace): from then on, TCP
    /// connection attempts to STRICT workloads behind it that do not come from
    /// the node proxy are answered with a reset. Needs Linux 6.6 (TCX links);
    /// the link is pinned, and attaching again replaces the program atomically.
    pub fn guard_interface(&self, ifname: &str) -> Result<()> {
        let idx = ifindex(ifname)?;
        let pin = self.links_dir().join(format!("tc-{idx}"));
        let mut t = self.tables();
        let prog: &mut SchedClassifier = crate::program(&mut t.ebpf, STRICT_PROGRAM)?;
        // Re-using the pinned link replaces the program atomically; a pin
        // whose link died with an earlier interface of the same index is
        // dropped and the guard attached afresh.
        let reused = PinnedLink::from_pin(&pin).ok().and_then(|old| {
            let old: aya::programs::tc::SchedClassifierLink = FdLink::from(old).try_into().ok()?;
            prog.attach_to_link(old).ok()
        });
        let link_id = match reused {
            Some(id) => id,
            None => {
                let _ = fs::remove_file(&pin);
                prog.attach_with_options(
                    ifname,
                    TcAttachType::Egress,
                    // First: a program before it that passed a packet
                    // (TCX_PASS ends the chain) would let plaintext past
                    // STRICT; the guard's own "next" lets the others see
                    // all it does not refuse.
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(|e| Error::program(STRICT_PROGRAM, e))?
            }
        };
        let link = prog
            .take_link(link_id)
            .map_err(|e| Error::program(STRICT_PROGRAM, e))?;
        let link: FdLink = link.try_into().map_err(|e: LinkError| {
            Error::io("pinning link", &pin, io::Error::other(e.to_string()))
        })?;
        let _ = fs::remove_file(&pin);
        link.pin(&pin)
            .map_err(|e| Error::io("pinning link", &pin, io::Error::other(e.to_string())))?;
        // An interface recreated under the same name (a pod come back with
        // its veth's name) left the old one's pin: its link died with it.
        if let Some(old) = t.guarded.insert(ifname.to_string(), idx)
            && old != idx
        {
            let _ = crate::sys::detach_pinned_link(&self.links_dir().join(format!("tc-{old}")));
        }
        Ok(())
    }

    /// The mTLS modes the kernel holds, an earlier agent's included (the map
    /// is pinned): a new agent compares them with what it wants.
    pub fn workload_modes(&self) -> Vec<(IpAddr, MtlsMode)> {
        let t = self.tables();
        t.workloads
            .iter()
            .filter_map(|e| e.ok())
            .filter_map(|(k, v)| {
                let ep = ebpf_lb_common::Endpoint {
                    addr: k.addr,
                    port: 0,
                    family: k.family,
                    _pad: 0,
                };
                let ip = crate::service::socket_addr(&ep)?.ip();
                Some((ip, MtlsMode::from_code(v.mode)?))
            })
            .collect()
    }

    /// The interfaces (name, index) the STRICT guard is pinned on, an
    /// earlier agent's included. The pins of interfaces that are gone (their
    /// pods with them) are removed on the way.
    pub fn guarded_interfaces(&self) -> Vec<(String, u32)> {
        let dir = self.links_dir();
        let Ok(entries) = fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(idx) = name
                .to_str()
                .and_then(|n| n.strip_prefix("tc-"))
                .and_then(|i| i.parse::<u32>().ok())
            else {
                continue;
            };
            let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
            // SAFETY: the buffer holds IF_NAMESIZE bytes, as the call needs.
            let named = unsafe { libc::if_indextoname(idx, buf.as_mut_ptr()) };
            if named.is_null() {
                let _ = crate::sys::detach_pinned_link(&e.path());
                continue;
            }
            // SAFETY: if_indextoname wrote a NUL-terminated name.
            let ifname = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
            out.push((ifname.to_string_lossy().into_owned(), idx));
        }
        out.sort();
        // Known by name from now on: unguarding one whose interface goes
        // before then still finds its pin by the index.
        let mut t = self.tables();
        for (name, idx) in &out {
            t.guarded.entry(name.clone()).or_insert(*idx);
        }
        out
    }

    /// Removes the STRICT guard from `ifname`, and its pinned link; also when
    /// the interface is gone (a deleted pod's veth), by the index it had.
    pub fn unguard_interface(&self, ifname: &str) -> Result<()> {
        let mut t = self.tables();
        let idx = match ifindex(ifname) {
            Ok(idx) => idx,
            Err(e) => match t.guarded.get(ifname) {
                Some(idx) => *idx,
                None => return Err(e),
            },
        };
        crate::sys::detach_pinned_link(&self.links_dir().join(format!("tc-{idx}")))?;
        t.guarded.remove(ifname);
        Ok(())
    }

    /// Sets the mTLS mode of the workload at `ip` (`None`: no policy, which
    /// the kernel treats like PERMISSIVE). Takes effect for the next
    /// connection attempt; existing connections are left alone.
    pub fn set_workload_mode(&self, ip: IpAddr, mode: Option<MtlsMode>) -> Result<()> {
        let key = workload_key(ip);
        let mut t = self.tables();
        match mode {
            Some(m) => {
                // The refusal counter exists before the first refusal.
                if t.refusals.get(&key, 0).is_err() {
                    let zero = aya::maps::PerCpuValues::try_from(vec![0u64; self.nr_cpus])
                        .map_err(|e| Error::io("building counters", "REFUSALS", e))?;
                    t.refusals
                        .insert(key, zero, 0)
                        .map_err(|e| self.map_full(maps::REFUSALS, e, ip))?;
                }
                let r = t.workloads.insert(
                    key,
                    WorkloadPolicy {
                        mode: m.code(),
                        _pad: 0,
                    },
                    0,
                );
                if let Err(e) = r {
                    // No policy, no counter: the two maps stay in step.
                    if t.workloads.get(&key, 0).is_err() {
                        let _ = t.refusals.remove(&key);
                    }
                    return Err(self.map_full(maps::WORKLOADS, e, ip));
                }
                Ok(())
            }
            None => {
                for (map, r) in [
                    (maps::WORKLOADS, t.workloads.remove(&key)),
                    (maps::REFUSALS, t.refusals.remove(&key)),
                ] {
                    match r {
                        Ok(()) => {}
                        Err(e) if is_not_found(&e) => {}
                        Err(e) => return Err(Error::map(map, e)),
                    }
                }
                Ok(())
            }
        }
    }

    /// Plaintext connection attempts to the workload at `ip` refused so far.
    pub fn refusals(&self, ip: IpAddr) -> Result<u64> {
        let t = self.tables();
        match t.refusals.get(&workload_key(ip), 0) {
            Ok(v) => Ok(v.iter().sum()),
            Err(e) if is_not_found(&e) => Ok(0),
            Err(e) => Err(Error::map(maps::REFUSALS, e)),
        }
    }

    /// An error writing workload `ip` into `map` (WORKLOADS or REFUSALS,
    /// both sized by `max_workloads`).
    fn map_full(&self, map: &'static str, e: aya::maps::MapError, ip: IpAddr) -> Error {
        if is_full(&e) {
            Error::MapFull {
                map,
                capacity: self.opts.max_workloads,
                option: "max_workloads",
                what: format!("workload {ip}"),
            }
        } else {
            Error::map(map, e)
        }
    }
}
