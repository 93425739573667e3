//! Sluice's node agent: reads the cluster (Kubernetes or a directory of
//! manifests), keeps one model of it, and programs the kernel load balancer,
//! the node proxy and the identity manager from it; serves the admin API the
//! `sluice` CLI reads.
//!
//! - [`sources`]: where the configuration comes from (`kube`, `files`);
//! - [`state`]: the model and what each change touches;
//! - [`reconcile`]: from the model to ebpf-lb, the proxy view, identities and status;
//! - [`admin`]: the HTTP admin API and metrics;
//! - [`cli`]: the `sluice` command;
//! - [`agent`]: `mesh-agent run`, tying it together.

pub mod admin;
pub mod agent;
pub mod ca;
pub mod cgroups;
pub mod check;
pub mod cli;
pub mod config;
pub mod crds;
pub mod gateway;
pub mod identity;
pub mod netdev;
pub mod proxy;
pub mod rbac;
pub mod reconcile;
pub mod sources;
pub mod state;

#[doc(hidden)]
pub mod testing;
