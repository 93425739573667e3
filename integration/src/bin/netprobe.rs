//! netprobe: the client process of Sluice's privileged tests. It runs inside a
//! test cgroup (and network namespace), does what it is told, and prints one
//! JSON line per attempt (see `integration::probe::Attempt`).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs as _, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use clap::{Parser, Subcommand};
use integration::{monotonic_ns, probe::Attempt};
use socket2::{Domain, Protocol, Socket, Type};

#[derive(Parser)]
#[command(about = "Test client for Sluice's privileged tests")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect over TCP, read the backend's id line, report getpeername.
    Tcp {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Keep connecting until this file exists (instead of --count).
        #[arg(long)]
        until: Option<PathBuf>,
        /// SO_MARK to set before connecting.
        #[arg(long)]
        mark: Option<u32>,
        /// Keep each connection open this long before closing it.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
    /// Send a datagram, report the reply and its source address.
    Udp {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// connect() the socket first and use send/recv.
        #[arg(long)]
        connected: bool,
    },
    /// One long-lived TCP connection: read the backend's id, then send a ping
    /// every --interval-ms and read its echo, reporting each, until an error
    /// or --pings pings.
    TcpSession {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        pings: u64,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
    },
    /// One connected UDP socket sending a datagram every --interval-ms; on an
    /// error it opens a new one (as a resolver retries), reporting each send.
    UdpSession {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: u64,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
    },
    /// Resolve a name with the system resolver (getaddrinfo).
    Resolve {
        #[arg(long)]
        name: String,
    },
}

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut emit = |a: &Attempt| {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string(a).expect("attempt serialises")
        );
    };
    match cli.cmd {
        Cmd::Tcp {
            to,
            count,
            until,
            mark,
            hold_ms,
        } => {
            let mut i = 0;
            loop {
                match &until {
                    Some(f) if f.exists() => break,
                    None if i >= count => break,
                    _ => {}
                }
                emit(&tcp_attempt(to, mark, hold_ms));
                i += 1;
            }
        }
        Cmd::Udp {
            to,
            count,
            connected,
        } => {
            for _ in 0..count {
                emit(&udp_attempt(to, connected));
            }
        }
        Cmd::TcpSession {
            to,
            pings,
            interval_ms,
        } => tcp_session(to, pings, interval_ms, &mut emit),
        Cmd::UdpSession {
            to,
            count,
            interval_ms,
        } => udp_session(to, count, interval_ms, &mut emit),
        Cmd::Resolve { name } => {
            let start_ns = monotonic_ns();
            let a = match (name.as_str(), 0).to_socket_addrs() {
                Ok(addrs) => Attempt {
                    start_ns,
                    backend: Some(
                        addrs
                            .map(|a| a.ip().to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                    ..Default::default()
                },
                Err(e) => failed(start_ns, &e),
            };
            emit(&a);
        }
    }
}

fn failed(start_ns: u64, e: &std::io::Error) -> Attempt {
    Attempt {
        start_ns,
        errno: e.raw_os_error(),
        error: Some(e.to_string()),
        ..Default::default()
    }
}

fn tcp_attempt(to: SocketAddr, mark: Option<u32>, hold_ms: u64) -> Attempt {
    let start_ns = monotonic_ns();
    let run = || -> std::io::Result<Attempt> {
        let sock = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
        if let Some(m) = mark {
            sock.set_mark(m)?;
        }
        sock.connect_timeout(&to.into(), TIMEOUT)?;
        let stream: TcpStream = sock.into();
        stream.set_read_timeout(Some(TIMEOUT))?;
        let peer = stream.peer_addr()?.to_string();
        let local = stream.local_addr()?.to_string();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        if hold_ms > 0 {
            std::thread::sleep(Duration::from_millis(hold_ms));
        }
        Ok(Attempt {
            start_ns,
            backend: Some(line.trim().to_string()).filter(|s| !s.is_empty()),
            peer: Some(peer),
            local: Some(local),
            ..Default::default()
        })
    };
    run().unwrap_or_else(|e| failed(start_ns, &e))
}

fn udp_attempt(to: SocketAddr, connected: bool) -> Attempt {
    let start_ns = monotonic_ns();
    let run = || -> std::io::Result<Attempt> {
        let bind: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let sock = UdpSocket::bind(bind)?;
        sock.set_read_timeout(Some(TIMEOUT))?;
        let mut buf = [0u8; 512];
        let (n, from) = if connected {
            sock.connect(to)?;
            sock.send(b"ping")?;
            let n = sock.recv(&mut buf)?;
            (n, sock.peer_addr()?)
        } else {
            sock.send_to(b"ping", to)?;
            sock.recv_from(&mut buf)?
        };
        Ok(Attempt {
            start_ns,
            backend: Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            peer: Some(from.to_string()),
            local: Some(sock.local_addr()?.to_string()),
            ..Default::default()
        })
    };
    run().unwrap_or_else(|e| failed(start_ns, &e))
}

fn tcp_session(to: SocketAddr, pings: u64, interval_ms: u64, emit: &mut dyn FnMut(&Attempt)) {
    let start_ns = monotonic_ns();
    let stream = match TcpStream::connect_timeout(&to, TIMEOUT) {
        Ok(s) => s,
        Err(e) => return emit(&failed(start_ns, &e)),
    };
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let mut reader = BufReader::new(&stream);
    let mut id = String::new();
    if let Err(e) = reader.read_line(&mut id) {
        return emit(&failed(start_ns, &e));
    }
    let id = id.trim().to_string();
    let peer = stream.peer_addr().ok().map(|a| a.to_string());
    emit(&Attempt {
        start_ns,
        backend: Some(id.clone()),
        peer: peer.clone(),
        ..Default::default()
    });
    for _ in 0..pings {
        std::thread::sleep(Duration::from_millis(interval_ms));
        let start_ns = monotonic_ns();
        let mut line = String::new();
        let r = (&stream)
            .write_all(b"ping\n")
            .and_then(|()| reader.read_line(&mut line));
        match r {
            Ok(0) => {
                let e = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
                return emit(&failed(start_ns, &e));
            }
            Ok(_) => emit(&Attempt {
                start_ns,
                backend: Some(id.clone()),
                peer: peer.clone(),
                ..Default::default()
            }),
            Err(e) => return emit(&failed(start_ns, &e)),
        }
    }
}

fn udp_session(to: SocketAddr, count: u64, interval_ms: u64, emit: &mut dyn FnMut(&Attempt)) {
    let bind: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let connect = || -> std::io::Result<UdpSocket> {
        let sock = UdpSocket::bind(bind)?;
        sock.set_read_timeout(Some(TIMEOUT))?;
        sock.connect(to)?;
        Ok(sock)
    };
    let mut sock: Option<UdpSocket> = None;
    let mut buf = [0u8; 512];
    for _ in 0..count {
        let start_ns = monotonic_ns();
        let r = (|| -> std::io::Result<Attempt> {
            if sock.is_none() {
                sock = Some(connect()?);
            }
            let s = sock.as_ref().expect("socket just made");
            s.send(b"ping")?;
            let n = s.recv(&mut buf)?;
            Ok(Attempt {
                start_ns,
                backend: Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
                peer: s.peer_addr().ok().map(|a| a.to_string()),
                ..Default::default()
            })
        })();
        match r {
            Ok(a) => emit(&a),
            Err(e) => {
                emit(&failed(start_ns, &e));
                // A fresh socket, as a resolver retrying a query does.
                sock = None;
            }
        }
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
}
