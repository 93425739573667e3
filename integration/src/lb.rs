//! A load balancer instance for one test: small maps, a unique pin folder,
//! uninstalled on drop.

use std::{
    net::{Ipv4Addr, SocketAddr},
    ops::Deref,
};

use anyhow::Result;
use ebpf_lb::{LoadBalancer, Options};

use crate::cgroup::TestCgroup;

/// Options for a test instance: a unique pin folder and small maps.
pub fn test_options() -> Options {
    Options {
        instance: format!("test-{}", crate::unique_name("lb")),
        max_services: 1024,
        max_backends: 4096,
        max_affinity: 1024,
        max_sockets: 4096,
        max_enrolled: 64,
        ..Options::default()
    }
}

/// A loaded load balancer that removes its pinned state when dropped.
pub struct TestLb {
    lb: Option<LoadBalancer>,
    opts: Options,
}

impl TestLb {
    /// Opens an instance with `opts` and attaches it to `cg`.
    pub fn attach_with(cg: &TestCgroup, opts: Options) -> Result<Self> {
        let lb = match LoadBalancer::open(opts.clone()) {
            Ok(lb) => lb,
            Err(e) => {
                // A failed open may have pinned maps already.
                let _ = ebpf_lb::uninstall_at(&opts.pin_dir());
                return Err(e.into());
            }
        };
        let this = Self { lb: Some(lb), opts };
        this.attach(cg.path())?;
        Ok(this)
    }

    pub fn attach_to(cg: &TestCgroup) -> Result<Self> {
        Self::attach_with(cg, test_options())
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// Drops the loader without uninstalling, as a crashed agent would: the
    /// pinned maps and links stay until the returned guard is dropped.
    pub fn crash(mut self) -> Crashed {
        drop(self.lb.take());
        Crashed {
            opts: Some(self.opts.clone()),
        }
        // `self` drops here with no loader; its Drop must not uninstall.
    }
}

/// The pinned state of a loader that went away. Dropping it uninstalls.
pub struct Crashed {
    opts: Option<Options>,
}

impl Crashed {
    /// The options the crashed loader ran with.
    pub fn options(&self) -> &Options {
        self.opts.as_ref().expect("not reopened yet")
    }

    /// Opens a new loader on the pinned state.
    pub fn reopen(mut self) -> Result<TestLb> {
        let opts = self.opts.take().expect("not reopened yet");
        let lb = LoadBalancer::open(opts.clone());
        let lb = match lb {
            Ok(lb) => lb,
            Err(e) => {
                let _ = ebpf_lb::uninstall_at(&opts.pin_dir());
                return Err(e.into());
            }
        };
        Ok(TestLb { lb: Some(lb), opts })
    }
}

impl Drop for Crashed {
    fn drop(&mut self) {
        if let Some(opts) = &self.opts {
            let _ = ebpf_lb::uninstall_at(&opts.pin_dir());
        }
    }
}

impl Deref for TestLb {
    type Target = LoadBalancer;
    fn deref(&self) -> &LoadBalancer {
        self.lb.as_ref().expect("load balancer present")
    }
}

impl Drop for TestLb {
    fn drop(&mut self) {
        // A crashed loader keeps its pins (see `crash`).
        if self.lb.take().is_none() {
            return;
        }
        if let Err(e) = ebpf_lb::uninstall_at(&self.opts.pin_dir()) {
            eprintln!("warning: {e}");
        }
    }
}

/// A random address in 127.96.0.0/16, the range for host-namespace VIPs.
pub fn random_vip() -> Ipv4Addr {
    Ipv4Addr::new(
        127,
        96,
        rand::random_range(1..=254),
        rand::random_range(1..=254),
    )
}

/// A socket address on a random host-namespace VIP, port 0.
pub fn random_vip_addr() -> SocketAddr {
    SocketAddr::new(random_vip().into(), 0)
}
