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
    /// Connect over TCP, write --message and close at once without reading
    /// (a fire-and-forget client); reports the local address.
    TcpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        message: String,
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
        /// Send every datagram from one unconnected socket (a new socket
        /// for each otherwise).
        #[arg(long, conflicts_with = "connected")]
        one_socket: bool,
        /// Pause between datagrams.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
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
    /// HTTP/1.1 client: --count GET requests for --path on one keep-alive
    /// connection (or a new connection each with --new-connections);
    /// reports each response's status and body as the backend.
    Http {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long)]
        new_connections: bool,
        /// Extra request headers, `Name: value`.
        #[arg(long)]
        header: Vec<String>,
        /// Pause between requests.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// HTTP/1.1 server answering every request with `--name` as the body.
    ServeHttp {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        name: String,
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
        Cmd::TcpSend { to, message } => emit(&tcp_send(to, &message)),
        Cmd::Udp {
            to,
            count,
            connected,
            one_socket,
            interval_ms,
        } => {
            let shared = if one_socket {
                match UdpSocket::bind(any_addr(to)) {
                    Ok(s) => Some(s),
                    Err(e) => return emit(&failed(monotonic_ns(), &e)),
                }
            } else {
                None
            };
            for i in 0..count {
                if i > 0 && interval_ms > 0 {
                    std::thread::sleep(Duration::from_millis(interval_ms));
                }
                emit(&udp_attempt(to, connected, shared.as_ref()));
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
        Cmd::Http {
            to,
            path,
            count,
            new_connections,
            header,
            interval_ms,
        } => http_client(
            to,
            &path,
            count,
            new_connections,
            &header,
            interval_ms,
            &mut emit,
        ),
        Cmd::ServeHttp { listen, name } => serve_http(listen, &name),
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

fn tcp_send(to: SocketAddr, message: &str) -> Attempt {
    let start_ns = monotonic_ns();
    let run = || -> std::io::Result<Attempt> {
        let mut stream = TcpStream::connect_timeout(&to, TIMEOUT)?;
        let local = stream.local_addr()?.to_string();
        stream.write_all(message.as_bytes())?;
        drop(stream);
        Ok(Attempt {
            start_ns,
            local: Some(local),
            ..Default::default()
        })
    };
    run().unwrap_or_else(|e| failed(start_ns, &e))
}

/// The wildcard address of `to`'s family, any port.
fn any_addr(to: SocketAddr) -> SocketAddr {
    if to.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    }
}

fn udp_attempt(to: SocketAddr, connected: bool, shared: Option<&UdpSocket>) -> Attempt {
    let start_ns = monotonic_ns();
    let run = || -> std::io::Result<Attempt> {
        let own;
        let sock = match shared {
            Some(s) => s,
            None => {
                own = UdpSocket::bind(any_addr(to))?;
                &own
            }
        };
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

/// Reads one HTTP/1.1 response with a Content-Length body.
fn read_response(r: &mut impl std::io::BufRead) -> std::io::Result<(u16, String)> {
    let mut status = String::new();
    if r.read_line(&mut status)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad status line {status:?}"),
            )
        })?;
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    std::io::Read::read_exact(r, &mut body)?;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

fn http_client(
    to: SocketAddr,
    path: &str,
    count: u64,
    new_connections: bool,
    headers: &[String],
    interval_ms: u64,
    emit: &mut dyn FnMut(&Attempt),
) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    for i in 0..count {
        if i > 0 && interval_ms > 0 {
            std::thread::sleep(Duration::from_millis(interval_ms));
        }
        let start_ns = monotonic_ns();
        let r = (|| -> std::io::Result<Attempt> {
            if conn.is_none() || new_connections {
                let s = TcpStream::connect_timeout(&to, TIMEOUT)?;
                s.set_read_timeout(Some(TIMEOUT))?;
                conn = Some(BufReader::new(s));
            }
            let c = conn.as_mut().expect("connected");
            let req = format!("GET {path} HTTP/1.1\r\nHost: {to}\r\n{extra}\r\n");
            c.get_mut().write_all(req.as_bytes())?;
            let (code, body) = read_response(c)?;
            Ok(Attempt {
                start_ns,
                backend: Some(body.trim().to_string()),
                peer: Some(code.to_string()),
                ..Default::default()
            })
        })();
        match r {
            Ok(a) => emit(&a),
            Err(e) => {
                emit(&failed(start_ns, &e));
                conn = None;
            }
        }
    }
}

fn serve_http(listen: SocketAddr, name: &str) {
    let listener = std::net::TcpListener::bind(listen).expect("bind");
    let body = format!("{name}\n");
    for conn in listener.incoming().flatten() {
        let body = body.clone();
        std::thread::spawn(move || {
            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
            let mut r = BufReader::new(&conn);
            loop {
                // Request line and headers; GET only, no body.
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap_or(0) == 0 {
                        return;
                    }
                    if h.trim_end().is_empty() {
                        break;
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if (&conn).write_all(resp.as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
}
