//! Sluice's custom resources (group `sluice.dev`, version `v1alpha1`):
//! `MeshPolicy` (mTLS mode) and `AccessPolicy` (who may reach a Service), their
//! validation, and the CRD manifests `mesh-agent crds` prints.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt as _};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "sluice.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "sluice.dev/v1alpha1";

/// mTLS mode of a workload's inbound traffic.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Only mTLS from the mesh is accepted; plaintext to the workload is refused.
    Strict,
    /// mTLS from the mesh and plaintext from outside it are both accepted.
    #[default]
    Permissive,
    /// No mTLS: traffic to the workload is not tunnelled.
    Disabled,
}

impl std::fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disabled => "DISABLED",
        })
    }
}

impl std::str::FromStr for MtlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_uppercase().as_str() {
            "STRICT" => Ok(Self::Strict),
            "PERMISSIVE" => Ok(Self::Permissive),
            "DISABLED" => Ok(Self::Disabled),
            _ => Err(format!(
                "unknown mTLS mode {s:?}: use STRICT, PERMISSIVE or DISABLED"
            )),
        }
    }
}

/// The mTLS mode for the pods of a namespace, or of the pods a selector picks.
/// A policy with a selector takes precedence over one without; between equals,
/// the oldest wins (then the first by name).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "MeshPolicy",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "meshpol",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MeshPolicySpec {
    /// Pods (by label) this policy applies to; absent: every pod of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// STRICT, PERMISSIVE or DISABLED.
    pub mode: MtlsMode,
}

/// Which callers may reach the Services a policy targets. Until some policy
/// targets a Service, everyone may; once one does, only requests that match a
/// rule of a policy targeting it are allowed.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "sluice.dev",
    version = "v1alpha1",
    kind = "AccessPolicy",
    namespaced,
    status = "PolicyStatus",
    derive = "PartialEq",
    shortname = "accesspol",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AccessPolicySpec {
    /// The Services (in the policy's namespace) this policy guards.
    pub target_refs: Vec<PolicyTargetRef>,
    /// Allow rules: a request is allowed when any rule matches it. No rules:
    /// nothing may reach the targets.
    #[serde(default)]
    pub rules: Vec<AccessRule>,
}

/// A Service in the policy's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    /// API group of the target: "" (core).
    #[serde(default)]
    pub group: String,
    /// Kind of the target: `Service`.
    #[serde(default = "service_kind")]
    pub kind: String,
    pub name: String,
}

fn service_kind() -> String {
    "Service".into()
}

/// One allow rule: a request matches when its source matches any `from` entry
/// (or `from` is empty) and it matches any `to` entry (or `to` is empty).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessRule {
    /// Callers. Empty: any caller, in the mesh or not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<AccessSource>,
    /// HTTP operations. Empty: any request, and any opaque TCP connection.
    /// A rule with operations never matches opaque TCP.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<AccessOperation>,
}

/// A caller, by exactly one of: SPIFFE ID, namespace, or service account.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessSource {
    /// A SPIFFE ID, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Every workload identity of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// One service account (namespace defaults to the policy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<ServiceAccountRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

/// HTTP requests by method and path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessOperation {
    /// Methods (`GET`, `POST`, ...). Empty: any method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Paths. Empty: any path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PathMatch {
    /// `Exact` or `PathPrefix` (whole segments, as in Gateway API).
    #[serde(default, rename = "type")]
    pub kind: PathMatchType,
    pub value: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
}

/// Status of a Sluice policy: an `Accepted` condition saying whether the agent
/// took it, and why not.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A problem with one field of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, `spec.rules[0].from[1]`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Checks a label selector's operators and values.
pub fn validate_selector(sel: &LabelSelector, field: &str, out: &mut Vec<FieldError>) {
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let f = format!("{field}.matchExpressions[{i}]");
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => out.push(err(
                format!("{f}.values"),
                format!("operator {} needs values", e.operator),
            )),
            "Exists" | "DoesNotExist" if !values.is_empty() => out.push(err(
                format!("{f}.values"),
                format!("operator {} takes no values", e.operator),
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => out.push(err(
                format!("{f}.operator"),
                format!("unknown operator {other:?}: use In, NotIn, Exists or DoesNotExist"),
            )),
        }
    }
}

/// Whether `labels` satisfy `sel` (a valid selector; see [`validate_selector`]).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_exprs = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let have = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => have.is_none_or(|v| !values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        }
    });
    by_labels && by_exprs
}

impl MeshPolicySpec {
    pub fn validate(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        if let Some(sel) = &self.selector {
            validate_selector(sel, "spec.selector", &mut out);
        }
        out
    }
}

/// Checks a SPIFFE ID (the `certs` definition).
pub fn validate_spiffe_id(id: &str) -> Result<(), String> {
    id.parse::<certs::SpiffeId>()
        .map(drop)
        .map_err(|e| e.to_string())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

impl AccessPolicySpec {
    pub fn validate(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        if self.target_refs.is_empty() {
            out.push(err("spec.targetRefs", "name at least one Service"));
        }
        for (i, t) in self.target_refs.iter().enumerate() {
            let f = format!("spec.targetRefs[{i}]");
            if !(t.group.is_empty() || t.group == "core") || t.kind != "Service" {
                out.push(err(
                    &f,
                    format!(
                        "only Services can be targeted (group \"\", kind Service), not group {:?} kind {:?}",
                        t.group, t.kind
                    ),
                ));
            }
            if !is_dns_label(&t.name) {
                out.push(err(
                    format!("{f}.name"),
                    format!("{:?} is not a valid Service name", t.name),
                ));
            }
        }
        for (r, rule) in self.rules.iter().enumerate() {
            for (i, s) in rule.from.iter().enumerate() {
                let f = format!("spec.rules[{r}].from[{i}]");
                let set = [
                    s.identity.is_some(),
                    s.namespace.is_some(),
                    s.service_account.is_some(),
                ]
                .iter()
                .filter(|b| **b)
                .count();
                if set != 1 {
                    out.push(err(
                        &f,
                        "set exactly one of identity, namespace or serviceAccount",
                    ));
                }
                if let Some(id) = &s.identity
                    && let Err(e) = validate_spiffe_id(id)
                {
                    out.push(err(format!("{f}.identity"), e));
                }
                if let Some(ns) = &s.namespace
                    && !is_dns_label(ns)
                {
                    out.push(err(
                        format!("{f}.namespace"),
                        format!("{ns:?} is not a valid namespace name"),
                    ));
                }
                if let Some(sa) = &s.service_account {
                    if !is_dns_subdomain(&sa.name) {
                        out.push(err(
                            format!("{f}.serviceAccount.name"),
                            format!("{:?} is not a valid service account name", sa.name),
                        ));
                    }
                    if let Some(ns) = &sa.namespace
                        && !is_dns_label(ns)
                    {
                        out.push(err(
                            format!("{f}.serviceAccount.namespace"),
                            format!("{ns:?} is not a valid namespace name"),
                        ));
                    }
                }
            }
            for (i, op) in rule.to.iter().enumerate() {
                let f = format!("spec.rules[{r}].to[{i}]");
                for (m, method) in op.methods.iter().enumerate() {
                    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                        out.push(err(
                            format!("{f}.methods[{m}]"),
                            format!(
                                "{method:?} is not an HTTP method (upper-case letters, e.g. GET)"
                            ),
                        ));
                    }
                }
                for (p, path) in op.paths.iter().enumerate() {
                    if !path.value.starts_with('/') {
                        out.push(err(
                            format!("{f}.paths[{p}].value"),
                            format!("{:?} must start with '/'", path.value),
                        ));
                    }
                }
            }
        }
        out
    }
}

/// The CRD manifests of every Sluice resource, as one multi-document YAML.
pub fn crd_manifests() -> String {
    let mut out = String::from("# Generated by `mesh-agent crds`; do not edit.\n");
    for crd in [MeshPolicy::crd(), AccessPolicy::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd).expect("a CRD serialises to YAML"));
    }
    out
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "tier".into(),
                    operator: "In".into(),
                    values: Some(vec!["a".into(), "b".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
        };
        assert!(selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "b")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "c")])
        ));
        assert!(!selector_matches(
            &sel,
            &labels(&[("app", "web"), ("tier", "a"), ("canary", "1")])
        ));
        assert!(!selector_matches(&sel, &labels(&[("tier", "a")])));
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
    }

    #[test]
    fn access_policy_validation_names_each_bad_field() {
        let spec: AccessPolicySpec = serde_json::from_value(serde_json::json!({
            "targetRefs": [{"kind": "Deployment", "name": "web"}],
            "rules": [{
                "from": [
                    {"identity": "http://x"},
                    {"namespace": "a", "serviceAccount": {"name": "b"}},
                    {"serviceAccount": {"name": "good", "namespace": "Bad_NS"}}
                ],
                "to": [{"methods": ["get"], "paths": [{"value": "api"}]}]
            }]
        }))
        .unwrap();
        let fields: Vec<String> = spec.validate().into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "spec.targetRefs[0]",
                "spec.rules[0].from[0].identity",
                "spec.rules[0].from[1]",
                "spec.rules[0].from[2].serviceAccount.namespace",
                "spec.rules[0].to[0].methods[0]",
                "spec.rules[0].to[0].paths[0].value",
            ]
        );
    }

    #[test]
    fn a_good_access_policy_is_valid() {
        let spec: AccessPolicySpec = serde_json::from_value(serde_json::json!({
            "targetRefs": [{"name": "reviews"}],
            "rules": [{
                "from": [{"identity": "spiffe://cluster.local/ns/shop/sa/web"}, {"namespace": "ops"}],
                "to": [{"methods": ["GET"], "paths": [{"type": "Exact", "value": "/health"}]}]
            }]
        }))
        .unwrap();
        assert_eq!(spec.validate(), vec![]);
        assert_eq!(spec.target_refs[0].kind, "Service");
        assert_eq!(spec.rules[0].to[0].paths[0].kind, PathMatchType::Exact);
    }

    #[test]
    fn mesh_policy_modes_parse_in_upper_case_only_from_yaml() {
        let spec: MeshPolicySpec =
            serde_json::from_value(serde_json::json!({"mode": "STRICT"})).unwrap();
        assert_eq!(spec.mode, MtlsMode::Strict);
        assert!(
            serde_json::from_value::<MeshPolicySpec>(serde_json::json!({"mode": "strict"}))
                .is_err()
        );
    }

    #[test]
    fn crd_manifests_carry_group_version_and_schema() {
        let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&crd_manifests())
            .map(|d| serde_json::Value::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 2);
        let names: Vec<&str> = docs
            .iter()
            .map(|d| d["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["meshpolicies.sluice.dev", "accesspolicies.sluice.dev"]
        );
        for d in &docs {
            assert_eq!(d["spec"]["group"], "sluice.dev");
            assert_eq!(d["spec"]["scope"], "Namespaced");
            let v = &d["spec"]["versions"][0];
            assert_eq!(v["name"], "v1alpha1");
            assert_eq!(v["subresources"]["status"], serde_json::json!({}));
        }
        let mode = &docs[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["mode"];
        assert_eq!(
            mode["enum"],
            serde_json::json!(["STRICT", "PERMISSIVE", "DISABLED"])
        );
    }
}
