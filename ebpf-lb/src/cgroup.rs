//! cgroup v2 facts the loader needs: where the hierarchy is mounted, and a
//! cgroup's id and depth as `bpf_get_current_cgroup_id` and
//! `bpf_get_current_ancestor_cgroup_id` see them.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::{Error, Result};

/// The mount point of the cgroup v2 hierarchy, read from `/proc/self/mountinfo`
/// (it is `/sys/fs/cgroup` on most nodes, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading", "/proc/self/mountinfo", e))?;
    find_cgroup2_mount(&info).ok_or_else(|| Error::Cgroup {
        path: "/proc/self/mountinfo".into(),
        reason: "no cgroup2 file system is mounted; Sluice needs cgroup v2 \
                 (mount -t cgroup2 none /sys/fs/cgroup)"
            .into(),
    })
}

pub(crate) fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace()
            .nth(4)
            .map(|p| PathBuf::from(unescape_mountinfo(p)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 id of the cgroup at `path`: the inode number of its
/// directory, which is what `bpf_get_current_cgroup_id` returns.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    check_cgroup_dir(path)?;
    let meta = fs::metadata(path).map_err(|e| Error::io("reading cgroup", path, e))?;
    Ok(meta.ino())
}

/// Depth of the cgroup at `path` below the root of the hierarchy (root = 0),
/// as `bpf_get_current_ancestor_cgroup_id` counts it. The cgroup2 mount that
/// holds `path` may show only a subtree (a container's view): the depth of
/// that subtree's root, from mountinfo, is added.
pub fn cgroup_level(path: &Path) -> Result<u32> {
    check_cgroup_dir(path)?;
    let canon = fs::canonicalize(path).map_err(|e| Error::io("resolving cgroup", path, e))?;
    let info = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("reading", "/proc/self/mountinfo", e))?;
    level_in(&info, &canon).ok_or_else(|| Error::Cgroup {
        path: path.into(),
        reason: "not below any cgroup v2 mount".into(),
    })
}

/// All cgroup2 mounts as (mount point, root of the mounted subtree).
fn cgroup2_mounts(mountinfo: &str) -> Vec<(PathBuf, PathBuf)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut f = left.split_whitespace();
            let root = f.nth(3)?;
            let point = f.next()?;
            Some((
                PathBuf::from(unescape_mountinfo(point)),
                PathBuf::from(unescape_mountinfo(root)),
            ))
        })
        .collect()
}

pub(crate) fn level_in(mountinfo: &str, canon: &Path) -> Option<u32> {
    let (point, root) = cgroup2_mounts(mountinfo)
        .into_iter()
        .filter(|(point, _)| canon.starts_with(point))
        .max_by_key(|(point, _)| point.components().count())?;
    let rel = canon.strip_prefix(&point).ok()?;
    let base = root
        .components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .count();
    Some((base + rel.components().count()) as u32)
}

fn check_cgroup_dir(path: &Path) -> Result<()> {
    if !path.join("cgroup.procs").exists() {
        return Err(Error::Cgroup {
            path: path.into(),
            reason: "not a cgroup v2 directory (no cgroup.procs); pass a directory under the \
                     cgroup2 mount"
                .into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_in_a_hybrid_layout() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(
            find_cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn unescapes_mount_points() {
        let info = "41 31 0:38 / /mnt/my\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2_mount(info),
            Some(PathBuf::from("/mnt/my cgroup"))
        );
    }

    #[test]
    fn level_counts_from_the_root_of_the_hierarchy() {
        let info = "\
41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
50 31 0:38 /kubepods.slice /host-cgroup rw - cgroup2 cgroup2 rw
";
        let at = |p: &str| level_in(info, Path::new(p));
        assert_eq!(at("/sys/fs/cgroup/unified"), Some(0));
        assert_eq!(at("/sys/fs/cgroup/unified/a/b"), Some(2));
        // A mount of a subtree: its root's depth counts too.
        assert_eq!(at("/host-cgroup/pod1/c1"), Some(3));
        assert_eq!(at("/elsewhere"), None);
    }

    #[test]
    fn no_cgroup2_is_none() {
        assert_eq!(
            find_cgroup2_mount("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw\n"),
            None
        );
    }
}
