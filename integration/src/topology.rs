//! A small node in network namespaces: a "node" namespace standing in for a
//! host, and pods, each its own namespace joined to the node by a veth pair,
//! as most CNIs wire pods. Pod `i` is 10.200.i.2 and fd00:200:i::2; the
//! node's side of its veth is `sp<i>` with 10.200.i.1 and fd00:200:i::1. The
//! node forwards between pods; nothing routes out of these namespaces.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::netns::TestNetns;

/// The node: a namespace that forwards between its pods.
pub struct TestNode {
    pub ns: TestNetns,
}

/// A pod on a [`TestNode`].
pub struct TestPod {
    pub ns: TestNetns,
    /// The node-side interface of the pod's veth.
    pub host_if: String,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
}

fn sysctl_in(ns: &TestNetns, key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "sh",
            "-c",
            &format!("echo {value} > {path}"),
        ])
        .output()
        .context("running ip netns exec")?;
    if !out.status.success() {
        bail!(
            "setting {key}={value} in {}: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Interfaces made from now on skip duplicate address detection: until it
/// ends, their link-local addresses are tentative and neighbour discovery
/// through them stalls for a second or two.
fn no_dad(ns: &TestNetns) -> Result<()> {
    sysctl_in(ns, "net.ipv6.conf.default.accept_dad", "0")?;
    sysctl_in(ns, "net.ipv6.conf.all.accept_dad", "0")
}

impl TestNode {
    pub fn new(prefix: &str) -> Result<Self> {
        let ns = TestNetns::new(prefix)?;
        no_dad(&ns)?;
        sysctl_in(&ns, "net.ipv4.ip_forward", "1")?;
        sysctl_in(&ns, "net.ipv6.conf.all.forwarding", "1")?;
        Ok(Self { ns })
    }

    /// Adds pod `index` (1..=250).
    pub fn add_pod(&self, index: u8) -> Result<TestPod> {
        let ns = TestNetns::new(&format!("p{index}"))?;
        no_dad(&ns)?;
        let host_if = format!("sp{index}");
        self.ns.ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])?;
        let ip4 = Ipv4Addr::new(10, 200, index, 2);
        let ip6: Ipv6Addr = format!("fd00:200:{index}::2").parse()?;
        self.ns.ip(&[
            "addr",
            "add",
            &format!("10.200.{index}.1/24"),
            "dev",
            &host_if,
        ])?;
        self.ns.ip(&[
            "addr",
            "add",
            &format!("fd00:200:{index}::1/64"),
            "dev",
            &host_if,
            "nodad",
        ])?;
        self.ns.ip(&["link", "set", &host_if, "up"])?;
        ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"])?;
        ns.ip(&["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &format!("10.200.{index}.1"),
        ])?;
        ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd00:200:{index}::1"),
        ])?;
        Ok(TestPod {
            ns,
            host_if,
            ip4,
            ip6,
        })
    }
}
