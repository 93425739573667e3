//! Finding a pod's cgroup: from the workloads file standalone, from its UID
//! under the kubepods tree in a cluster.

use std::path::{Path, PathBuf};

use crate::state::Workload;

/// Finds the cgroup directory of a workload.
pub trait CgroupResolver: Send + Sync {
    fn resolve(&self, w: &Workload) -> Result<PathBuf, String>;
}

/// Resolves from the workload's own cgroup path (absolute, or relative to
/// `base`) when it has one, else from its UID under the kubepods tree of the
/// cgroup v2 mount `root` (systemd and cgroupfs drivers, every QoS class).
#[derive(Clone, Debug)]
pub struct PodCgroups {
    pub root: PathBuf,
    pub base: PathBuf,
}

impl PodCgroups {
    /// The directories a kubelet may have made for pod `uid`.
    pub fn kubepods_candidates(root: &Path, uid: &str) -> Vec<PathBuf> {
        let sd = uid.replace('-', "_");
        let mut out = vec![
            root.join(format!("kubepods.slice/kubepods-pod{sd}.slice")),
            root.join(format!("kubepods/pod{uid}")),
        ];
        for qos in ["burstable", "besteffort"] {
            out.push(root.join(format!(
                "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{sd}.slice"
            )));
            out.push(root.join(format!("kubepods/{qos}/pod{uid}")));
        }
        out
    }
}

fn is_cgroup(p: &Path) -> bool {
    p.join("cgroup.procs").exists()
}

/// Pod `uid`'s cgroup anywhere a kubelet with a `--cgroup-root` of its own
/// puts it (kind's `/kubelet`: `kubelet.slice/kubelet-kubepods.slice/…` with
/// the systemd driver, `kubelet/kubepods/…` with cgroupfs): below any
/// top-level directory, through directories named for kubepods or a QoS
/// class, at most four levels down.
fn search(root: &Path, uid: &str) -> Option<PathBuf> {
    let systemd = format!("-pod{}.slice", uid.replace('-', "_"));
    let cgroupfs = format!("pod{uid}");
    let mut level = vec![root.to_path_buf()];
    for depth in 1..=4 {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in entries.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = e.file_name();
                let name = name.to_string_lossy();
                if depth > 1
                    && (name.ends_with(&systemd) || name == cgroupfs)
                    && is_cgroup(&e.path())
                {
                    return Some(e.path());
                }
                // Another pod's directory holds only its containers.
                let a_pod = name.starts_with("pod") || name.contains("-pod");
                let on_the_way = depth == 1
                    || (!a_pod
                        && (name.contains("kubepods")
                            || name.contains("burstable")
                            || name.contains("besteffort")));
                if on_the_way {
                    next.push(e.path());
                }
            }
        }
        level = next;
    }
    None
}

impl CgroupResolver for PodCgroups {
    fn resolve(&self, w: &Workload) -> Result<PathBuf, String> {
        if let Some(p) = &w.cgroup {
            let p = if p.is_absolute() {
                p.clone()
            } else {
                self.base.join(p)
            };
            return if is_cgroup(&p) {
                Ok(p)
            } else {
                Err(format!(
                    "cgroup {} does not exist (or is not a cgroup v2 directory)",
                    p.display()
                ))
            };
        }
        if w.uid.is_empty() {
            return Err("the pod has neither a cgroup path nor a UID".into());
        }
        Self::kubepods_candidates(&self.root, &w.uid)
            .into_iter()
            .find(|p| is_cgroup(p))
            .or_else(|| search(&self.root, &w.uid))
            .ok_or_else(|| {
                format!(
                    "no cgroup for pod UID {} under {} yet (looked for kubepods*/…pod{}…, also \
                     below a kubelet --cgroup-root such as kind's /kubelet): its containers \
                     have not started, or the kubelet uses cgroup v1",
                    w.uid,
                    self.root.display(),
                    w.uid
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup directory at `path` (with its `cgroup.procs`).
    fn cgroup(path: &Path) {
        std::fs::create_dir_all(path).unwrap();
        std::fs::write(path.join("cgroup.procs"), "").unwrap();
    }

    #[test]
    fn finds_systemd_and_cgroupfs_layouts() {
        let root = tempfile::tempdir().unwrap();
        let r = PodCgroups {
            root: root.path().into(),
            base: root.path().into(),
        };
        let mut w = Workload {
            uid: "1234-ab".into(),
            ..Default::default()
        };
        assert!(r.resolve(&w).unwrap_err().contains("1234-ab"));
        let sd = root
            .path()
            .join("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_ab.slice");
        cgroup(&sd);
        assert_eq!(r.resolve(&w).unwrap(), sd);

        w.uid = "99".into();
        let fs = root.path().join("kubepods/pod99");
        cgroup(&fs);
        assert_eq!(r.resolve(&w).unwrap(), fs);

        // A kubelet with a --cgroup-root of its own (kind's /kubelet), both
        // drivers.
        w.uid = "77-cd".into();
        let kind_sd = root.path().join(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod77_cd.slice",
        );
        std::fs::create_dir_all(&kind_sd).unwrap();
        assert!(r.resolve(&w).is_err(), "not a cgroup without cgroup.procs");
        std::fs::write(kind_sd.join("cgroup.procs"), "").unwrap();
        assert_eq!(r.resolve(&w).unwrap(), kind_sd);
        w.uid = "88".into();
        let kind_fs = root.path().join("kubelet/kubepods/burstable/pod88");
        cgroup(&kind_fs);
        assert_eq!(r.resolve(&w).unwrap(), kind_fs);
        // Elsewhere (not a kubepods tree) it is not looked for.
        w.uid = "66".into();
        let stray = root.path().join("system.slice/other/pod66");
        cgroup(&stray);
        let err = r.resolve(&w).unwrap_err();
        assert!(err.contains("66") && err.contains("cgroup-root"), "{err}");

        w.uid = "99".into();
        // An explicit path wins, relative to the base.
        w.cgroup = Some("kubepods/pod99".into());
        assert_eq!(r.resolve(&w).unwrap(), fs);
        w.cgroup = Some("missing".into());
        assert!(r.resolve(&w).unwrap_err().contains("missing"));
    }
}
