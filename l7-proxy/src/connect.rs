//! Every connection the proxy opens: to peer proxies, to workloads, to
//! destinations outside the mesh. All carry the proxy's `SO_MARK`.

use std::{io, net::SocketAddr, time::Duration};

use tokio::net::{TcpSocket, TcpStream};

/// Whether a failed [`connect`] says the destination is out of reach (so
/// that other endpoints are preferred for a while), rather than that this
/// proxy could not open a socket (out of descriptors, `SO_MARK` refused).
pub fn peer_unreachable(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | HostUnreachable
            | NetworkUnreachable
            | NetworkDown
            | TimedOut
    )
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_destination_out_of_reach_is_unreachable() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(peer_unreachable(&refused));
        // The proxy's own trouble says nothing of the destination.
        for local in [
            io::Error::from_raw_os_error(libc::EMFILE),
            io::Error::from_raw_os_error(libc::EPERM),
            io::Error::from_raw_os_error(libc::ENOBUFS),
        ] {
            assert!(!peer_unreachable(&local), "{local}");
        }
        assert!(peer_unreachable(&io::Error::from_raw_os_error(
            libc::EHOSTUNREACH
        )));
    }
}
