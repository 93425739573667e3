//! Driving `netprobe`, the client side of the tests: it runs in a test cgroup
//! (and namespace), connects or sends as told, and reports each attempt as a
//! JSON line.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{cgroup::TestCgroup, netns::TestNetns};

/// One connect (or datagram) and what came of it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attempt {
    /// `CLOCK_MONOTONIC` when the attempt started.
    pub start_ns: u64,
    /// The id the backend sent back.
    pub backend: Option<String>,
    /// `getpeername` of the connected socket, or the source of the reply.
    pub peer: Option<String>,
    /// `getsockname` of the socket.
    pub local: Option<String>,
    /// Raw OS error of a failed connect/send/receive.
    pub errno: Option<i32>,
    pub error: Option<String>,
}

/// A `netprobe` command line, placed in cgroups and namespaces before it runs.
pub struct Probe {
    cmd: Command,
    what: String,
}

impl Probe {
    pub fn new(bin: impl AsRef<Path>, args: &[&str]) -> Self {
        let mut cmd = Command::new(bin.as_ref());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Self {
            cmd,
            what: format!("netprobe {}", args.join(" ")),
        }
    }

    /// Runs the probe as `ip netns exec <ns> netprobe ...`, so that it also
    /// gets the namespace's `/etc/netns/<ns>/resolv.conf`.
    pub fn via_ip_netns_exec(bin: impl AsRef<Path>, ns: &TestNetns, args: &[&str]) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()])
            .arg(bin.as_ref())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Self {
            cmd,
            what: format!("ip netns exec {} netprobe {}", ns.name(), args.join(" ")),
        }
    }

    pub fn in_cgroup(mut self, cg: &TestCgroup) -> Self {
        cg.spawn_into(&mut self.cmd);
        self
    }

    pub fn in_netns(mut self, ns: &TestNetns) -> Result<Self> {
        ns.spawn_into(&mut self.cmd)?;
        Ok(self)
    }

    /// Runs to completion and returns the attempts.
    pub fn run(self) -> Result<Vec<Attempt>> {
        self.spawn()?.finish()
    }

    /// Starts the probe; [`RunningProbe::finish`] collects it.
    pub fn spawn(mut self) -> Result<RunningProbe> {
        let child = self
            .cmd
            .spawn()
            .with_context(|| format!("starting {}", self.what))?;
        Ok(RunningProbe {
            child: Some(child),
            what: self.what,
        })
    }
}

/// A probe that is running. Dropping it kills it (it is our own child).
pub struct RunningProbe {
    child: Option<Child>,
    what: String,
}

impl RunningProbe {
    pub fn finish(mut self) -> Result<Vec<Attempt>> {
        let child = self.child.take().expect("probe already collected");
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for {}", self.what))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}): {}",
                self.what,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .with_context(|| format!("{} printed an unexpected line: {l}", self.what))
            })
            .collect()
    }
}

impl Drop for RunningProbe {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// How many attempts reached each backend id.
pub fn tally(attempts: &[Attempt]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for a in attempts {
        if let Some(b) = &a.backend {
            *m.entry(b.clone()).or_insert(0) += 1;
        }
    }
    m
}
