//! Backends for tests: each answers with its own id, so a test can tell which
//! backend a connection or datagram reached, and counts what it served.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::netns::TestNetns;

/// Waits up to 100 ms for `fd` to become readable.
fn readable(fd: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, 100) > 0 }
}

/// A TCP server that writes `<id>\n` to each connection, then keeps it open
/// until the client closes it.
pub struct TcpBackend {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpBackend {
    /// Listens on `bind` (port 0: any free port) in the caller's namespace.
    pub fn start(bind: SocketAddr, id: &str) -> Result<Self> {
        let listener =
            TcpListener::bind(bind).with_context(|| format!("binding test backend {bind}"))?;
        Self::serve(listener, id)
    }

    /// Listens on `bind` inside `ns`.
    pub fn start_in(ns: &TestNetns, bind: SocketAddr, id: &str) -> Result<Self> {
        let listener = ns
            .run(|| TcpListener::bind(bind))?
            .with_context(|| format!("binding test backend {bind} in {}", ns.name()))?;
        Self::serve(listener, id)
    }

    fn serve(listener: TcpListener, id: &str) -> Result<Self> {
        let addr = listener.local_addr()?;
        let hits = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s, id) = (hits.clone(), stop.clone(), format!("{id}\n"));
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if !readable(listener.as_raw_fd()) {
                    continue;
                }
                let Ok((conn, _)) = listener.accept() else {
                    continue;
                };
                h.fetch_add(1, Ordering::Relaxed);
                let id = id.clone();
                let s = s.clone();
                thread::spawn(move || serve_conn(conn, &id, &s));
            }
        });
        Ok(Self {
            addr,
            hits,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

fn serve_conn(mut conn: TcpStream, id: &str, stop: &AtomicBool) {
    if conn.write_all(id.as_bytes()).is_err() {
        return;
    }
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP server that answers each datagram: by default with its id, or with
/// what a handler returns.
pub struct UdpBackend {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

type Handler = Box<dyn Fn(&[u8]) -> Option<Vec<u8>> + Send>;

impl UdpBackend {
    pub fn start(bind: SocketAddr, id: &str) -> Result<Self> {
        let sock = UdpSocket::bind(bind).with_context(|| format!("binding udp backend {bind}"))?;
        let id = id.as_bytes().to_vec();
        Self::serve(sock, Box::new(move |_| Some(id.clone())))
    }

    pub fn start_in(ns: &TestNetns, bind: SocketAddr, id: &str) -> Result<Self> {
        let sock = ns
            .run(|| UdpSocket::bind(bind))?
            .with_context(|| format!("binding udp backend {bind} in {}", ns.name()))?;
        let id = id.as_bytes().to_vec();
        Self::serve(sock, Box::new(move |_| Some(id.clone())))
    }

    /// Serves with `handler` inside `ns` (for example a DNS responder).
    pub fn start_with(
        ns: Option<&TestNetns>,
        bind: SocketAddr,
        handler: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static,
    ) -> Result<Self> {
        let sock = match ns {
            Some(ns) => ns.run(|| UdpSocket::bind(bind))?,
            None => UdpSocket::bind(bind),
        }
        .with_context(|| format!("binding udp backend {bind}"))?;
        Self::serve(sock, Box::new(handler))
    }

    fn serve(sock: UdpSocket, handler: Handler) -> Result<Self> {
        let addr = sock.local_addr()?;
        let hits = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (hits.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                if !readable(sock.as_raw_fd()) {
                    continue;
                }
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                h.fetch_add(1, Ordering::Relaxed);
                if let Some(reply) = handler(&buf[..n]) {
                    let _ = sock.send_to(&reply, from);
                }
            }
        });
        Ok(Self {
            addr,
            hits,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A minimal DNS responder: answers every A question for `name` with `ip`,
/// anything else with NXDOMAIN.
pub fn dns_a_responder(
    name: &str,
    ip: std::net::Ipv4Addr,
) -> impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static {
    let want = name.trim_end_matches('.').to_ascii_lowercase();
    move |q: &[u8]| {
        if q.len() < 12 {
            return None;
        }
        // Question name, starting at byte 12.
        let mut i = 12;
        let mut labels = Vec::new();
        while i < q.len() && q[i] != 0 {
            let len = q[i] as usize;
            labels.push(String::from_utf8_lossy(q.get(i + 1..i + 1 + len)?).to_ascii_lowercase());
            i += 1 + len;
        }
        let qtype = u16::from_be_bytes([*q.get(i + 1)?, *q.get(i + 2)?]);
        let question_end = i + 5;
        let question = q.get(12..question_end)?;
        let hit = labels.join(".") == want && qtype == 1;
        let mut r = Vec::with_capacity(question_end + 16);
        r.extend_from_slice(&q[0..2]); // id
        r.extend_from_slice(&[0x81, if hit { 0x80 } else { 0x83 }]); // response, RA, rcode
        r.extend_from_slice(&[0, 1, 0, u8::from(hit), 0, 0, 0, 0]);
        r.extend_from_slice(question);
        if hit {
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
            r.extend_from_slice(&ip.octets());
        }
        Some(r)
    }
}
