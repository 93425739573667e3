//! The node proxy on loopback, side by side with its baseline and its peer,
//! all driven by `oha` against one HTTP/1.1 backend answering 1 KiB bodies:
//! - direct: oha → backend;
//! - TCP relay pair: oha → relay → relay → backend (a minimal copy loop, the
//!   floor for any pair of user-space proxies);
//! - Sluice: oha → client proxy (capture listener) → HTTP/2 over mTLS 1.3 →
//!   server proxy → backend;
//! - nginx pair: oha → nginx (plain) → HTTPS with client certificates (TLS
//!   1.3, upstream keepalive) → nginx → backend.
//!
//! Every proxy is a process of its own with one worker (a one-thread tokio
//! runtime; nginx with `master_process off`), as one proxy per node would be
//! on two nodes, so each pair's CPU time is read from `/proc/<pid>/stat`.
//! Access logs are off everywhere.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::report::{Section, ratio};

/// Response body size.
const BODY: usize = 1024;

const NOISE: &str = "On this 2-vCPU VM the figures move by tens of percent from one run to the \
                     next, the direct path's included: compare the paths within one table.\n";

/// A child process, killed (by its PID) when dropped.
struct Proc {
    child: Child,
    what: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Where the processes of a latency run may run.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// Every process on every vCPU, as the scheduler likes.
    Shared,
    /// The load generator alone on vCPU 0; the backend and the proxies on the
    /// others. oha's threads then never delay a proxy, and the tail measures
    /// the path rather than the load generator's scheduling.
    Isolated,
}

/// A CPU set of the vCPUs `cpus`.
fn cpu_set(cpus: impl IntoIterator<Item = usize>) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in cpus {
        // SAFETY: CPU_SET only writes the bit of `c` inside `set`, and `c`
        // is below the number of online CPUs, far under CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Moves every thread of process `pid` to `set` (threads created later
/// inherit it from their creator).
fn pin_process(pid: u32, set: &libc::cpu_set_t) -> Result<()> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("listing the threads of process {pid}"))?;
    for task in tasks {
        let Some(tid) = task?
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: `set` is a valid cpu_set_t and its size is passed along.
        let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(set), set) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            // A thread that ended meanwhile is no error.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e).with_context(|| format!("pinning thread {tid} of process {pid}"));
            }
        }
    }
    Ok(())
}

/// One way to reach the backend.
struct Target {
    name: &'static str,
    url: String,
    /// Processes whose CPU time counts for this target.
    procs: Vec<Proc>,
    /// Error logs to show when the target fails.
    logs: Vec<PathBuf>,
}

/// Starts `bench __proxy-node ARGS` and waits for its `READY <addr>` line.
fn node(args: &[&str]) -> Result<(Proc, SocketAddr)> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("__proxy-node")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a proxy-node child")?;
    let out = child.stdout.take().expect("piped");
    let proc = Proc {
        child,
        what: args.join(" "),
    };
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let addr = line
        .strip_prefix("READY ")
        .with_context(|| format!("{} did not start: {line:?}", proc.what))?
        .trim()
        .parse()?;
    Ok((proc, addr))
}

fn free_port(ip: &str) -> Result<u16> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

fn wait_listening(addr: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("{what} is not listening on {addr} after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Installs nginx from Debian when it is missing.
fn ensure_nginx() -> Result<PathBuf> {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    eprintln!("installing nginx (apt-get)");
    let ok = Command::new("sh")
        .args(["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx"])
        .status()?
        .success();
    if !ok {
        bail!("nginx is not installed and apt-get could not install it");
    }
    Ok("/usr/sbin/nginx".into())
}

/// Installs oha with cargo when it is missing.
fn ensure_oha() -> Result<PathBuf> {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo")
        });
    let bin = home.join("bin/oha");
    if bin.exists() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("which").arg("oha").output()
        && out.status.success()
    {
        return Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    // `cargo xtask bench` installs it first; run directly, the bench does.
    eprintln!("installing oha (cargo install oha@1.16.0 --locked, a few minutes)");
    if !Command::new("cargo")
        .args(["install", "oha@1.16.0", "--locked"])
        .status()?
        .success()
    {
        bail!("oha is missing and `cargo install oha@1.16.0 --locked` failed");
    }
    Ok(bin)
}

/// PEM files for the nginx pair: a CA, a server and a client certificate
/// (ECDSA P-256, like Sluice's).
fn nginx_certs(dir: &Path) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL takes a leaf whose issuer equals its subject
    // for self-signed.
    ca.distinguished_name
        .push(DnType::CommonName, "sluice bench CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    for (name, san) in [("server", "nginx-b"), ("client", "nginx-a")] {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec![san.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, san);
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
    }
    Ok(())
}

fn nginx_conf(
    dir: &Path,
    name: &str,
    listen: SocketAddr,
    tls_in: bool,
    upstream: SocketAddr,
    tls_out: bool,
) -> String {
    let d = dir.display();
    let ssl_in = if tls_in {
        format!(
            "ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server.key; \
             ssl_client_certificate {d}/ca.pem; ssl_verify_client on; ssl_protocols TLSv1.3;"
        )
    } else {
        String::new()
    };
    let ssl_out = if tls_out {
        format!(
            "proxy_ssl_certificate {d}/client.pem; proxy_ssl_certificate_key {d}/client.key; \
             proxy_ssl_trusted_certificate {d}/ca.pem; proxy_ssl_verify on; proxy_ssl_name nginx-b; \
             proxy_ssl_server_name on; proxy_ssl_protocols TLSv1.3; proxy_ssl_session_reuse on;"
        )
    } else {
        String::new()
    };
    let scheme = if tls_out { "https" } else { "http" };
    let ssl = if tls_in { " ssl" } else { "" };
    format!(
        "daemon off; master_process off; worker_processes 1; user root;
error_log {d}/{name}-error.log warn; pid {d}/{name}.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/{name}-body; proxy_temp_path {d}/{name}-proxy;
  fastcgi_temp_path {d}/{name}-fcgi; uwsgi_temp_path {d}/{name}-uwsgi; scgi_temp_path {d}/{name}-scgi;
  upstream up {{ server {upstream}; keepalive 256; keepalive_requests 1000000; }}
  server {{
    listen {listen}{ssl}; {ssl_in}
    keepalive_requests 1000000;
    location / {{
      proxy_pass {scheme}://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; {ssl_out}
    }}
  }}
}}
"
    )
}

/// Starts everything: the backend and the four ways to reach it.
struct Fleet {
    backend: Proc,
    targets: Vec<Target>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Fleet {
    /// `threads`: tokio worker threads of each relay and Sluice proxy process
    /// (each nginx is a single-threaded process).
    fn start(threads: usize) -> Result<Fleet> {
        let threads = threads.to_string();
        let nginx = ensure_nginx()?;
        let (backend, backend_addr) = node(&["backend", "127.0.0.2:0"])?;
        let backend_s = backend_addr.to_string();
        // Each proxy of a pair is its own process, as each nginx is: node B
        // (the backend's) first, then node A pointing at it.
        let (relay_b, relay_b_addr) = node(&["relay", "127.0.0.5:0", &backend_s, &threads])?;
        let (relay_a, relay_a_addr) =
            node(&["relay", "127.0.0.1:0", &relay_b_addr.to_string(), &threads])?;

        let dir = TempDir(
            std::env::temp_dir().join(format!("sluice-bench-nginx-{}", std::process::id())),
        );
        std::fs::create_dir_all(&dir.0)?;
        let ca_dir = dir.0.join("ca");
        let ca_s = ca_dir.display().to_string();
        let (sluice_b, sluice_b_addr) = node(&["sluice-server", &backend_s, &ca_s, &threads])?;
        let (sluice_a, sluice_addr) = node(&[
            "sluice-client",
            &backend_s,
            &sluice_b_addr.to_string(),
            &ca_s,
            &threads,
        ])?;

        nginx_certs(&dir.0)?;
        let a_addr: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1")?).parse()?;
        let b_addr: SocketAddr = format!("127.0.0.4:{}", free_port("127.0.0.4")?).parse()?;
        let mut nginx_procs = Vec::new();
        for (name, listen, tls_in, up, tls_out) in [
            ("b", b_addr, true, backend_addr, false),
            ("a", a_addr, false, b_addr, true),
        ] {
            let conf = dir.0.join(format!("{name}.conf"));
            std::fs::write(&conf, nginx_conf(&dir.0, name, listen, tls_in, up, tls_out))?;
            let child = Command::new(&nginx)
                .arg("-p")
                .arg(&dir.0)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting nginx")?;
            nginx_procs.push(Proc {
                child,
                what: format!("nginx {name}"),
            });
            wait_listening(listen, &format!("nginx {name}"))?;
        }
        let url = |a: SocketAddr| format!("http://{a}/");
        Ok(Fleet {
            targets: vec![
                Target {
                    name: "direct",
                    url: url(backend_addr),
                    procs: vec![],
                    logs: vec![],
                },
                Target {
                    name: "TCP relay pair",
                    url: url(relay_a_addr),
                    procs: vec![relay_a, relay_b],
                    logs: vec![],
                },
                Target {
                    name: "Sluice pair (mTLS tunnel)",
                    url: url(sluice_addr),
                    procs: vec![sluice_a, sluice_b],
                    logs: vec![],
                },
                Target {
                    name: "nginx pair (TLS)",
                    url: url(a_addr),
                    procs: nginx_procs,
                    logs: vec![dir.0.join("a-error.log"), dir.0.join("b-error.log")],
                },
            ],
            backend,
            _dir: dir,
        })
    }
}

impl Fleet {
    /// Every process of the fleet (the backend and every proxy).
    fn pids(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.backend.pid()).chain(
            self.targets
                .iter()
                .flat_map(|t| t.procs.iter().map(Proc::pid)),
        )
    }

    /// Puts the fleet on the vCPUs `layout` gives it.
    fn apply(&self, layout: Layout) -> Result<()> {
        let set = match layout {
            Layout::Shared => cpu_set(0..online_cpus()),
            Layout::Isolated => cpu_set(1..online_cpus()),
        };
        self.pids().try_for_each(|pid| pin_process(pid, &set))
    }
}

/// CPU seconds (user + system) used so far by `pids`.
fn cpu_seconds(procs: &[Proc]) -> f64 {
    let tick = 100.0; // USER_HZ on Linux
    procs
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{}/stat", p.pid())).ok())
        .filter_map(|s| {
            // Fields after the `(comm)`; utime and stime are the 14th and 15th.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split(' ').collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / tick)
        })
        .sum()
}

struct Run {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// p50 and p99 minus the direct path's in the same round (filled in by
    /// `measure`).
    add50_ms: f64,
    add99_ms: f64,
    /// Each round's `add99_ms`, in round order (the medians' inputs).
    rounds_add99: Vec<f64>,
    requests: f64,
    cpu_s: f64,
}

fn oha(bin: &Path, target: &Target, args: &[&str], layout: Layout) -> Result<Run> {
    let before = cpu_seconds(&target.procs);
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .args(["--no-tui", "--output-format", "json", &target.url]);
    if layout == Layout::Isolated {
        let set = cpu_set([0]);
        // SAFETY: between fork and exec the closure makes one system call
        // (async-signal-safe) on a set computed before the fork.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(move || {
                if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().context("running oha")?;
    let cpu_s = cpu_seconds(&target.procs) - before;
    if !out.status.success() {
        bail!(
            "oha against {} failed: {}",
            target.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing oha's JSON")?;
    let ok: f64 = v["statusCodeDistribution"]["200"].as_f64().unwrap_or(0.0);
    // Requests cut by the end of the run are not failures.
    let errors: f64 = v["errorDistribution"].as_object().map_or(0.0, |m| {
        m.iter()
            .filter(|(k, _)| !k.contains("aborted due to deadline"))
            .filter_map(|(_, x)| x.as_f64())
            .sum()
    });
    if ok == 0.0 || errors > ok * 0.001 {
        let logs: String = target
            .logs
            .iter()
            .filter_map(|l| std::fs::read_to_string(l).ok())
            .collect();
        bail!(
            "{}: {ok} answers 200 and {errors} errors: {}\n{logs}",
            target.name,
            v["errorDistribution"]
        );
    }
    Ok(Run {
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50_ms: v["latencyPercentiles"]["p50"].as_f64().unwrap_or(0.0) * 1e3,
        p99_ms: v["latencyPercentiles"]["p99"].as_f64().unwrap_or(0.0) * 1e3,
        add50_ms: 0.0,
        add99_ms: 0.0,
        rounds_add99: Vec::new(),
        requests: ok,
        cpu_s,
    })
}

/// Runs every target `rounds` times, interleaved (so that a noisy moment on
/// this shared machine hits all of them alike), and keeps each figure's
/// median.
fn measure(
    bin: &Path,
    fleet: &Fleet,
    args: &[&str],
    rounds: usize,
    what: &str,
    layout: Layout,
) -> Result<Vec<Run>> {
    fleet.apply(layout)?;
    let mut all: Vec<Vec<Run>> = fleet.targets.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, t) in fleet.targets.iter().enumerate() {
            eprintln!("  round {}/{rounds}: {} {what}", round + 1, t.name);
            let mut r = oha(bin, t, args, layout)?;
            // Target 0 is the direct path: differences within one round
            // cancel the machine's slow drift.
            if let Some(direct) = all[0].last().filter(|_| i > 0) {
                r.add50_ms = r.p50_ms - direct.p50_ms;
                r.add99_ms = r.p99_ms - direct.p99_ms;
            }
            all[i].push(r);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    Ok(all
        .into_iter()
        .map(|runs| Run {
            rps: median(runs.iter().map(|r| r.rps).collect()),
            p50_ms: median(runs.iter().map(|r| r.p50_ms).collect()),
            p99_ms: median(runs.iter().map(|r| r.p99_ms).collect()),
            add50_ms: median(runs.iter().map(|r| r.add50_ms).collect()),
            add99_ms: median(runs.iter().map(|r| r.add99_ms).collect()),
            rounds_add99: runs.iter().map(|r| r.add99_ms).collect(),
            // CPU per request is kept as the median ratio.
            requests: 1000.0,
            cpu_s: median(
                runs.iter()
                    .map(|r| r.cpu_s / (r.requests / 1000.0))
                    .collect(),
            ),
        })
        .collect())
}

fn warm_up(bin: &Path, fleet: &Fleet) -> Result<()> {
    for t in &fleet.targets {
        oha(bin, t, &["-z", "1s", "-c", "8"], Layout::Shared)?;
    }
    Ok(())
}

/// Added p50/p99 latency at a fixed 1,000 requests/s, and CPU per 1,000
/// requests: first with the load generator on a vCPU of its own (the
/// figures the targets are judged on), then with every process sharing every
/// vCPU.
pub fn latency(quick: bool) -> Result<()> {
    let bin = ensure_oha()?;
    let threads = pair_threads();
    let fleet = Fleet::start(threads)?;
    warm_up(&bin, &fleet)?;
    let (secs, rounds) = if quick { ("3s", 1) } else { ("10s", 7) };
    let args = ["-z", secs, "-q", "1000", "--latency-correction", "-c", "16"];
    let isolated = if online_cpus() >= 2 {
        Some(measure(
            &bin,
            &fleet,
            &args,
            rounds,
            "at 1,000 rps, oha on vCPU 0",
            Layout::Isolated,
        )?)
    } else {
        None
    };
    let shared = measure(
        &bin,
        &fleet,
        &args,
        rounds,
        "at 1,000 rps, vCPUs shared",
        Layout::Shared,
    )?;
    let mut s = Section::new(
        "proxy-latency",
        "Node proxy: added latency at 1,000 requests/s",
    );
    s.line(format!(
        "oha `-z {secs} -q 1000 --latency-correction -c 16`, HTTP/1.1 GET with {BODY}-byte response \
         bodies, all on loopback on this machine ({} vCPU). {rounds} rounds, each running every \
         path in turn; the tables show medians. Added latency = the path's percentile minus the \
         direct connection's in the same round. CPU = user+system seconds of the pair's \
         process(es) per 1,000 requests (/proc/<pid>/stat), so 0.25 means 0.25 vCPU at 1,000 rps. \
         {}\n",
        online_cpus(),
        pairs(threads)
    ));
    s.line(NOISE);
    match &isolated {
        Some(runs) => {
            s.line(
                "**Load generator on a vCPU of its own** (oha pinned to vCPU 0, the backend and \
                 every proxy to the others, `sched_setaffinity`): the proxies never wait for \
                 oha's threads, so the tail is the path's own. This is how load generators are \
                 run when a proxy is measured, and the targets are judged here.\n",
            );
            latency_table(&mut s, &fleet, runs, true);
        }
        None => {
            s.line(
                "This machine has one vCPU: the load generator cannot run apart from the \
                 proxies, so the targets are judged on the shared table.\n",
            );
        }
    }
    s.line(
        "**Every process on every vCPU** (no pinning; oha's threads compete with the proxies, \
         which widens every path's tail): shown for comparison.\n",
    );
    latency_table(&mut s, &fleet, &shared, isolated.is_none());
    s.write()
}

/// One table of [`latency`], with the verdicts when `judge`.
fn latency_table(s: &mut Section, fleet: &Fleet, runs: &[Run], judge: bool) {
    let relay_p99 = runs[1].add99_ms;
    let cpu = |r: &Run| r.cpu_s / (r.requests / 1000.0);
    let mut rows = Vec::new();
    for (t, r) in fleet.targets.iter().zip(runs) {
        let pair = !t.procs.is_empty();
        rows.push(vec![
            t.name.to_string(),
            format!("{:.3}", r.p50_ms),
            format!("{:.3}", r.p99_ms),
            format!("{:.3}", r.add50_ms),
            format!("{:.3}", r.add99_ms),
            if pair && relay_p99 > 0.0 {
                ratio(r.add99_ms, relay_p99)
            } else {
                "–".into()
            },
            if pair {
                format!("{:.3}", cpu(r))
            } else {
                "–".into()
            },
        ]);
    }
    s.table(
        &[
            "path",
            "p50 ms",
            "p99 ms",
            "added p50 ms",
            "added p99 ms",
            "added p99 / TCP relay pair",
            "CPU s per 1k req",
        ],
        &rows,
    );
    let (sluice, nginx) = (&runs[2], &runs[3]);
    let ratio_p99 = if relay_p99 > 0.0 {
        format!("{}x", ratio(sluice.add99_ms, relay_p99))
    } else {
        "n/a".into()
    };
    // Round by round, how far the one ratio above can move on this machine.
    let mut per_round: Vec<f64> = sluice
        .rounds_add99
        .iter()
        .zip(&runs[1].rounds_add99)
        .filter(|(_, relay)| **relay > 0.0)
        .map(|(sl, relay)| sl / relay)
        .collect();
    per_round.sort_by(|a, b| a.total_cmp(b));
    let spread = match (per_round.first(), per_round.last()) {
        (Some(lo), Some(hi)) if per_round.len() > 1 => format!(
            " Round by round (each round's Sluice figure over its relay figure): from {lo:.2}x \
             to {hi:.2}x, median {:.2}x, at most 2x in {} of {} rounds.",
            per_round[per_round.len() / 2],
            per_round.iter().filter(|r| **r <= 2.0).count(),
            per_round.len()
        ),
        _ => String::new(),
    };
    if !judge {
        s.line(format!(
            "Here Sluice's added p99 is {ratio_p99} the relay pair's, {:.3} ms against the nginx \
             pair's {:.3} ms.{spread}\n",
            sluice.add99_ms, nginx.add99_ms
        ));
        return;
    }
    s.line(format!(
        "Targets: Sluice's added p99 at most 2x the relay pair's: {ratio_p99} ({}).{spread} Both \
         Sluice proxies at most 0.25 vCPU per 1,000 rps: {:.3} ({}). Tail latency ahead of the \
         nginx pair: {:.3} ms vs {:.3} ms added p99 ({}).\n",
        verdict(sluice.add99_ms <= 2.0 * relay_p99.max(0.0)),
        cpu(sluice),
        verdict(cpu(sluice) <= 0.25),
        sluice.add99_ms,
        nginx.add99_ms,
        verdict(sluice.add99_ms < nginx.add99_ms),
    ));
}

/// Maximum requests per second through each path, and CPU per 1,000 requests
/// at that rate.
pub fn throughput(quick: bool) -> Result<()> {
    let bin = ensure_oha()?;
    let threads = pair_threads();
    let fleet = Fleet::start(threads)?;
    warm_up(&bin, &fleet)?;
    let (secs, rounds) = if quick { ("3s", 1) } else { ("10s", 3) };
    let args = ["-z", secs, "-c", "64"];
    let runs = measure(&bin, &fleet, &args, rounds, "at full speed", Layout::Shared)?;
    let mut rows = Vec::new();
    for (t, r) in fleet.targets.iter().zip(&runs) {
        rows.push(vec![
            t.name.to_string(),
            format!("{:.0}", r.rps),
            ratio(r.rps, runs[0].rps),
            format!("{:.3}", r.p99_ms),
            if t.procs.is_empty() {
                "–".into()
            } else {
                format!("{:.3}", r.cpu_s / (r.requests / 1000.0))
            },
        ]);
    }
    let mut s = Section::new(
        "proxy-throughput",
        "Node proxy: maximum requests per second",
    );
    s.line(format!(
        "oha `-z {secs} -c 64`, HTTP/1.1 GET with {BODY}-byte response bodies on loopback; {rounds} \
         interleaved rounds, medians. {} The load generator, the backend and the proxies share \
         this machine's vCPUs, so these are ratios between paths more than absolute capacities.\n",
        pairs(threads)
    ));
    s.line(NOISE);
    s.table(
        &[
            "path",
            "requests/s",
            "vs direct",
            "p99 ms",
            "CPU s per 1k req",
        ],
        &rows,
    );
    s.line(format!(
        "Target: ahead of the nginx pair on throughput: {:.0} vs {:.0} requests/s, {}x ({}); and on \
         tail latency at full speed: {:.3} ms vs {:.3} ms p99 ({}).\n",
        runs[2].rps,
        runs[3].rps,
        ratio(runs[2].rps, runs[3].rps),
        verdict(runs[2].rps > runs[3].rps),
        runs[2].p99_ms,
        runs[3].p99_ms,
        verdict(runs[2].p99_ms < runs[3].p99_ms)
    ));
    s.write()
}

/// How the pairs are run, for the reports.
fn pairs(threads: usize) -> String {
    format!(
        "Every proxy is a process of its own: each relay and each Sluice proxy a tokio runtime \
         with {threads} worker thread(s), each nginx a single-threaded process (`master_process \
         off`, TLS 1.3 with client certificates, upstream keepalive){}.",
        if threads == 1 {
            ", so every pair has the same two threads, as one proxy per node would on two nodes"
        } else {
            " (SLUICE_BENCH_PAIR_THREADS overrides the default of one)"
        }
    )
}

/// Worker threads of each relay and Sluice proxy process: one, like each
/// nginx, or `SLUICE_BENCH_PAIR_THREADS` to try another setting (the report
/// then says so).
fn pair_threads() -> usize {
    std::env::var("SLUICE_BENCH_PAIR_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1)
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// The child-process side: `backend ADDR`, `relay LISTEN TO THREADS`,
/// `sluice-server BACKEND CA_DIR THREADS` or `sluice-client BACKEND
/// SERVER_INBOUND CA_DIR THREADS`. Prints `READY <addr>` and serves until
/// killed.
pub fn proxy_node(args: &[String]) -> Result<()> {
    // The backend is shared by every path; the proxies get the thread count
    // the benchmark asks for (last argument).
    let threads = match args.first().map(String::as_str) {
        Some("backend") => 2,
        _ => args.last().and_then(|t| t.parse().ok()).unwrap_or(1),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let arg = |i: usize| -> Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("proxy-node {args:?}: argument {i} missing"))
    };
    rt.block_on(async move {
        match args.first().map(String::as_str) {
            Some("backend") => backend(arg(1)?.parse()?).await,
            Some("relay") => relay(arg(1)?.parse()?, arg(2)?.parse()?).await,
            Some("sluice-server") => sluice_node(arg(1)?.parse()?, None, Path::new(arg(2)?)).await,
            Some("sluice-client") => {
                sluice_node(arg(1)?.parse()?, Some(arg(2)?.parse()?), Path::new(arg(3)?)).await
            }
            other => bail!("unknown proxy-node mode {other:?}"),
        }
    })
}

fn ready(addr: SocketAddr) {
    use std::io::Write as _;
    let mut out = std::io::stdout();
    let _ = writeln!(out, "READY {addr}");
    let _ = out.flush();
}

async fn backend(addr: SocketAddr) -> Result<()> {
    use http_body_util::Full;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    ready(listener.local_addr()?);
    let body = bytes::Bytes::from(vec![b'x'; BODY]);
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| {
                let b = body.clone();
                async move { Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(b))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// One TCP relay: a minimal copy loop.
async fn relay(listen: SocketAddr, to: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    ready(listener.local_addr()?);
    loop {
        let (mut down, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(mut up) = tokio::net::TcpStream::connect(to).await else {
                return;
            };
            let _ = (down.set_nodelay(true), up.set_nodelay(true));
            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
        });
    }
}

/// Every captured connection was going to the service VIP.
struct ToVip(SocketAddr);

impl l7_proxy::OriginalDst for ToVip {
    fn lookup(&self, _peer: SocketAddr, _local: SocketAddr) -> Option<SocketAddr> {
        Some(self.0)
    }
}

/// One Sluice proxy: node B (the backend's, `server_inbound` `None`, on
/// 127.0.0.3; it creates the CA in `ca_dir` and prints its tunnel address), or
/// node A (the client's, on 127.0.0.1; it loads the same CA and prints its
/// capture address).
async fn sluice_node(
    backend: SocketAddr,
    server_inbound: Option<SocketAddr>,
    ca_dir: &Path,
) -> Result<()> {
    use certs::{Ca, CaOptions, IdentityManager, IdentityOptions, SystemClock};
    use l7_proxy::{
        Proxy, ProxySettings, Snapshot,
        config::{Endpoint, LocalWorkload, MtlsMode, ObjectRef, Service, ServicePort},
    };
    let clock = Arc::new(SystemClock);
    let ca = Arc::new(Ca::open_or_create(
        ca_dir,
        CaOptions::default(),
        clock.clone(),
    )?);
    let client: certs::SpiffeId = "spiffe://cluster.local/ns/bench/sa/client".parse()?;
    let server: certs::SpiffeId = "spiffe://cluster.local/ns/bench/sa/server".parse()?;
    let vip: SocketAddr = "127.96.0.1:80".parse()?;
    let (ip, id, workload_ip, name) = match server_inbound {
        None => ("127.0.0.3", &server, backend.ip(), "backend"),
        Some(_) => ("127.0.0.1", &client, "127.0.0.1".parse()?, "client"),
    };
    let ids = IdentityManager::new(ca.clone(), ca.bundle(), clock, IdentityOptions::default());
    ids.set_identities([id.clone()]).await?;
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
    let settings = ProxySettings {
        outbound_addr: format!("{ip}:0").parse()?,
        inbound_addr: format!("{ip}:0").parse()?,
        ..ProxySettings::default()
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let proxy = Proxy::builder(settings, rx, Arc::new(ids), Arc::new(ToVip(vip)))
        .start(&mut registry)
        .await?;
    let snapshot = Snapshot {
        services: vec![Service {
            id: ObjectRef::new("bench", "backend"),
            vips: vec![vip.ip()],
            ports: vec![ServicePort {
                port: vip.port(),
                target_port: backend.port(),
                app_protocol: Some("http".into()),
            }],
            endpoints: vec![Endpoint {
                ip: backend.ip(),
                ready: true,
                workload: Some(ObjectRef::new("bench", "backend")),
                node_proxy: Some(server_inbound.unwrap_or(proxy.inbound_addr())),
                identity: Some(server.clone()),
                ports: Default::default(),
                unready_ports: Vec::new(),
            }],
            affinity_timeout_s: None,
        }],
        local_workloads: vec![LocalWorkload {
            ip: workload_ip,
            id: ObjectRef::new("bench", name),
            service_account: id.service_account().into(),
            identity: id.clone(),
            mtls_mode: MtlsMode::Strict,
            selected_by: Vec::new(),
        }],
        ..Snapshot::default()
    };
    tx.send_replace(Arc::new(snapshot.clone()));
    while proxy.snapshot().local_workloads != snapshot.local_workloads {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ready(match server_inbound {
        None => proxy.inbound_addr(),
        Some(_) => proxy.outbound_addr(),
    });
    std::future::pending::<()>().await;
    Ok(())
}
