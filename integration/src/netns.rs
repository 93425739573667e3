//! Network namespaces made for one test, deleted on drop. They have a loopback
//! interface and no route out.

use std::{
    fs,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// A named network namespace (`ip netns`), with `lo` up.
#[derive(Debug)]
pub struct TestNetns {
    name: String,
    /// `/etc/netns/<name>`, if a resolv.conf was written for it.
    etc: Option<PathBuf>,
}

pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl TestNetns {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = format!("sluice-{}", crate::unique_name(prefix));
        ip(&["netns", "add", &name])?;
        let ns = Self { name, etc: None };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a thread inside the namespace; sockets it creates stay in
    /// the namespace after it returns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file =
            fs::File::open(self.path()).with_context(|| format!("opening netns {}", self.name))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only, with a valid netns fd.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("entering netns {}", self.name));
                }
                Ok(f())
            })
            .join()
            .expect("netns thread panicked")
        })
    }

    /// Makes `cmd` start inside this namespace.
    pub fn spawn_into(&self, cmd: &mut Command) -> Result<()> {
        let file =
            fs::File::open(self.path()).with_context(|| format!("opening netns {}", self.name))?;
        // SAFETY: setns is async-signal-safe; the fd stays open in the closure.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }

    /// Gives processes started with `ip netns exec` this resolv.conf (iproute2
    /// bind-mounts `/etc/netns/<name>/resolv.conf` over `/etc/resolv.conf`).
    pub fn set_resolv_conf(&mut self, contents: &str) -> Result<()> {
        let dir = PathBuf::from("/etc/netns").join(&self.name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        self.etc = Some(dir.clone());
        fs::write(dir.join("resolv.conf"), contents).context("writing resolv.conf")?;
        Ok(())
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("warning: {e}");
        }
        if let Some(dir) = &self.etc {
            let _ = fs::remove_dir_all(dir);
        }
    }
}
