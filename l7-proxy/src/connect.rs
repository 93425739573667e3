//! Every connection the proxy opens: to peer proxies, to workloads, to
//! destinations outside the mesh. All carry the proxy's `SO_MARK`.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::rt::TokioIo;
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

/// [`connect`] as a connector for hyper's pooled client. The URI's authority
/// must be a literal `ip:port` (the proxy only ever connects to addresses).
#[derive(Clone, Debug)]
pub struct MarkedConnector {
    pub mark: Option<u32>,
    pub timeout: Duration,
}

impl tower_service::Service<Uri> for MarkedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (mark, timeout) = (self.mark, self.timeout);
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{uri} does not name an ip:port"),
                    )
                })?;
            connect(addr, mark, timeout).await.map(TokioIo::new)
        })
    }
}
