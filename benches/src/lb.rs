//! Kernel load balancer benchmarks: the per-call cost of `connect4` as the
//! service table grows, and new connections per second through socket LB
//! against a direct connect and against iptables DNAT (kube-proxy's way).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use ebpf_lb::{Backend, Change, Frontend, LoadBalancer, ServiceSpec};
use integration::{cgroup::TestCgroup, lb::TestLb, netns::TestNetns, require_root};

use crate::report::{Section, ratio};

/// The `i`-th of many distinct frontends: 127.96.0.0/16 addresses, then
/// further ports.
fn frontend(i: usize, proto_udp: bool) -> Frontend {
    let n = i % 65_024;
    let ip = Ipv4Addr::new(127, 96, (n / 254) as u8, (n % 254 + 1) as u8);
    let vip = SocketAddr::new(ip.into(), 1000 + (i / 65_024) as u16);
    if proto_udp {
        Frontend::udp(vip)
    } else {
        Frontend::tcp(vip)
    }
}

fn load_services(
    lb: &LoadBalancer,
    n: usize,
    spec_of: impl Fn(usize) -> ServiceSpec,
) -> Result<()> {
    let mut batch = Vec::with_capacity(5000);
    for i in 0..n {
        batch.push(Change::Upsert(spec_of(i)));
        if batch.len() == 5000 || i + 1 == n {
            lb.apply(&batch)?;
            batch.clear();
        }
    }
    Ok(())
}

fn connect4_stats(lb: &LoadBalancer) -> Result<(u64, Duration)> {
    let s = lb.program_stats()?;
    let c = s
        .iter()
        .find(|p| p.program == "sluice_connect4")
        .context("connect4 stats")?;
    Ok((c.run_count, c.run_time))
}

/// Runs this binary's connect driver inside `cg`.
fn drive(cg: &TestCgroup, ns: Option<&TestNetns>, args: &[String]) -> Result<String> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("__drive")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cg.spawn_into(&mut cmd);
    if let Some(ns) = ns {
        ns.spawn_into(&mut cmd)?;
    }
    let out = cmd.output().context("running the connect driver")?;
    if !out.status.success() {
        bail!("connect driver failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Cost of `connect4` per call at several service-table sizes.
pub fn connect4_cost(quick: bool) -> Result<()> {
    require_root();
    let sizes: &[usize] = if quick {
        &[100, 10_000]
    } else {
        &[100, 10_000, 100_000]
    };
    let calls: usize = if quick { 50_000 } else { 300_000 };
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics")?;
    let mut rows = Vec::new();
    let mut base = None;
    for &n in sizes {
        let cg = TestCgroup::new("bench")?;
        let mut opts = integration::lb::test_options();
        opts.max_services = (n + 16) as u32;
        opts.max_backends = (2 * n + 64) as u32;
        opts.max_sockets = 65_536;
        let lb = TestLb::attach_with(&cg, opts)?;
        let backends = [
            Backend::ready("127.0.0.1:9".parse()?),
            Backend::ready("127.0.0.1:10".parse()?),
        ];
        let t = Instant::now();
        load_services(&lb, n, |i| ServiceSpec::new(frontend(i, true), backends))?;
        let load = t.elapsed();

        // Connected UDP sockets: connect() runs the same lookup, backend
        // choice and reverse-translation note as a TCP connect, without a
        // handshake to pay for.
        // Two working sets: 100 hot services, and 1000 spread over the table.
        let pick = |k: usize| -> Vec<String> {
            (0..k)
                .map(|_| frontend(rand::random_range(0..n), true).vip.to_string())
                .collect()
        };
        let (hot, spread) = (pick(100), pick(1000));
        let misses: Vec<String> = (0..1000)
            .map(|i| format!("127.97.{}.{}:53", i / 250, i % 250 + 1))
            .collect();
        let cost = |targets: &[String]| -> Result<f64> {
            let before = connect4_stats(&lb)?;
            let mut args = vec!["udp-connect".to_string(), calls.to_string()];
            args.extend_from_slice(targets);
            drive(&cg, None, &args)?;
            let after = connect4_stats(&lb)?;
            let runs = after.0 - before.0;
            Ok((after.1 - before.1).as_nanos() as f64 / runs.max(1) as f64)
        };
        let hot = cost(&hot)?;
        let spread = cost(&spread)?;
        let miss = cost(&misses)?;
        let (b_hot, b_spread) = *base.get_or_insert((hot, spread));
        rows.push(vec![
            n.to_string(),
            format!("{hot:.0}"),
            ratio(hot, b_hot),
            format!("{spread:.0}"),
            ratio(spread, b_spread),
            format!("{miss:.0}"),
            format!("{:.2}", load.as_secs_f64()),
        ]);
    }
    let mut s = Section::new("lb-connect4", "Kernel: cost of connect4 per call");
    s.line(format!(
        "In-kernel run time of the `connect4` program per call (`BPF_ENABLE_STATS`, run_time_ns / \
         run_cnt) over {calls} connects (connected UDP sockets: the same lookup, backend choice \
         and reverse-translation note as TCP, without a handshake) from a test cgroup, at each \
         table size, with two working sets: 100 services chosen at random (hot), and 1000 \
         (spread). Ratios are to the 100-service table of the same run. A connect to an address \
         that is not a service (one hash miss) is shown for scale. Every service has the same two \
         backends and one socket reconnects from target to target, so each connect also rewrites \
         that socket's reverse-translation entry for the backend (its VIP changed): the worst \
         case. The first connect of a new socket only adds its entry. Target: under 1 µs, flat.\n"
    ));
    s.table(
        &[
            "services",
            "ns/call, 100 hot",
            "ratio",
            "ns/call, 1000 spread",
            "ratio",
            "ns/call, not a service",
            "table load (s)",
        ],
        &rows,
    );
    s.write()
}

/// Echo backend for the connection-rate benchmark: answers 16 bytes per
/// connection. Runs `threads` accept loops.
struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl EchoServer {
    fn start(listener: TcpListener, threads: usize, cpu: Option<usize>) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = Arc::new(listener);
        let handles = (0..threads)
            .map(|_| {
                let (l, s) = (listener.clone(), stop.clone());
                thread::spawn(move || {
                    if let Some(c) = cpu {
                        crate::pin::pin_current_thread(c);
                    }
                    let mut buf = [0u8; 64];
                    while !s.load(Ordering::Relaxed) {
                        let mut p = libc::pollfd {
                            fd: l.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd.
                        if unsafe { libc::poll(&mut p, 1, 100) } <= 0 {
                            continue;
                        }
                        let Ok((mut c, _)) = l.accept() else { continue };
                        if let Ok(n) = c.read(&mut buf) {
                            let _ = c.write_all(&buf[..n]);
                        }
                        let _ = c.read(&mut buf);
                    }
                })
            })
            .collect();
        listener.set_nonblocking(true)?;
        Ok(Self {
            stop,
            threads: handles,
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// kube-proxy-style iptables rules for `n` services, all to `backend`.
fn iptables_rules(n: usize, vip: impl Fn(usize) -> SocketAddr, backend: SocketAddr) -> String {
    let mut s = String::from("*nat\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..n {
        s.push_str(&format!(":KUBE-SVC-{i} - [0:0]\n:KUBE-SEP-{i} - [0:0]\n"));
    }
    s.push_str("-A OUTPUT -j KUBE-SERVICES\n");
    for i in 0..n {
        let v = vip(i);
        s.push_str(&format!(
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport {} -j KUBE-SVC-{i}\n",
            v.ip(),
            v.port()
        ));
        s.push_str(&format!("-A KUBE-SVC-{i} -j KUBE-SEP-{i}\n"));
        s.push_str(&format!(
            "-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {backend}\n"
        ));
    }
    s.push_str("COMMIT\n");
    s
}

/// New connections per second: direct, socket LB, iptables DNAT.
pub fn connection_rate(quick: bool) -> Result<()> {
    require_root();
    if Command::new("sh")
        .args(["-c", "command -v iptables-restore"])
        .output()?
        .stdout
        .is_empty()
    {
        bail!("iptables-restore is missing: `cargo xtask bench` installs the iptables package");
    }
    let n: usize = if quick { 1000 } else { 10_000 };
    let secs = if quick { 1 } else { 3 };
    let rounds = if quick { 1 } else { 5 };

    // Everything happens inside a namespace of our own: a veth pair whose one
    // end carries the backend address, and a route for the VIP range to it.
    // Two identical namespaces: one as a Sluice node (no service rules at
    // all), one as a kube-proxy node (the iptables rules). A node running
    // kube-proxy makes every new connection, even one to a pod address, walk
    // its nat chain: the "direct" row there shows that cost.
    let node = |prefix: &str| -> Result<TestNetns> {
        let ns = TestNetns::new(prefix)?;
        ns.ip(&["link", "add", "s0", "type", "veth", "peer", "name", "s1"])?;
        ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "s0"])?;
        ns.ip(&["link", "set", "s0", "up"])?;
        ns.ip(&["link", "set", "s1", "up"])?;
        ns.ip(&["route", "add", "10.96.0.0/12", "dev", "s0"])?;
        Ok(ns)
    };
    let ns = node("bch")?;
    let kp = node("bkp")?;
    let backend: SocketAddr = "10.0.0.1:8080".parse()?;
    let vip = |i: usize| {
        SocketAddr::new(
            Ipv4Addr::new(10, 96, (i / 250) as u8, (i % 250 + 1) as u8).into(),
            80,
        )
    };

    let root = TestCgroup::new("bench")?;
    let lb_cg = root.child("lb")?;
    let plain_cg = root.child("plain")?;
    let mut opts = integration::lb::test_options();
    opts.max_services = (n + 16) as u32;
    opts.max_backends = (n + 64) as u32;
    opts.max_sockets = 262_144;
    let lb = TestLb::attach_with(&lb_cg, opts)?;
    load_services(&lb, n, |i| {
        ServiceSpec::new(Frontend::tcp(vip(i)), [Backend::ready(backend)])
    })?;

    let rules = iptables_rules(n, vip, backend);
    let mut child = Command::new("ip")
        .args(["netns", "exec", kp.name(), "iptables-restore"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running iptables-restore")?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(rules.as_bytes())?;
    if !child.wait()?.success() {
        bail!("iptables-restore failed");
    }

    // The VIP in the middle of the list: the average iptables case.
    let target = vip(n / 2);
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    // Pinned: client and server on one vCPU, so no cross-CPU wakeups blur
    // the figures; unpinned: as the scheduler places them.
    for (placement, cpu, threads) in [("one vCPU", Some(0usize), 1), ("unpinned", None, 2)] {
        let listener = ns.run(|| TcpListener::bind(backend))??;
        let server = EchoServer::start(listener, threads, cpu)?;
        let kp_listener = kp.run(|| TcpListener::bind(backend))??;
        let kp_server = EchoServer::start(kp_listener, threads, cpu)?;
        let run = |cg: &TestCgroup, netns: &TestNetns, to: SocketAddr| -> Result<f64> {
            let mut args = vec!["tcp-rate".to_string(), to.to_string(), secs.to_string()];
            if let Some(c) = cpu {
                args.push(c.to_string());
            }
            let out = drive(cg, Some(netns), &args)?;
            out.parse::<f64>()
                .with_context(|| format!("driver printed {out:?}"))
        };
        let mut results = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        // Warm up (page cache, conntrack, first-run costs) before measuring.
        run(&plain_cg, &ns, backend)?;
        run(&plain_cg, &kp, target)?;
        for round in 0..rounds {
            // Rotate the order so no mode always runs first.
            for k in 0..4 {
                let mode = (round + k) % 4;
                let r = match mode {
                    0 => run(&plain_cg, &ns, backend)?,
                    1 => run(&lb_cg, &ns, target)?,
                    2 => run(&plain_cg, &kp, target)?,
                    _ => run(&plain_cg, &kp, backend)?,
                };
                results[mode].push(r);
            }
        }
        drop(kp_server);
        drop(server);
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let [mut dv, mut lv, mut iv, mut kv] = results;
        let (d, l, i, k) = (
            median(&mut dv),
            median(&mut lv),
            median(&mut iv),
            median(&mut kv),
        );
        let row = |path: String, v: f64| {
            vec![placement.to_string(), path, format!("{v:.0}"), ratio(v, d)]
        };
        rows.push(row("direct to backend (limit)".into(), d));
        rows.push(row(format!("Sluice socket LB, {n} services"), l));
        rows.push(row(format!("iptables DNAT, {n} services"), i));
        rows.push(row(
            format!("direct, on the node with {n} iptables services"),
            k,
        ));
        summary.push(format!(
            "{placement}: socket LB / iptables DNAT = {}",
            ratio(l, i)
        ));
    }
    let mut s = Section::new(
        "lb-connrate",
        "Kernel: new connections per second through a VIP",
    );
    s.line(format!(
        "One client process in a test namespace opens connections in a loop for {secs} s \
         (connect, 16-byte request, 16-byte echo, close with RST), to a backend on a veth \
         address in the same namespace; median of {rounds} rounds, modes interleaved in \
         rotating order. Two identical namespaces stand for two nodes: a Sluice node with \
         {n} services in the socket LB maps and no service rules, and a kube-proxy node with \
         the same {n} services as kube-proxy-style iptables (nf_tables backend) rules; the VIP \
         used sits in the middle of the rule list. On the kube-proxy node every new \
         connection walks the nat chain, even one addressed to a pod (last row). Load average at the end: {}. Targets: socket LB at least 0.95 of \
         direct, and ahead of iptables DNAT.\n",
        crate::pin::load_average()
    ));
    s.table(
        &["placement", "path", "connections/s", "ratio to direct"],
        &rows,
    );
    s.line(format!("{}.\n", summary.join("; ")));
    s.write()
}

/// The child-process side: `udp-connect COUNT TARGET...` and
/// `tcp-rate ADDR SECS`.
pub fn driver(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("udp-connect") => {
            let count: usize = args[1].parse()?;
            let targets: Vec<SocketAddr> = args[2..]
                .iter()
                .map(|t| t.parse())
                .collect::<Result<_, _>>()?;
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            for i in 0..count {
                // Each connect() on the same socket re-runs connect4.
                let _ = sock.connect(targets[i % targets.len()]);
            }
            Ok(())
        }
        Some("tcp-rate") => {
            let to: SocketAddr = args[1].parse()?;
            let secs: u64 = args[2].parse()?;
            if let Some(cpu) = args.get(3) {
                crate::pin::pin_current_thread(cpu.parse()?);
            }
            let deadline = Instant::now() + Duration::from_secs(secs);
            let start = Instant::now();
            let mut done = 0u64;
            let mut buf = [0u8; 16];
            while Instant::now() < deadline {
                let mut c = TcpStream::connect(to)?;
                c.write_all(&[7u8; 16])?;
                c.read_exact(&mut buf)?;
                // RST on close: no TIME_WAIT pile-up in a tight loop.
                let sock = socket2::SockRef::from(&c);
                sock.set_linger(Some(Duration::ZERO))?;
                drop(c);
                done += 1;
            }
            println!("{}", done as f64 / start.elapsed().as_secs_f64());
            Ok(())
        }
        Some("hold-tcp") => crate::reset::hold(&args[1..]),
        other => bail!("unknown driver {other:?}"),
    }
}
