//! Resetting the sockets pinned to a backend that left its service.
//!
//! Socket-level load balancing picks a backend once, at connect time, so a
//! long-lived TCP connection or a connected UDP socket keeps talking to a
//! backend that is gone (the DNS-to-dead-CoreDNS problem). When a backend
//! leaves a service, every socket in the attached cgroup trees that the load
//! balancer connected to it, for that service, is destroyed with sock_diag
//! `SOCK_DESTROY` in its network namespace: the application gets an error at
//! once and its next connect or query goes to a live backend.
//!
//! "That the load balancer connected": the socket's cookie and peer are in
//! `REVNAT` with that service's VIP as the value. Sockets that reached the
//! backend's address directly, or through another service, are left alone.

use std::{
    collections::{BTreeMap, HashSet},
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, MapData};
use ebpf_lb_common::{Endpoint, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, RevNatKey, ServiceKey};

use crate::{Error, Result};

/// A backend that left a service: sockets the load balancer connected to
/// `backend` for `frontend` are to be reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Departed {
    pub frontend: ServiceKey,
    pub backend: Endpoint,
}

/// How many sockets a reset pass destroyed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResetReport {
    /// Network namespaces searched.
    pub namespaces: usize,
    /// Sockets destroyed.
    pub destroyed: usize,
    /// Network namespaces that could not be searched, and why. The update
    /// itself is in force; the sockets there stay until their next send
    /// fails or they are closed.
    pub failed: Vec<String>,
}

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u32 = 10;
const TCP_TIME_WAIT: u32 = 6;
const TCP_CLOSE: u32 = 7;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagReq {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

#[repr(C)]
struct Request {
    hdr: NlMsgHdr,
    req: DiagReq,
}

fn syscall_err(call: &'static str) -> Error {
    Error::Syscall {
        call,
        source: io::Error::last_os_error(),
    }
}

/// A NETLINK_SOCK_DIAG socket in the calling thread's network namespace.
struct Diag {
    fd: OwnedFd,
    seq: u32,
}

impl Diag {
    fn open() -> Result<Self> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(syscall_err("socket(NETLINK_SOCK_DIAG)"));
        }
        // SAFETY: fd is a new descriptor we own.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: 0,
        })
    }

    fn send(&mut self, ty: u16, flags: u16, req: DiagReq) -> Result<u32> {
        self.seq += 1;
        let msg = Request {
            hdr: NlMsgHdr {
                len: size_of::<Request>() as u32,
                ty,
                flags: flags | libc::NLM_F_REQUEST as u16,
                seq: self.seq,
                pid: 0,
            },
            req,
        };
        // SAFETY: msg is a live, fully initialised value of the given size.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                (&raw const msg).cast(),
                size_of::<Request>(),
                0,
            )
        };
        if n < 0 {
            return Err(syscall_err("send(sock_diag)"));
        }
        Ok(self.seq)
    }

    /// Reads replies to `seq` until DONE (dumps) or the first ACK/error.
    fn recv(&mut self, seq: u32, mut each: impl FnMut(&DiagMsg)) -> Result<i32> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is writable for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(syscall_err("recv(sock_diag)"));
            }
            let mut off = 0usize;
            let n = n as usize;
            while off + size_of::<NlMsgHdr>() <= n {
                // SAFETY: bounds checked above; read_unaligned tolerates any alignment.
                let hdr: NlMsgHdr = unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                let len = hdr.len as usize;
                if len < size_of::<NlMsgHdr>() || off + len > n {
                    return Err(Error::Syscall {
                        call: "sock_diag",
                        source: io::Error::new(
                            io::ErrorKind::InvalidData,
                            "truncated netlink message",
                        ),
                    });
                }
                let payload = &buf[off + size_of::<NlMsgHdr>()..off + len];
                if hdr.seq == seq {
                    match hdr.ty {
                        NLMSG_DONE => return Ok(0),
                        NLMSG_ERROR => {
                            let code =
                                i32::from_ne_bytes(payload[..4].try_into().expect("4 bytes"));
                            return Ok(code);
                        }
                        SOCK_DIAG_BY_FAMILY if payload.len() >= size_of::<DiagMsg>() => {
                            // SAFETY: length checked; unaligned read.
                            let m: DiagMsg =
                                unsafe { std::ptr::read_unaligned(payload.as_ptr().cast()) };
                            each(&m);
                        }
                        _ => {}
                    }
                }
                off += (len + 3) & !3;
            }
        }
    }

    fn dump(&mut self, family: u8, protocol: u8, states: u32) -> Result<Vec<DiagMsg>> {
        let req = DiagReq {
            family,
            protocol,
            states,
            ..Default::default()
        };
        let seq = self.send(SOCK_DIAG_BY_FAMILY, libc::NLM_F_DUMP as u16, req)?;
        let mut out = Vec::new();
        let code = self.recv(seq, |m| out.push(*m))?;
        if code < 0 {
            return Err(Error::Syscall {
                call: "sock_diag dump",
                source: io::Error::from_raw_os_error(-code),
            });
        }
        Ok(out)
    }

    /// Destroys one socket. A socket that is already gone is not an error.
    fn destroy(&mut self, protocol: u8, m: &DiagMsg) -> Result<bool> {
        let req = DiagReq {
            family: m.family,
            protocol,
            states: !0,
            id: m.id,
            ..Default::default()
        };
        let seq = self.send(SOCK_DESTROY, libc::NLM_F_ACK as u16, req)?;
        match self.recv(seq, |_| {})? {
            0 => Ok(true),
            c if -c == libc::ENOENT => Ok(false),
            c => Err(Error::Syscall {
                call: "SOCK_DESTROY (needs CONFIG_INET_DIAG_DESTROY and CAP_NET_ADMIN)",
                source: io::Error::from_raw_os_error(-c),
            }),
        }
    }
}

/// The processes of `roots` (cgroup directories, searched recursively) by
/// the network namespace they use.
#[derive(Debug, Default)]
struct Namespaces {
    by_ns: BTreeMap<(u64, u64), Vec<u32>>,
    /// Processes `cgroup.procs` lists as 0: in another PID namespace than
    /// this process's (an agent container without the host's PID namespace).
    invisible: usize,
    /// Processes whose network namespace could not be opened, and the
    /// first such error (permission: CAP_SYS_PTRACE for other users').
    unopened: usize,
    first_error: Option<String>,
}

impl Namespaces {
    /// What keeps sockets there from being reset, to report with the rest.
    fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.invisible > 0 {
            out.push(format!(
                "{} processes of the attached cgroups that live in another PID namespace \
                 (cgroup.procs lists them as 0): run the agent in the host's PID namespace \
                 (hostPID)",
                self.invisible
            ));
        }
        if let Some(e) = &self.first_error {
            out.push(format!(
                "{} processes of the attached cgroups whose network namespace could not be \
                 opened ({e}; other users' need CAP_SYS_PTRACE)",
                self.unopened
            ));
        }
        out
    }
}

fn namespaces(roots: &[PathBuf]) -> Namespaces {
    fn walk(dir: &Path, out: &mut Namespaces, seen: &mut HashSet<PathBuf>) {
        if !seen.insert(dir.to_path_buf()) {
            return;
        }
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                if pid == 0 {
                    out.invisible += 1;
                    continue;
                }
                let path = format!("/proc/{pid}/ns/net");
                match fs::metadata(&path) {
                    Ok(m) => out.by_ns.entry((m.dev(), m.ino())).or_default().push(pid),
                    // It exited meanwhile.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        out.unopened += 1;
                        out.first_error
                            .get_or_insert_with(|| format!("{path}: {e}"));
                    }
                }
            }
        }
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&e.path(), out, seen);
                }
            }
        }
    }
    let mut out = Namespaces::default();
    let mut seen = HashSet::new();
    for r in roots {
        walk(r, &mut out, &mut seen);
    }
    out
}

/// Runs `f` on a thread inside the network namespace of `pid`.
fn in_netns_of<T: Send>(pid: u32, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/proc/{pid}/ns/net");
    let ns = fs::File::open(&path).map_err(|e| Error::io("opening network namespace", &path, e))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns on this thread only, with a valid namespace fd.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(syscall_err("setns(CLONE_NEWNET)"));
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(Error::Syscall {
                call: "sock_diag thread",
                source: io::Error::other("panicked"),
            })
        })
    })
}

/// The peer address of a diag message in `Endpoint` form, and whether it is
/// an IPv4-mapped address on an IPv6 socket.
fn peer_of(m: &DiagMsg) -> Endpoint {
    if m.family == libc::AF_INET as u8 {
        Endpoint {
            addr: [m.id.dst[0], 0, 0, 0],
            port: m.id.dport,
            family: FAMILY_V4,
            _pad: 0,
        }
    } else {
        Endpoint {
            addr: m.id.dst,
            port: m.id.dport,
            family: FAMILY_V6,
            _pad: 0,
        }
    }
}

/// Folds `::ffff:a.b.c.d` to IPv4, so a dual-stack socket matches an IPv4
/// backend.
fn fold(ep: Endpoint) -> Endpoint {
    if ep.family == FAMILY_V6
        && ep.addr[0] == 0
        && ep.addr[1] == 0
        && ep.addr[2] == 0xffff_u32.to_be()
    {
        Endpoint {
            addr: [ep.addr[3], 0, 0, 0],
            port: ep.port,
            family: FAMILY_V4,
            _pad: 0,
        }
    } else {
        ep
    }
}

/// Destroys the sockets pinned to departed backends, in every network
/// namespace used by processes of `roots`.
pub(crate) fn reset(
    roots: &[PathBuf],
    revnat: &HashMap<MapData, RevNatKey, Endpoint>,
    departed: &[Departed],
) -> Result<ResetReport> {
    let mut report = ResetReport::default();
    if departed.is_empty() {
        return Ok(report);
    }
    let nss = namespaces(roots);
    report.namespaces = nss.by_ns.len();
    report.failed.extend(nss.problems());
    for ((dev, ino), pids) in &nss.by_ns {
        // Any process of the namespace will do; one may exit meanwhile (a
        // probe, a terminating pod), and one namespace's failure must not
        // keep the others' sockets pinned.
        let mut last = None;
        for pid in pids {
            match in_netns_of(*pid, || reset_here(revnat, departed)) {
                Ok(n) => {
                    report.destroyed += n;
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            report.failed.push(format!(
                "network namespace {dev}:{ino} (pids {pids:?}): {e}"
            ));
        }
    }
    Ok(report)
}

fn reset_here(
    revnat: &HashMap<MapData, RevNatKey, Endpoint>,
    departed: &[Departed],
) -> Result<usize> {
    let mut diag = Diag::open()?;
    let mut destroyed = 0;
    for proto in [PROTO_TCP, PROTO_UDP] {
        if !departed.iter().any(|d| d.frontend.proto == proto) {
            continue;
        }
        let states = if proto == PROTO_TCP {
            !((1 << TCP_LISTEN) | (1 << TCP_TIME_WAIT) | (1 << TCP_CLOSE))
        } else {
            !0
        };
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            for m in diag.dump(family, proto, states)? {
                let peer = peer_of(&m);
                let folded = fold(peer);
                let cookie = u64::from(m.id.cookie[0]) | (u64::from(m.id.cookie[1]) << 32);
                if !departed
                    .iter()
                    .any(|d| d.frontend.proto == proto && d.backend == folded)
                {
                    continue;
                }
                // Only sockets this load balancer translated, for that service.
                let key = RevNatKey::new(cookie, peer);
                let Ok(vip) = revnat.get(&key, 0) else {
                    continue;
                };
                let vip = fold(vip);
                let ours = departed.iter().any(|d| {
                    d.frontend.proto == proto
                        && d.backend == folded
                        && d.frontend.addr == vip.addr
                        && d.frontend.port == vip.port
                        && d.frontend.family == vip.family
                });
                if !ours {
                    continue;
                }
                if diag.destroy(proto, &m)? {
                    destroyed += 1;
                }
            }
        }
    }
    Ok(destroyed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processes_of_another_pid_namespace_are_reported_not_skipped() {
        let root = tempfile::tempdir().unwrap();
        let me = std::process::id();
        // Two processes this one cannot see (listed as 0), and itself.
        fs::write(root.path().join("cgroup.procs"), format!("0\n0\n{me}\n")).unwrap();
        // A child cgroup whose process exited meanwhile: not a problem.
        fs::create_dir(root.path().join("pod")).unwrap();
        fs::write(root.path().join("pod/cgroup.procs"), "4194303\n").unwrap();
        let nss = namespaces(&[root.path().to_path_buf()]);
        assert_eq!(nss.by_ns.values().flatten().collect::<Vec<_>>(), [&me]);
        assert_eq!(nss.invisible, 2);
        let problems = nss.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("2 processes"), "{problems:?}");
        assert!(problems[0].contains("hostPID"), "{problems:?}");

        // All visible: nothing to report.
        fs::write(root.path().join("cgroup.procs"), format!("{me}\n")).unwrap();
        assert!(
            namespaces(&[root.path().to_path_buf()])
                .problems()
                .is_empty()
        );
    }
}
