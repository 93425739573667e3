//! Builders for the objects tests feed the model (not for production use).

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Namespace, Service, ServicePort, ServiceSpec},
    discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
};
use kube::api::ObjectMeta;

use crate::{config, state::Workload};

pub fn namespace(name: &str, enrolled: bool) -> Namespace {
    let mut annotations = BTreeMap::new();
    if enrolled {
        annotations.insert(
            config::MESH_ANNOTATION.to_string(),
            config::MESH_ENABLED.to_string(),
        );
    }
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(annotations),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A ClusterIP Service with unnamed-if-single TCP ports (`p<port>` names
/// otherwise).
pub fn service(ns: &str, name: &str, ip: &str, ports: &[i32]) -> Service {
    let named = ports.len() > 1;
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.into()),
            cluster_ips: Some(vec![ip.into()]),
            ports: Some(
                ports
                    .iter()
                    .map(|p| ServicePort {
                        name: named.then(|| format!("p{p}")),
                        port: *p,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            selector: Some(BTreeMap::from([("app".to_string(), name.to_string())])),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn ep(
    ip: &str,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
) -> Endpoint {
    Endpoint {
        addresses: vec![ip.into()],
        conditions: Some(EndpointConditions {
            ready,
            serving,
            terminating,
        }),
        ..Default::default()
    }
}

pub fn ep_ready(ip: &str) -> Endpoint {
    ep(ip, Some(true), Some(true), Some(false))
}

/// An EndpointSlice of `svc` whose ports are named like [`service`]'s.
pub fn slice(
    ns: &str,
    name: &str,
    svc: &str,
    ports: &[i32],
    endpoints: &[Endpoint],
) -> EndpointSlice {
    let v6 = endpoints.iter().any(|e| e.addresses[0].contains(':'));
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            labels: Some(BTreeMap::from([(
                config::SERVICE_NAME_LABEL.to_string(),
                svc.to_string(),
            )])),
            ..Default::default()
        },
        address_type: if v6 { "IPv6" } else { "IPv4" }.into(),
        endpoints: endpoints.to_vec(),
        ports: Some(
            ports
                .iter()
                .map(|p| EndpointPort {
                    name: None,
                    port: Some(*p),
                    protocol: Some("TCP".into()),
                    app_protocol: None,
                })
                .collect(),
        ),
    }
}

pub fn workload(ns: &str, name: &str, sa: &str, ip: &str, node: &str) -> Workload {
    Workload {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("uid-{ns}-{name}"),
        service_account: sa.into(),
        ips: vec![ip.parse().expect("test IP")],
        node: node.into(),
        labels: BTreeMap::from([("app".to_string(), name.to_string())]),
        ready: true,
        ..Default::default()
    }
}
