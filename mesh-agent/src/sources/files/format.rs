//! The files source's own document: `kind: SluiceWorkloads`, standing in for
//! what kubelets report (pods with IP, node, service account and cgroup) and
//! for the node list.
//!
//! ```yaml
//! apiVersion: sluice.dev/v1alpha1
//! kind: SluiceWorkloads
//! nodes:
//!   - name: node-a
//!     addresses: [192.0.2.10]
//! workloads:
//!   - name: web-0
//!     namespace: shop            # default: default
//!     uid: 6f1d...               # default: files-<namespace>-<name>
//!     serviceAccount: web        # default: default
//!     ips: [10.0.1.5]            # or `ip: 10.0.1.5`
//!     node: node-a
//!     cgroup: shop/web-0         # absolute, or relative to --cgroup-root
//!     interface: veth-web0       # host side of its veth (STRICT guard); optional
//!     labels: {app: web}
//!     annotations: {}
//!     ports: {http: 8080}        # named container ports, for targetPort names
//!     ready: true                # default: true
//!     terminating: false         # default: false
//! ```

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

pub const KIND: &str = "SluiceWorkloads";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadsDoc {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub nodes: Vec<NodeEntry>,
    #[serde(default)]
    pub workloads: Vec<WorkloadEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeEntry {
    pub name: String,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// One address (added to `addresses`).
    #[serde(default)]
    pub address: Option<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntry {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    #[serde(default)]
    pub uid: Option<String>,
    #[serde(default = "default_sa")]
    pub service_account: String,
    #[serde(default)]
    pub ip: Option<IpAddr>,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    pub node: String,
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Host side of the pod's veth (where the STRICT guard attaches).
    #[serde(default)]
    pub interface: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    #[serde(default = "yes")]
    pub ready: bool,
    #[serde(default)]
    pub terminating: bool,
}

fn default_ns() -> String {
    "default".into()
}

fn default_sa() -> String {
    "default".into()
}

fn yes() -> bool {
    true
}

impl WorkloadEntry {
    pub fn all_ips(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.ip.into_iter().collect();
        for ip in &self.ips {
            if !v.contains(ip) {
                v.push(*ip);
            }
        }
        v
    }
}
