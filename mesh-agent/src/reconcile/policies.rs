//! The `Accepted` condition of Sluice policies.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use super::routes::{Cond, conditions_match, to_conditions};
use crate::{
    crds::PolicyStatus,
    state::{Key, Kind, Store},
};

/// A status the Kubernetes source should write.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusWrite {
    pub kind: Kind,
    pub key: Key,
    /// Sluice's policies: the whole `status` object. Routes: `{"parents":
    /// [...]}` with Sluice's entries only, merged by the writer into the
    /// route's current `status.parents`.
    pub status: serde_json::Value,
}

fn accepted(generation: Option<i64>, stored: &[Condition]) -> Option<serde_json::Value> {
    let conds = [Cond {
        type_: "Accepted",
        status: true,
        reason: "Accepted".into(),
        message: "the policy is in force".into(),
    }];
    write(&conds, generation, stored)
}

fn write(
    conds: &[Cond],
    generation: Option<i64>,
    stored: &[Condition],
) -> Option<serde_json::Value> {
    if conditions_match(stored, conds, generation) {
        return None;
    }
    let status = PolicyStatus {
        observed_generation: generation,
        conditions: to_conditions(conds, generation, stored),
    };
    Some(serde_json::to_value(status).expect("status serialises"))
}

/// Status writes for every policy whose stored status is not what the agent
/// decided (accepted, or refused with the reasons).
pub fn policy_status_writes(store: &Store) -> Vec<StatusWrite> {
    let mut out = Vec::new();
    let stored = |s: Option<&PolicyStatus>| s.map(|s| s.conditions.clone()).unwrap_or_default();
    for (key, p) in &store.mesh_policies {
        if store
            .rejected
            .contains_key(&(Kind::MeshPolicy, key.clone()))
        {
            continue;
        }
        if let Some(status) = accepted(p.metadata.generation, &stored(p.status.as_ref())) {
            out.push(StatusWrite {
                kind: Kind::MeshPolicy,
                key: key.clone(),
                status,
            });
        }
    }
    for (key, p) in &store.access_policies {
        if store
            .rejected
            .contains_key(&(Kind::AccessPolicy, key.clone()))
        {
            continue;
        }
        if let Some(status) = accepted(p.metadata.generation, &stored(p.status.as_ref())) {
            out.push(StatusWrite {
                kind: Kind::AccessPolicy,
                key: key.clone(),
                status,
            });
        }
    }
    for r in store.rejected.values() {
        let message = r
            .errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let conds = [Cond {
            type_: "Accepted",
            status: false,
            reason: "Invalid".into(),
            message: format!("{message} (the last valid version stays in force)"),
        }];
        if let Some(status) = write(&conds, r.generation, &r.conditions) {
            out.push(StatusWrite {
                kind: r.kind,
                key: r.key.clone(),
                status,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        crds::{AccessPolicy, AccessPolicySpec},
        state::{Object, Update},
    };

    #[test]
    fn invalid_policies_get_a_false_condition_with_the_field() {
        let mut s = Store::new();
        let spec: AccessPolicySpec =
            serde_json::from_value(serde_json::json!({"targetRefs": []})).unwrap();
        let mut p = AccessPolicy::new("p", spec);
        p.metadata.namespace = Some("shop".into());
        p.metadata.generation = Some(2);
        s.apply(Update::Upsert(Object::AccessPolicy(p.clone())));
        let w = policy_status_writes(&s);
        assert_eq!(w.len(), 1);
        let c = &w[0].status["conditions"][0];
        assert_eq!(c["type"], "Accepted");
        assert_eq!(c["status"], "False");
        assert_eq!(c["reason"], "Invalid");
        assert!(
            c["message"].as_str().unwrap().contains("spec.targetRefs"),
            "{c}"
        );
        assert_eq!(w[0].status["observedGeneration"], 2);

        // Once the object carries that status, there is nothing to write.
        p.status = Some(serde_json::from_value(w[0].status.clone()).unwrap());
        s.apply(Update::Upsert(Object::AccessPolicy(p)));
        assert_eq!(policy_status_writes(&s), vec![]);
    }
}
