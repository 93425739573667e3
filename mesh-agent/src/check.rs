//! Node checks: what Sluice needs from the kernel and the process. `sluice
//! check` runs them locally (they work while the agent is down) and the agent
//! serves its own view of them on `/v1/check`.

use std::path::Path;

use crate::admin::api::{CheckResult, Outcome};

/// Oldest kernel the programs load on (`bpf_set_retval`).
pub const MIN_KERNEL: (u32, u32) = (5, 18);
/// TCX links, which the STRICT guard on pod interfaces attaches with.
pub const STRICT_GUARD_KERNEL: (u32, u32) = (6, 6);

fn result(name: &str, outcome: Outcome, detail: impl Into<String>) -> CheckResult {
    CheckResult {
        name: name.into(),
        outcome,
        detail: detail.into(),
    }
}

/// `major.minor` of a kernel release string such as `6.18.0-1-amd64`.
pub fn parse_kernel(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

pub fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

pub fn check_kernel(release: Option<&str>) -> CheckResult {
    let name = "kernel";
    match release.and_then(|r| parse_kernel(r).map(|v| (r, v))) {
        Some((r, v)) if v >= STRICT_GUARD_KERNEL => {
            result(name, Outcome::Pass, format!("Linux {r}"))
        }
        Some((r, v)) if v >= MIN_KERNEL => result(
            name,
            Outcome::Warn,
            format!(
                "Linux {r} balances and proxies, but the kernel's STRICT guard (plaintext \
                 refused at STRICT pods' interfaces) needs TCX links, Linux {}.{}: it fails to \
                 attach here",
                STRICT_GUARD_KERNEL.0, STRICT_GUARD_KERNEL.1
            ),
        ),
        Some((r, _)) => result(
            name,
            Outcome::Fail,
            format!(
                "Linux {r} is older than {}.{}; Sluice's programs need bpf_set_retval (5.18)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        ),
        None => result(
            name,
            Outcome::Fail,
            "cannot read the kernel version (/proc/sys/kernel/osrelease)",
        ),
    }
}

pub fn check_cgroup2() -> CheckResult {
    match ebpf_lb::cgroup2_mount() {
        Ok(p) => result(
            "cgroup v2",
            Outcome::Pass,
            format!("mounted at {}", p.display()),
        ),
        Err(e) => result("cgroup v2", Outcome::Fail, e.to_string()),
    }
}

/// Whether a bpffs is mounted at `path`, from a mountinfo text (whose mount
/// points have space, tab, newline and backslash written as octal escapes,
/// `\040`).
pub fn bpffs_in_mountinfo(mountinfo: &str, path: &Path) -> bool {
    mountinfo.lines().any(|l| {
        let Some((left, right)) = l.split_once(" - ") else {
            return false;
        };
        right.split_whitespace().next() == Some("bpf")
            && left
                .split_whitespace()
                .nth(4)
                .is_some_and(|p| Path::new(&unescape_octal(p)) == path)
    })
}

/// `p` with mountinfo's `\NNN` octal escapes read back.
fn unescape_octal(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let digits = b.get(i + 1..i + 4);
        match digits {
            Some(d) if b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn check_bpffs(path: &Path) -> CheckResult {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if bpffs_in_mountinfo(&info, path) {
        result(
            "bpffs",
            Outcome::Pass,
            format!("mounted at {}", path.display()),
        )
    } else {
        result(
            "bpffs",
            Outcome::Warn,
            format!(
                "not mounted at {}; the agent mounts it when it starts (needs CAP_SYS_ADMIN), \
                 or: mount -t bpf bpf {}",
                path.display(),
                path.display()
            ),
        )
    }
}

pub fn check_btf() -> CheckResult {
    let p = Path::new("/sys/kernel/btf/vmlinux");
    if p.exists() {
        result("BTF", Outcome::Pass, "/sys/kernel/btf/vmlinux present")
    } else {
        result(
            "BTF",
            Outcome::Fail,
            "/sys/kernel/btf/vmlinux is missing; use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
    }
}

/// Capabilities the agent needs: (bit, name, why).
pub const NEEDED_CAPS: [(u32, &str, &str); 4] = [
    (39, "CAP_BPF", "load programs and create maps"),
    (
        12,
        "CAP_NET_ADMIN",
        "attach cgroup socket programs, close sockets",
    ),
    (
        21,
        "CAP_SYS_ADMIN",
        "mount bpffs, sock_ops programs, enter pod network namespaces",
    ),
    (
        19,
        "CAP_SYS_PTRACE",
        "open other users' pods' network namespaces to close their sockets",
    ),
];

/// The effective capability set from a `/proc/<pid>/status` text.
pub fn effective_caps(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line.trim_start_matches("CapEff:").trim(), 16).ok()
}

pub fn check_caps(status: &str, whose: &str) -> CheckResult {
    let Some(eff) = effective_caps(status) else {
        return result(
            "capabilities",
            Outcome::Fail,
            "cannot read CapEff from /proc/self/status",
        );
    };
    let missing: Vec<String> = NEEDED_CAPS
        .iter()
        .filter(|(bit, _, _)| eff & (1u64 << bit) == 0)
        .map(|(_, name, why)| format!("{name} ({why})"))
        .collect();
    if missing.is_empty() {
        result(
            "capabilities",
            Outcome::Pass,
            format!("{whose} has CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_SYS_PTRACE"),
        )
    } else {
        result(
            "capabilities",
            Outcome::Warn,
            format!(
                "{whose} lacks {}; the agent needs them (run it as root or grant them)",
                missing.join(", ")
            ),
        )
    }
}

/// Every local check, for this process.
pub fn local_checks(bpffs: &Path) -> Vec<CheckResult> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    vec![
        check_kernel(kernel_release().as_deref()),
        check_cgroup2(),
        check_bpffs(bpffs),
        check_btf(),
        check_caps(&status, "this process"),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_kernel("6.18.0-1-cloud-amd64"), Some((6, 18)));
        assert_eq!(check_kernel(Some("6.6.0")).outcome, Outcome::Pass);
        let no_tcx = check_kernel(Some("6.1.0-18-amd64"));
        assert_eq!(no_tcx.outcome, Outcome::Warn);
        assert!(no_tcx.detail.contains("STRICT guard"), "{}", no_tcx.detail);
        let old = check_kernel(Some("5.15.0-91-generic"));
        assert_eq!(old.outcome, Outcome::Fail);
        assert!(old.detail.contains("5.15.0-91-generic"));
        assert_eq!(check_kernel(None).outcome, Outcome::Fail);
    }

    #[test]
    fn capabilities_from_status() {
        let all = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(check_caps(all, "p").outcome, Outcome::Pass);
        // Only CAP_NET_ADMIN (bit 12).
        let some = "CapEff:\t0000000000001000\n";
        let r = check_caps(some, "p");
        assert_eq!(r.outcome, Outcome::Warn);
        assert!(r.detail.contains("CAP_BPF") && r.detail.contains("CAP_SYS_ADMIN"));
        assert!(!r.detail.contains("CAP_NET_ADMIN"), "{}", r.detail);
    }

    #[test]
    fn bpffs_mount_detection() {
        let info = "50 30 0:45 / /sys/fs/bpf rw,nosuid - bpf bpf rw,mode=700\n";
        assert!(bpffs_in_mountinfo(info, Path::new("/sys/fs/bpf")));
        assert!(!bpffs_in_mountinfo(info, Path::new("/mnt/bpf")));
        assert!(!bpffs_in_mountinfo(
            "50 30 0:45 / /sys/fs/bpf rw - tmpfs tmpfs rw\n",
            Path::new("/sys/fs/bpf")
        ));
        // A mount point with a space, as mountinfo escapes it.
        let spaced = "51 30 0:46 / /run/my\\040bpf rw - bpf bpf rw\n";
        assert!(bpffs_in_mountinfo(spaced, Path::new("/run/my bpf")));
        assert!(!bpffs_in_mountinfo(spaced, Path::new("/run/my\\040bpf")));
    }
}
