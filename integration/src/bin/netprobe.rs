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
