//! The Gateway API types the agent reads.
//!
//! `HTTPRoute` and `GRPCRoute` come from the experimental channel's bindings:
//! the same group and version (`gateway.networking.k8s.io/v1`) as the
//! standard ones and a superset of their fields, so `rules[].retry`
//! (GEP-1731) and the other experimental fields are read instead of being
//! dropped silently, while routes written for the standard channel read the
//! same.
//!
//! `ReferenceGrant` is not read: routes with Service parents (GAMMA) may
//! refer to Services in any namespace without one (GEP-1294).

pub use gateway_api::experimental::{grpcroutes::GrpcRoute, httproutes::HttpRoute};
