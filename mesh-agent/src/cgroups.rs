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
            .ok_or_else(|| {
                format!(
                    "no cgroup for pod UID {} under {}/kubepods* yet (containers not started?)",
                    w.uid,
                    self.root.display()
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        std::fs::create_dir_all(&sd).unwrap();
        std::fs::write(sd.join("cgroup.procs"), "").unwrap();
        assert_eq!(r.resolve(&w).unwrap(), sd);

        w.uid = "99".into();
        let fs = root.path().join("kubepods/pod99");
        std::fs::create_dir_all(&fs).unwrap();
        std::fs::write(fs.join("cgroup.procs"), "").unwrap();
        assert_eq!(r.resolve(&w).unwrap(), fs);

        // An explicit path wins, relative to the base.
        w.cgroup = Some("kubepods/pod99".into());
        assert_eq!(r.resolve(&w).unwrap(), fs);
        w.cgroup = Some("missing".into());
        assert!(r.resolve(&w).unwrap_err().contains("missing"));
    }
}
