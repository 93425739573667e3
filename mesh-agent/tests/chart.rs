//! The Helm chart (`charts/sluice`): its generated pieces must match the code
//! (CRDs from `mesh-agent crds`, RBAC rules from what the agent watches and
//! writes), its values are documented, and Helm's own linter renders it.
//!
//! The lint test runs Helm's Go library through the PyPI package `helm-sdkpy`
//! (`cargo xtask setup` installs it); it fails, not skips, when it is missing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use mesh_agent::rbac::{Rule, agent_rules};
use serde_json::Value;

const HELM_SDKPY_INSTALL: &str = "pip install --ignore-requires-python helm-sdkpy==0.1.32";

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sluice")
}

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

#[test]
fn crds_in_the_chart_are_what_mesh_agent_crds_prints() {
    let path = chart().join("crds/sluice.dev.yaml");
    let on_disk = std::fs::read_to_string(&path).unwrap();
    assert!(
        on_disk == mesh_agent::crds::crd_manifests(),
        "{} is out of date; regenerate it: cargo run -p mesh-agent -- crds > charts/sluice/crds/sluice.dev.yaml",
        path.display()
    );
    let kinds: Vec<String> = yaml_docs(&on_disk)
        .iter()
        .map(|d| d["spec"]["names"]["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds, ["MeshPolicy", "AccessPolicy"]);
}

/// The `rules:` of the first document of a template, whose rules block is
/// plain YAML (no template directives).
fn template_rules(file: &str) -> Vec<Rule> {
    let text = std::fs::read_to_string(chart().join("templates").join(file)).unwrap();
    let first = text.split("\n---").next().unwrap();
    let rules = &first[first.find("\nrules:").expect("a rules: block")..];
    assert!(
        !rules.contains("{{"),
        "{file}: the rules block must be literal YAML"
    );
    let v: Value = serde_yaml::from_str(rules).unwrap();
    let mut out = Vec::new();
    for r in v["rules"].as_array().unwrap() {
        assert!(
            r.get("resourceNames").is_none(),
            "{file}: cluster rules must not be narrowed by name"
        );
        for g in r["apiGroups"].as_array().unwrap() {
            for res in r["resources"].as_array().unwrap() {
                let mut verbs: Vec<String> = r["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().into())
                    .collect();
                verbs.sort();
                out.push(Rule {
                    group: g.as_str().unwrap().into(),
                    resource: res.as_str().unwrap().into(),
                    verbs,
                });
            }
        }
    }
    out.sort();
    out
}

#[test]
fn agent_cluster_role_grants_exactly_what_the_agent_uses() {
    let mut want = agent_rules();
    for r in &mut want {
        r.verbs.sort();
    }
    assert_eq!(template_rules("agent-rbac.yaml"), want);
    // Mesh routes need no ReferenceGrant (GEP-1294): the agent reads none.
    assert!(
        want.iter().all(|r| r.resource != "referencegrants"),
        "{want:?}"
    );
    // Least privilege: nothing may be created, updated or deleted, and
    // secrets are never readable by the agent.
    for r in template_rules("agent-rbac.yaml") {
        assert!(r.resource != "secrets", "{r:?}");
        for v in &r.verbs {
            assert!(
                ["list", "watch", "get", "patch"].contains(&v.as_str()),
                "{r:?}"
            );
            if v == "patch" || v == "get" {
                assert!(
                    r.resource.ends_with("/status"),
                    "only status may be read one by one and patched: {r:?}"
                );
            }
        }
    }
}

#[test]
fn agent_role_grants_only_the_status_writer_lease_and_its_own_daemonset() {
    let text = std::fs::read_to_string(chart().join("templates/agent-rbac.yaml")).unwrap();
    let role = text
        .split("\n---")
        .find(|d| d.contains("\nkind: Role\n"))
        .expect("a Role in agent-rbac.yaml");
    let rules = &role[role.find("\nrules:").expect("a rules: block")..];
    assert!(
        !rules.contains("{{"),
        "the Role's rules must be literal YAML"
    );
    let v: Value = serde_yaml::from_str(rules).unwrap();
    let mut got = Vec::new();
    for r in v["rules"].as_array().unwrap() {
        let strings = |k: &str| -> Vec<String> {
            r[k].as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        };
        let (groups, resources) = (strings("apiGroups"), strings("resources"));
        assert_eq!((groups.len(), resources.len()), (1, 1), "{r:?}");
        got.push((
            Rule {
                group: groups[0].clone(),
                resource: resources[0].clone(),
                verbs: strings("verbs"),
            },
            strings("resourceNames"),
        ));
    }
    assert_eq!(got, mesh_agent::rbac::agent_namespace_rules());
    let ds = std::fs::read_to_string(chart().join("templates/agent-daemonset.yaml")).unwrap();
    assert!(
        ds.contains(&format!(
            "kind: DaemonSet\nmetadata:\n  name: {}\n",
            mesh_agent::sources::kube::owner::DAEMONSET
        )),
        "the agent watches its DaemonSet by the name the chart gives it"
    );
    assert!(
        ds.contains("- name: POD_NAMESPACE") && ds.contains("- name: POD_NAME\n"),
        "the agent finds its Lease's namespace in POD_NAMESPACE and its name in it in POD_NAME"
    );
}

#[test]
fn ca_cluster_role_only_reviews_tokens_and_watches_pods() {
    let mut want = mesh_agent::rbac::ca_rules();
    for r in &mut want {
        r.verbs.sort();
    }
    assert_eq!(template_rules("ca-rbac.yaml"), want);
}

#[test]
fn the_agent_runs_with_capabilities_not_privileged_and_every_value_is_documented() {
    let text = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    let values: Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(values["agent"]["privileged"], false);
    let caps: Vec<&str> = values["agent"]["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for (_, name, _) in mesh_agent::check::NEEDED_CAPS {
        let short = name.trim_start_matches("CAP_");
        assert!(
            caps.contains(&short),
            "values.yaml agent.capabilities lacks {short}"
        );
    }
    // Every key of the first two levels has a comment right above it.
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        let indent = l.len() - l.trim_start().len();
        let t = l.trim_start();
        let is_key = (indent == 0 || indent == 2)
            && !t.starts_with('#')
            && !t.starts_with('-')
            && t.contains(':');
        if !is_key {
            continue;
        }
        let above = lines[..i]
            .iter()
            .rev()
            .find(|p| !p.trim().is_empty())
            .map(|p| p.trim_start())
            .unwrap_or("");
        assert!(
            above.starts_with('#'),
            "values.yaml line {}: `{}` has no comment above it",
            i + 1,
            l.trim()
        );
    }
    let ds = std::fs::read_to_string(chart().join("templates/agent-daemonset.yaml")).unwrap();
    for needed in [
        "hostNetwork: true",
        "mountPath: /sys/fs/bpf",
        "mountPath: /sys/fs/cgroup",
        "tolerations:",
        "drop: [ALL]",
        // The CA token: projected for the CA's audience, where the agent
        // reads it by default.
        "audience: {{ .Values.ca.tokenAudience }}",
        "mountPath: /var/run/secrets/sluice/ca-token",
    ] {
        assert!(ds.contains(needed), "the DaemonSet lacks `{needed}`");
    }
    assert_eq!(
        Path::new(mesh_agent::agent::DEFAULT_CA_TOKEN)
            .parent()
            .unwrap(),
        Path::new("/var/run/secrets/sluice/ca-token"),
        "the agent's --ca-token default is where the chart mounts the projected token"
    );
    assert_eq!(
        values["ca"]["tokenAudience"],
        certs::ca::tokenreview::CA_TOKEN_AUDIENCE
    );
    let ca = std::fs::read_to_string(chart().join("templates/ca-deployment.yaml")).unwrap();
    assert!(ca.contains("--token-audience={{ .Values.ca.tokenAudience }}"));
}

/// Runs Helm's linter (which renders every template with the chart's values)
/// on `dir`; returns (severity, path) of each message.
fn helm_lint(dir: &Path) -> Vec<(u64, String)> {
    helm_lint_with_log(dir).0
}

/// Lint messages and what Helm logged (in lint mode, `fail` only logs:
/// `INFO funcMap fail message=...`).
fn helm_lint_with_log(dir: &Path) -> (Vec<(u64, String)>, String) {
    let script = r#"
import asyncio, json, sys
try:
    import helm_sdkpy
except ImportError as e:
    print("MISSING: " + str(e)); sys.exit(3)
r = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(sys.argv[1]))
print(json.dumps([[m["Severity"], m["Path"]] for m in r["Messages"]]))
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is needed to run Helm's linter ({e}); then: {HELM_SDKPY_INSTALL}")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "Helm's linter did not run: {}{}\nInstall it with `cargo xtask setup` or: {HELM_SDKPY_INSTALL}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    (
        serde_json::from_str::<Vec<(u64, String)>>(stdout.trim()).unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn only_a_privileged_init_container_mounts_back_to_the_host() {
    let ds = std::fs::read_to_string(chart().join("templates/agent-daemonset.yaml")).unwrap();
    // Kubernetes refuses Bidirectional mount propagation in a container that
    // is not privileged, and the agent's is not by default.
    let (init, main) = ds
        .split_once("\n      containers:\n")
        .expect("initContainers, then containers");
    let init = &init[init.find("initContainers:").expect("an init container")..];
    assert!(init.contains("command: [mesh-agent, mount-bpffs"), "{init}");
    assert!(init.contains("privileged: true"), "{init}");
    assert!(init.contains("mountPropagation: Bidirectional"), "{init}");
    assert!(!main.contains("Bidirectional"), "{main}");
    assert!(main.contains("mountPropagation: HostToContainer"), "{main}");
    // Resetting sockets finds pod processes in cgroup.procs, which lists
    // other PID namespaces' processes as 0.
    assert!(ds.contains("\n      hostPID: true\n"));
    // The CA reads the node from TokenReview's node-name extra (1.30+).
    let chart_yaml = std::fs::read_to_string(chart().join("Chart.yaml")).unwrap();
    assert!(
        chart_yaml.contains("kubeVersion: \">=1.30.0-0\""),
        "{chart_yaml}"
    );
}

/// The Containerfile builds the image the chart runs: the binaries the
/// chart's commands name, with the bpf-linker `cargo xtask setup` installs.
#[test]
fn the_containerfile_builds_what_the_chart_runs_with_the_setup_toolchain() {
    let root = chart().join("../..");
    let containerfile = std::fs::read_to_string(root.join("Containerfile")).unwrap();
    let xtask = std::fs::read_to_string(root.join("xtask/src/main.rs")).unwrap();
    let linker = xtask
        .lines()
        .find_map(|l| l.trim().strip_prefix("const BPF_LINKER_VERSION: &str = \""))
        .and_then(|v| v.strip_suffix("\";"))
        .expect("xtask's BPF_LINKER_VERSION");
    assert!(
        containerfile.contains(&format!("cargo install bpf-linker@{linker} --locked")),
        "the Containerfile's bpf-linker is not xtask's {linker}"
    );
    assert!(containerfile.contains("--component rust-src"));
    let templates = ["agent-daemonset.yaml", "ca-deployment.yaml"]
        .map(|t| std::fs::read_to_string(chart().join("templates").join(t)).unwrap());
    for t in &templates {
        assert!(t.contains("command: [mesh-agent"), "{t}");
    }
    for bin in ["mesh-agent", "sluice"] {
        assert!(
            containerfile.contains(&format!("--bin {bin}"))
                && containerfile.contains(&format!("target/dist/{bin}")),
            "the image lacks {bin}"
        );
        assert!(root.join(format!("mesh-agent/src/bin/{bin}.rs")).exists());
    }
}

/// Helm severities: 1 info, 2 warning, 3 error.
fn problems(msgs: &[(u64, String)]) -> Vec<&(u64, String)> {
    msgs.iter().filter(|(sev, _)| *sev >= 2).collect()
}

#[test]
fn helm_lint_renders_the_chart_with_default_and_other_values() {
    let msgs = helm_lint(&chart());
    assert_eq!(
        problems(&msgs),
        Vec::<&(u64, String)>::new(),
        "default values: {msgs:?}"
    );

    // The other branches of the templates: no CA, privileged agent.
    let tmp = tempfile::tempdir().unwrap();
    let variant = tmp.path().join("sluice");
    copy_dir(&chart(), &variant);
    let values = std::fs::read_to_string(variant.join("values.yaml")).unwrap();
    let values = values
        .replace("  enabled: true", "  enabled: false")
        .replace(
            "  inProcessOnEveryNode: false",
            "  inProcessOnEveryNode: true",
        )
        .replace("  privileged: false", "  privileged: true")
        .replace("  dualStack: false", "  dualStack: true")
        .replace(
            "  proxySettings: {}",
            "  proxySettings: {exchange_idle_timeout_ms: 3600000, tcp_idle_timeout_ms: 0}",
        )
        .replace(
            "  podAnnotations: {}",
            "  podAnnotations: {prometheus.io/scrape: \"true\"}",
        );
    std::fs::write(variant.join("values.yaml"), values).unwrap();
    let (msgs, log) = helm_lint_with_log(&variant);
    assert_eq!(
        problems(&msgs),
        Vec::<&(u64, String)>::new(),
        "variant values: {msgs:?}"
    );
    assert!(!log.contains("fail message"), "{log}");

    // Without the CA and without saying that a CA in every agent is meant
    // (a single-node cluster), the chart refuses, saying why.
    let values = std::fs::read_to_string(variant.join("values.yaml")).unwrap();
    std::fs::write(
        variant.join("values.yaml"),
        values.replace(
            "  inProcessOnEveryNode: true",
            "  inProcessOnEveryNode: false",
        ),
    )
    .unwrap();
    // (Helm's lint mode turns `fail` into a log line.)
    let refusal = "fail message=\"ca.enabled=false leaves every node with a CA of its own";
    let (_, log) = helm_lint_with_log(&variant);
    assert!(log.contains(refusal), "{log}");
    let (_, log) = helm_lint_with_log(&chart());
    assert!(!log.contains("fail message"), "{log}");

    // The linter does catch a broken template (so the checks above mean something).
    let ds = variant.join("templates/agent-daemonset.yaml");
    let broken = std::fs::read_to_string(&ds).unwrap().replace(
        "{{ .Values.image.pullPolicy }}",
        "{{ .Values.image.nope.pullPolicy }}",
    );
    std::fs::write(&ds, broken).unwrap();
    assert!(
        !problems(&helm_lint(&variant)).is_empty(),
        "a broken template passed the linter"
    );
}

/// `kubectl exec ... sluice` in the agent's container reaches the admin API
/// on the port the chart gives it, not only the default one.
#[test]
fn the_agent_container_tells_sluice_where_the_admin_api_is() {
    let text = std::fs::read_to_string(chart().join("templates/agent-daemonset.yaml")).unwrap();
    let env = text
        .find("- name: SLUICE_ADMIN\n")
        .map(|i| &text[i..])
        .expect("SLUICE_ADMIN in the agent container's env");
    let value = env.lines().nth(1).unwrap_or_default().trim();
    assert_eq!(
        value, "value: \"http://127.0.0.1:{{ .Values.agent.adminPort }}\"",
        "{env}"
    );
    assert!(
        text.contains(":{{ .Values.agent.adminPort }}\n"),
        "--admin-addr uses the same port"
    );
}
