//! The standalone demo: one node made of network namespaces, pods in their
//! own cgroups, the real `mesh-agent` on the manifests in `examples/demo`,
//! and real traffic. `cargo xtask demo` prints what happened; the end-to-end
//! test (`tests/demo.rs`) asserts it. Everything it creates is removed when
//! it returns, also after an error or Ctrl-C.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cgroup::TestCgroup,
    netns::TestNetns,
    probe::{Attempt, Probe, RunningProbe, tally},
    require_root,
    topology::{TestNode, TestPod},
    unique_name,
};

/// Set by the demo binary's SIGINT handler; the demo stops at the next step
/// and cleans up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The node proxy's address (on the node's loopback).
pub const NODE_ADDRESS: &str = "10.255.0.1";
pub const WEB_VIP: &str = "10.96.0.10:80";
pub const REVIEWS_VIP: &str = "10.96.0.20:80";
pub const ECHO_VIP: &str = "10.96.1.10:80";
/// web-1's own address: a plaintext client tries it directly.
pub const WEB_1_POD: &str = "10.200.1.2:8080";

/// The demo's pods: index (10.200.i.2), name, whether it serves HTTP.
const PODS: [(u8, &str, bool); 9] = [
    (1, "web-1", true),
    (2, "web-2", true),
    (3, "web-3", true),
    (4, "reviews-v1", true),
    (5, "reviews-v2", true),
    (6, "frontend", false),
    (7, "legacy-client", false),
    (8, "echo-1", true),
    (9, "echo-2", true),
];

/// What the demo measured.
#[derive(Debug, Default)]
pub struct DemoReport {
    /// frontend -> web through the mesh: backend pod -> responses.
    pub web: BTreeMap<String, usize>,
    pub web_failures: Vec<Attempt>,
    /// frontend -> reviews (HTTPRoute 90/10): backend pod -> responses.
    pub reviews: BTreeMap<String, usize>,
    pub reviews_failures: Vec<Attempt>,
    /// frontend straight to web-1's address (as a headless Service's client
    /// reaches a pod): through the proxy and mTLS, STRICT lets it in.
    pub direct: BTreeMap<String, usize>,
    pub direct_failures: Vec<Attempt>,
    /// legacy-client plaintext straight to web-1's address.
    pub plaintext_direct: Vec<Attempt>,
    /// legacy-client plaintext to the web VIP.
    pub plaintext_vip: Vec<Attempt>,
    /// legacy-client -> echo, kernel balancing only: backend pod -> responses.
    pub echo: BTreeMap<String, usize>,
    pub echo_failures: Vec<Attempt>,
    /// `sluice status`, `sluice workloads`, `sluice tls` as printed.
    pub status: String,
    pub workloads: String,
    pub tls: String,
    /// `sluice tls -o json` and `sluice workloads -o json`.
    pub tls_json: serde_json::Value,
    pub workloads_json: serde_json::Value,
}

/// Paths of the programs the demo runs.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub mesh_agent: PathBuf,
    pub sluice: PathBuf,
    pub netprobe: PathBuf,
}

impl Binaries {
    /// The binaries built next to the running executable (`target/<profile>`,
    /// or its parent for test executables under `deps/`).
    pub fn beside_current_exe() -> Result<Self> {
        let exe = std::env::current_exe()?;
        let find = |name: &str| -> Result<PathBuf> {
            let mut dir = exe.parent();
            while let Some(d) = dir {
                let p = d.join(name);
                if p.is_file() {
                    return Ok(p);
                }
                if d.file_name().is_some_and(|n| n == "target") {
                    break;
                }
                dir = d.parent();
            }
            bail!(
                "{name} is not built next to {}; build the workspace first",
                exe.display()
            )
        };
        Ok(Self {
            mesh_agent: find("mesh-agent")?,
            sluice: find("sluice")?,
            netprobe: find("netprobe")?,
        })
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// A folder removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The agent process: stopped (SIGTERM, then SIGKILL) and its pinned kernel
/// state removed on drop.
struct AgentGuard {
    child: Child,
    pin_dir: PathBuf,
    log: PathBuf,
}

impl AgentGuard {
    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for AgentGuard {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Err(e) = ebpf_lb::uninstall_at(&self.pin_dir) {
            eprintln!("warning: removing the demo's kernel state: {e}");
        }
    }
}

/// Everything the demo creates. Field order is drop order: processes first,
/// then the agent, then pods, node and cgroups.
struct Stage {
    servers: Vec<RunningProbe>,
    agent: Option<AgentGuard>,
    pods: BTreeMap<&'static str, TestPod>,
    cgroups: BTreeMap<&'static str, TestCgroup>,
    node: TestNode,
    root: TestCgroup,
    _state: TempDir,
    bins: Binaries,
}

/// One HTTP GET over a fresh connection, from inside `ns`.
fn http_get(ns: &TestNetns, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    ns.run(move || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        let code = buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    })?
}

impl Stage {
    fn pod(&self, name: &str) -> &TestPod {
        &self.pods[name]
    }

    fn probe(&self, pod: &str, args: &[&str]) -> Result<Probe> {
        Ok(Probe::new(&self.bins.netprobe, args)
            .in_netns(&self.pod(pod).ns)?
            .in_cgroup(&self.cgroups[pod]))
    }

    /// Runs `sluice <args>` on the node, against the agent's admin API.
    fn sluice(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.bins.sluice);
        cmd.args(args).stdin(Stdio::null());
        self.node.ns.spawn_into(&mut cmd)?;
        let out = cmd.output().context("running sluice")?;
        if !out.status.success() {
            bail!(
                "sluice {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn build(bins: Binaries, manifests: &Path, say: &mut dyn FnMut(&str)) -> Result<Self> {
        require_root();
        say(
            "creating the node (a network namespace) and nine pods (namespaces joined by veths, each in its own cgroup)",
        );
        let node = TestNode::new("demo")?;
        node.ns
            .ip(&["addr", "add", &format!("{NODE_ADDRESS}/32"), "dev", "lo"])?;
        let root = TestCgroup::new("demo")?;
        let state = TempDir(std::env::temp_dir().join(unique_name("sluice-demo")));
        fs::create_dir_all(&state.0)?;
        let mut stage = Stage {
            servers: Vec::new(),
            agent: None,
            pods: BTreeMap::new(),
            cgroups: BTreeMap::new(),
            node,
            root,
            _state: state,
            bins,
        };
        for (i, name, _) in PODS {
            check_interrupted()?;
            stage.pods.insert(name, stage.node.add_pod(i)?);
            stage.cgroups.insert(name, stage.root.child(name)?);
        }
        say("starting an HTTP server in web-1..3, reviews-v1/v2 and echo-1/2");
        for (i, name, serves) in PODS {
            if serves {
                let listen = format!("10.200.{i}.2:8080");
                let p = stage.probe(name, &["serve-http", "--listen", &listen, "--name", name])?;
                stage.servers.push(p.spawn()?);
            }
        }

        let instance = unique_name("demo");
        let log = stage._state.0.join("mesh-agent.log");
        let log_file = fs::File::create(&log)?;
        let mut cmd = Command::new(&stage.bins.mesh_agent);
        cmd.arg("run")
            .arg(format!("--source=files:{}", manifests.display()))
            .args(["--node-name", "demo-node", "--node-address", NODE_ADDRESS])
            .arg("--cgroup-root")
            .arg(stage.root.path())
            .arg("--state-dir")
            .arg(&stage._state.0)
            .args([
                "--admin-addr",
                "127.0.0.1:15020",
                "--lb-instance",
                &instance,
            ])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        stage.node.ns.spawn_into(&mut cmd)?;
        say(&format!(
            "starting mesh-agent on {} (standalone: files source, in-process CA, embedded proxy)",
            manifests.display()
        ));
        let child = cmd.spawn().context("starting mesh-agent")?;
        stage.agent = Some(AgentGuard {
            child,
            pin_dir: PathBuf::from(ebpf_lb::DEFAULT_BPFFS).join(instance),
            log,
        });
        stage.wait_ready()?;
        Ok(stage)
    }

    /// Waits for the agent's readiness, then for a first request through the
    /// mesh to succeed (identities issued, snapshot published).
    fn wait_ready(&mut self) -> Result<()> {
        let admin: SocketAddr = "127.0.0.1:15020".parse()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            check_interrupted()?;
            if let Some(a) = self.agent.as_mut()
                && let Ok(Some(status)) = a.child.try_wait()
            {
                bail!("mesh-agent exited ({status}):\n{}", a.log_tail());
            }
            if matches!(http_get(&self.node.ns, admin, "/readyz"), Ok((200, _))) {
                break;
            }
            if Instant::now() > deadline {
                bail!("mesh-agent did not become ready:\n{}", self.agent_log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        loop {
            check_interrupted()?;
            let r = self
                .probe("frontend", &["http", "--to", WEB_VIP, "--count", "1"])?
                .run()?;
            if r.first().is_some_and(|a| a.peer.as_deref() == Some("200")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no request through the mesh succeeded: {r:?}\n{}",
                    self.agent_log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(AgentGuard::log_tail)
            .unwrap_or_default()
    }
}

fn ok_responses(attempts: &[Attempt]) -> (BTreeMap<String, usize>, Vec<Attempt>) {
    let (ok, failed): (Vec<Attempt>, Vec<Attempt>) = attempts
        .iter()
        .cloned()
        .partition(|a| a.errno.is_none() && a.peer.as_deref() == Some("200"));
    (tally(&ok), failed)
}

/// Runs the demo: builds the node, starts the agent on `manifests`, runs the
/// traffic, collects the CLI's output. `say` receives progress lines.
pub fn run(bins: Binaries, manifests: &Path, say: &mut dyn FnMut(&str)) -> Result<DemoReport> {
    let stage = Stage::build(bins, manifests, say)?;
    let result = scenarios(&stage, say);
    if result.is_err() {
        say(&format!(
            "mesh-agent log (last lines):\n{}",
            stage.agent_log()
        ));
    }
    say("tearing down: processes, agent, kernel state, pods, cgroups");
    drop(stage);
    result
}

fn scenarios(stage: &Stage, say: &mut dyn FnMut(&str)) -> Result<DemoReport> {
    let mut report = DemoReport::default();

    check_interrupted()?;
    say("frontend (shop, enrolled) -> web: 90 requests on one keep-alive connection");
    let a = stage
        .probe("frontend", &["http", "--to", WEB_VIP, "--count", "90"])?
        .run()?;
    (report.web, report.web_failures) = ok_responses(&a);

    check_interrupted()?;
    say("frontend -> reviews: 400 requests, split 90/10 by an HTTPRoute");
    let a = stage
        .probe("frontend", &["http", "--to", REVIEWS_VIP, "--count", "400"])?
        .run()?;
    (report.reviews, report.reviews_failures) = ok_responses(&a);

    check_interrupted()?;
    say(
        "frontend -> web-1's pod address (no Service, as a headless one's client): via the proxy and mTLS",
    );
    let a = stage
        .probe("frontend", &["http", "--to", WEB_1_POD, "--count", "5"])?
        .run()?;
    (report.direct, report.direct_failures) = ok_responses(&a);

    check_interrupted()?;
    say("legacy-client (legacy, not enrolled) -> web-1 in plaintext: STRICT must refuse it");
    report.plaintext_direct = stage
        .probe("legacy-client", &["tcp", "--to", WEB_1_POD, "--count", "3"])?
        .run()?;
    report.plaintext_vip = stage
        .probe("legacy-client", &["tcp", "--to", WEB_VIP, "--count", "3"])?
        .run()?;

    check_interrupted()?;
    say("legacy-client -> echo (legacy): 40 connections, balanced by the kernel alone");
    let a = stage
        .probe(
            "legacy-client",
            &[
                "http",
                "--to",
                ECHO_VIP,
                "--count",
                "40",
                "--new-connections",
            ],
        )?
        .run()?;
    (report.echo, report.echo_failures) = ok_responses(&a);

    check_interrupted()?;
    say("a long-lived frontend -> web connection stays open while the CLI looks");
    let live = stage
        .probe(
            "frontend",
            &[
                "http",
                "--to",
                WEB_VIP,
                "--count",
                "40",
                "--interval-ms",
                "100",
            ],
        )?
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    report.status = stage.sluice(&["status"])?;
    report.workloads = stage.sluice(&["workloads"])?;
    report.tls = stage.sluice(&["tls"])?;
    report.tls_json = serde_json::from_str(&stage.sluice(&["tls", "-o", "json"])?)
        .context("sluice tls -o json")?;
    report.workloads_json = serde_json::from_str(&stage.sluice(&["workloads", "-o", "json"])?)
        .context("sluice workloads -o json")?;
    live.finish()?;
    Ok(report)
}
