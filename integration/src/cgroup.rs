//! cgroup v2 directories made for one test, removed on drop.

use std::{
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};

/// A cgroup this test created. Dropping it kills whatever still runs inside
/// (only processes the test put there) and removes the directory, children
/// first.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// A new cgroup directly under the cgroup v2 root.
    pub fn new(prefix: &str) -> Result<Self> {
        let root = ebpf_lb::cgroup2_mount()?;
        Self::create(root.join(format!("sluice-test-{}", crate::unique_name(prefix))))
    }

    /// A new child of this cgroup.
    pub fn child(&self, name: &str) -> Result<Self> {
        Self::create(self.path.join(name))
    }

    fn create(path: PathBuf) -> Result<Self> {
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup's id, as `bpf_get_current_cgroup_id` sees it.
    pub fn id(&self) -> u64 {
        ebpf_lb::cgroup_id(&self.path).expect("test cgroup has an id")
    }

    /// Makes `cmd` start inside this cgroup: the child moves itself in before
    /// exec, so the test runner never joins it.
    pub fn spawn_into(&self, cmd: &mut Command) {
        let procs = CString::new(self.path.join("cgroup.procs").as_os_str().as_bytes())
            .expect("cgroup path has no NUL");
        // SAFETY: only async-signal-safe calls (open, write, close) between
        // fork and exec; `procs` was allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if rc != 1 {
                    return Err(err);
                }
                Ok(())
            });
        }
    }

    fn kill_and_remove(path: &Path) {
        if let Ok(entries) = fs::read_dir(path) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    Self::kill_and_remove(&e.path());
                }
            }
        }
        // Everything inside was started by this test.
        let _ = fs::write(path.join("cgroup.kill"), "1");
        for _ in 0..100 {
            match fs::remove_dir(path) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!("warning: could not remove test cgroup {}", path.display());
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        Self::kill_and_remove(&self.path);
    }
}
