//! Time from a backend removal to the last socket pinned to it being reset,
//! with many open sockets on the node.

use std::{
    io::Read as _,
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use ebpf_lb::{Backend, Change, Frontend, ServiceSpec};
use integration::{cgroup::TestCgroup, lb::TestLb, require_root, unique_name};

use crate::report::{Section, ratio};

/// Raises the open-files limit to its hard maximum; the run needs two
/// descriptors per connection (client and server side).
fn raise_nofile(need: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit struct to fill and then apply.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("raising RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
        }
    }
    if lim.rlim_cur < need {
        bail!(
            "RLIMIT_NOFILE is capped at {}; this run needs {need}",
            lim.rlim_cur
        );
    }
    Ok(())
}

/// Listeners that accept and hold every connection.
struct Holders {
    addrs: Vec<SocketAddr>,
    held: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Holders {
    fn start(n: usize) -> Result<Self> {
        let listeners: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let addrs = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<Result<_, _>>()?;
        for l in &listeners {
            l.set_nonblocking(true)?;
        }
        let held = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (held.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let mut any = false;
                for l in &listeners {
                    while let Ok((c, _)) = l.accept() {
                        h.lock().unwrap().push(c);
                        any = true;
                    }
                }
                if !any {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        });
        Ok(Self {
            addrs,
            held,
            stop,
            thread: Some(thread),
        })
    }

    fn count(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn reset_time(quick: bool) -> Result<()> {
    require_root();
    let sockets: usize = if quick { 2_000 } else { 10_000 };
    raise_nofile(sockets as u64 + 1024)?;
    let backends = 100;
    let cg = TestCgroup::new("bench")?;
    let mut opts = integration::lb::test_options();
    opts.max_sockets = 65_536;
    let lb = TestLb::attach_with(&cg, opts)?;
    let holders = Holders::start(backends + 1)?;
    let vip = SocketAddr::new(integration::lb::random_vip().into(), 80);
    let fe = Frontend::tcp(vip);
    let spec = |drop: &[usize]| {
        ServiceSpec::new(
            fe,
            holders
                .addrs
                .iter()
                .enumerate()
                .filter(|(i, _)| !drop.contains(i))
                .map(|(_, a)| Backend::ready(*a)),
        )
    };
    // Backend 100 takes no connections: it is added after the sockets open.
    lb.upsert_service(&spec(&[backends]))?;

    let dir = std::env::temp_dir().join(unique_name("rst"));
    std::fs::create_dir_all(&dir)?;
    let (ready, stop) = (dir.join("ready"), dir.join("stop"));
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "__drive",
        "hold-tcp",
        &vip.to_string(),
        &sockets.to_string(),
    ])
    .arg(&ready)
    .arg(&stop)
    .stdout(Stdio::piped());
    cg.spawn_into(&mut cmd);
    let child = cmd.spawn().context("starting the socket holder")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(ready.exists() && holders.count() == sockets) {
        if Instant::now() > deadline {
            bail!("only {} of {sockets} connections came up", holders.count());
        }
        thread::sleep(Duration::from_millis(10));
    }
    lb.upsert_service(&spec(&[]))?;

    // Baseline: removing the backend that has no connections (barrier, and a
    // sock_diag pass over all the node's sockets that finds nothing).
    let t = Instant::now();
    let base_report = lb.apply(&[Change::Upsert(spec(&[backends]))])?;
    let base = t.elapsed();
    assert_eq!(base_report.reset.destroyed, 0);
    // One backend, about 1% of the sockets.
    let t = Instant::now();
    let one = lb.apply(&[Change::Upsert(spec(&[backends, 0]))])?;
    let one_t = t.elapsed();
    // Half the backends at once.
    let half: Vec<usize> = (0..backends / 2).chain([backends]).collect();
    let t = Instant::now();
    let many = lb.apply(&[Change::Upsert(spec(&half))])?;
    let many_t = t.elapsed();

    std::fs::write(&stop, "")?;
    let out = child.wait_with_output()?;
    let _ = std::fs::remove_dir_all(&dir);
    let seen: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("holder output")?;
    let destroyed = one.reset.destroyed + many.reset.destroyed;
    if seen != destroyed {
        bail!("the client saw {seen} resets, the load balancer reports {destroyed}");
    }

    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    let mut s = Section::new(
        "lb-reset",
        "Kernel: time to reset sockets pinned to a removed backend",
    );
    s.line(format!(
        "{sockets} TCP connections held open from a test cgroup through one VIP to {backends} \
         backends. The time is the `apply()` call that removes backends: it returns once the \
         RCU barrier has passed and every pinned socket has been destroyed (sock_diag \
         `SOCK_DESTROY`), so it is the time from the removal call to the last reset. The client \
         process confirmed {seen} resets. Baseline: removing a backend with no connections in \
         the same run (barrier plus one pass over the node's sockets).\n"
    ));
    s.table(
        &["removal", "sockets reset", "time (ms)", "ratio to baseline"],
        &[
            vec![
                "backend without connections (baseline)".into(),
                "0".into(),
                ms(base),
                ratio(1.0, 1.0),
            ],
            vec![
                "1 backend".into(),
                one.reset.destroyed.to_string(),
                ms(one_t),
                ratio(one_t.as_secs_f64(), base.as_secs_f64()),
            ],
            vec![
                format!("{} backends", backends / 2),
                many.reset.destroyed.to_string(),
                ms(many_t),
                ratio(many_t.as_secs_f64(), base.as_secs_f64()),
            ],
        ],
    );
    s.write()
}

/// Child side: `hold-tcp VIP COUNT READY STOP` opens COUNT connections,
/// touches READY, waits for STOP, then prints how many were reset.
pub fn hold(args: &[String]) -> Result<()> {
    let to: SocketAddr = args[0].parse()?;
    let count: usize = args[1].parse()?;
    let (ready, stop) = (PathBuf::from(&args[2]), PathBuf::from(&args[3]));
    let mut conns = Vec::with_capacity(count);
    for _ in 0..count {
        conns.push(TcpStream::connect(to)?);
    }
    std::fs::write(&ready, "")?;
    while !stop.exists() {
        thread::sleep(Duration::from_millis(10));
    }
    let mut reset = 0;
    for c in &mut conns {
        c.set_nonblocking(true)?;
        let mut b = [0u8; 1];
        match c.read(&mut b) {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ECONNRESET) | Some(libc::ECONNABORTED)
                ) =>
            {
                reset += 1
            }
            _ => {}
        }
    }
    println!("{reset}");
    Ok(())
}
