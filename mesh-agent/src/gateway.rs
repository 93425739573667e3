//! The Gateway API types the agent reads.
//!
//! `HTTPRoute` and `GRPCRoute` come from the experimental channel's bindings:
//! the same group and version (`gateway.networking.k8s.io/v1`) as the
//! standard ones and a superset of their fields, so `rules[].retry`
//! (GEP-1731) and the other experimental fields are read instead of being
//! dropped silently, while routes written for the standard channel read the
//! same.

pub use gateway_api::experimental::{grpcroutes::GrpcRoute, httproutes::HttpRoute};

pub use gateway_api::referencegrants::{ReferenceGrantFrom, ReferenceGrantTo};
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// `ReferenceGrant` at `gateway.networking.k8s.io/v1beta1`: every Gateway
/// API release serves this version (v1 only from 1.5 on), with the same
/// fields. A grant in a namespace lets routes of the namespaces and kinds in
/// `from` refer to the objects in `to` there.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1beta1",
    kind = "ReferenceGrant",
    plural = "referencegrants",
    namespaced,
    schema = "disabled",
    derive = "PartialEq",
    derive = "Default"
)]
pub struct ReferenceGrantSpec {
    pub from: Vec<ReferenceGrantFrom>,
    pub to: Vec<ReferenceGrantTo>,
}

/// The API group of Gateway API kinds, as `ReferenceGrant.from[].group` names it.
pub const GROUP: &str = "gateway.networking.k8s.io";
