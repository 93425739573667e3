//! Prometheus metrics, computed at scrape time from the reconciler's view and
//! the kernel's per-service counters.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::AdminState;

#[derive(Debug)]
struct Snapshot {
    gauges: Vec<(&'static str, &'static str, i64)>,
    counters: Vec<(&'static str, &'static str, u64)>,
    /// (service, frontend, outcome, value)
    lb: Vec<(String, String, &'static str, u64)>,
    /// (pod, refused plaintext connection attempts)
    refusals: Vec<(String, u64)>,
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, v) in &self.gauges {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(*v).encode(m)?;
        }
        for (name, help, v) in &self.counters {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(*v).encode(m)?;
        }
        let mut m = encoder.encode_descriptor(
            "sluice_lb_connections",
            "Connections (and unconnected UDP datagrams) the kernel handled per service frontend: \
             balanced to a backend, redirected to the node proxy, or refused for lack of a backend",
            None,
            MetricType::Counter,
        )?;
        for (service, frontend, outcome, v) in &self.lb {
            let labels = [
                ("service", service.as_str()),
                ("frontend", frontend.as_str()),
                ("outcome", *outcome),
            ];
            ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
        }
        let mut m = encoder.encode_descriptor(
            "sluice_strict_refusals",
            "Plaintext connection attempts to STRICT workloads the kernel refused",
            None,
            MetricType::Counter,
        )?;
        for (pod, v) in &self.refusals {
            ConstCounter::new(*v).encode(m.encode_family(&[("pod", pod.as_str())])?)?;
        }
        Ok(())
    }
}

/// The agent's metrics in Prometheus text, without the final `# EOF`.
pub fn encode(s: &AdminState) -> String {
    let v = s.view();
    let mut lb = Vec::new();
    for (svc, frontends) in s.kernel_frontends(&v) {
        for fe in frontends {
            if let Some(c) = s.dp.counters(&fe) {
                for (outcome, n) in [
                    ("balanced", c.balanced),
                    ("redirected", c.redirected),
                    ("no_backend", c.no_backend),
                ] {
                    lb.push((svc.key.to_string(), fe.to_string(), outcome, n));
                }
            }
        }
    }
    let refusals = v
        .workloads
        .iter()
        .filter(|w| {
            w.strict_guard
                .as_deref()
                .is_some_and(|g| g.starts_with("guarded"))
        })
        .map(|w| {
            let n = w
                .ips
                .iter()
                .filter_map(|ip| ip.parse().ok())
                .map(|ip| s.dp.refusals(ip))
                .sum();
            (format!("{}/{}", w.namespace, w.name), n)
        })
        .collect();
    let st = &v.stats;
    let snap = Snapshot {
        gauges: vec![
            (
                "sluice_agent_synced",
                "1 once the source's initial state is programmed",
                i64::from(v.synced),
            ),
            (
                "sluice_agent_services",
                "Services programmed into the kernel",
                v.services.len() as i64,
            ),
            (
                "sluice_agent_enrolled_workloads",
                "Local mesh pods whose cgroup is enrolled in the kernel: with a proxy configured, \
                 their connections to meshed Services go through it (a pod whose cgroup could not \
                 be enrolled is not counted)",
                v.workloads.iter().filter(|w| w.captured()).count() as i64,
            ),
            (
                "sluice_agent_config_errors",
                "Refused files or objects, the node proxy's included (their last good version stays); notes not counted",
                s.config_problem_count(&v) as i64,
            ),
            (
                "sluice_agent_dataplane_errors",
                "Kernel updates failing (retried)",
                v.dataplane_errors.len() as i64,
            ),
            (
                "sluice_agent_identities",
                "Workload identities the node holds certificates for",
                v.identities.len() as i64,
            ),
        ],
        counters: vec![
            (
                "sluice_agent_kernel_updates",
                "Batches of service changes applied to the kernel",
                st.batches_applied,
            ),
            (
                "sluice_agent_kernel_update_failures",
                "Batches the kernel refused",
                st.batch_failures,
            ),
            (
                "sluice_agent_service_changes",
                "Service frontend upserts and removals applied",
                st.changes_applied,
            ),
            ("sluice_agent_enrolments", "cgroups enrolled", st.enrolments),
            (
                "sluice_agent_unenrolments",
                "cgroups unenrolled",
                st.unenrolments,
            ),
            (
                "sluice_agent_removed_backends",
                "Ready backends that left a service",
                st.removed_backends,
            ),
            (
                "sluice_agent_sockets_reset",
                "Sockets reset because their backend left its service",
                st.sockets_reset,
            ),
            (
                "sluice_agent_status_writes",
                "Object status writes requested",
                st.status_writes,
            ),
        ],
        lb,
        refusals,
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snap));
    let mut out = String::new();
    prometheus_client::encoding::text::encode_registry(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}
