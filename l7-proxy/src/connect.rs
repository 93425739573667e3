//! Every connection the proxy opens: to peer proxies, to workloads, to
//! destinations outside the mesh. All carry the proxy's `SO_MARK`.

use std::{io, net::SocketAddr, time::Duration};

use tokio::net::{TcpSocket, TcpStream};

/// Connects to `addr` with `mark` as `SO_MARK`, within `timeout`.
pub async fn connect(
    addr: SocketAddr,
    mark: Option<u32>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(m) = mark {
        socket2::SockRef::from(&sock).set_mark(m).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("setting SO_MARK {m:#x} (needs CAP_NET_ADMIN): {e}"),
            )
        })?;
    }
    let stream = tokio::time::timeout(timeout, sock.connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {addr}: no answer within {timeout:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}
