//! Ending a TCP connection with a reset (RST) instead of a FIN, without
//! losing what was already written to it.
//!
//! A relay whose other side broke (a workload reset, a peer proxy cancelled
//! the stream) must not close its caller with a FIN: a client reading to the
//! end of the stream would take a cut answer for a whole one. A reset at
//! once, though (`SO_LINGER` 0), discards whatever the kernel still holds to
//! send, the last part of an answer the client has not read yet. So the
//! reset waits until the send queue is empty (the peer acknowledged every
//! byte), or until `limit` for a peer that stopped reading.
//!
//! The one `unsafe` of this crate is the `ioctl` that reads the queue.
#![allow(unsafe_code)]

use std::{any::Any, io, os::fd::AsRawFd, time::Duration};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::{h2stream::StreamIo, outbound::HyperH1Io};

/// How long a reset waits for a peer to take what was written before it.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Bytes written to `sock` and not yet acknowledged by its peer (`SIOCOUTQ`),
/// or `None` when nothing more will be: the connection is already reset or
/// closed (the kernel's count then stays where the reset left it).
pub fn unacknowledged(sock: &TcpStream) -> Option<usize> {
    if sock.peer_addr().is_err() || !matches!(sock.take_error(), Ok(None)) {
        return None;
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: `sock` owns an open socket descriptor for the duration of the
    // call, and TIOCOUTQ (SIOCOUTQ for sockets) writes one `int` to the
    // pointer, which points at a live `c_int`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    (rc == 0).then_some(queued.max(0) as usize)
}

/// Readies `sock` to be reset when dropped: first waits (at most `limit`)
/// until its peer has acknowledged everything written to it, then sets
/// `SO_LINGER` 0. Drop it afterwards.
pub async fn reset_once_sent(sock: &TcpStream, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    while unacknowledged(sock).is_some_and(|n| n > 0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    let _ = sock.set_zero_linger();
}

/// Makes `sock` close with a reset if it is dropped before
/// [`disarm_reset`]: a relay cut short by the proxy's shutdown (its task
/// aborted at the drain timeout) must reach the peer as a reset, not as a
/// clean end that would pass a cut exchange for a whole one.
pub fn arm_reset(sock: &TcpStream) {
    let _ = sock.set_zero_linger();
}

/// Undoes [`arm_reset`] for a relay that ended cleanly (or went idle): the
/// socket then closes with a FIN.
pub fn disarm_reset(sock: &TcpStream) {
    let _ = socket2::SockRef::from(sock).set_linger(None);
}

/// Whether a relay that failed with `e` broke off (a side reset, a stream
/// cancelled, a write refused, no connection at all) rather than went idle
/// for too long: the sides still open then get a reset, not a clean end.
pub fn broke_off(e: &io::Error) -> bool {
    !crate::io::went_idle(e)
}

/// A connection of an HTTP/1.1 upgrade (see [`crate::upgrade`]) made of
/// whatever the proxy gave hyper: the caller's TCP connection (outbound),
/// the workload's (inbound), a tunnel stream, or a direct connection.
pub(crate) trait UpgradeIo:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + Any
{
}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + Any> UpgradeIo for T {}

/// Ends one side of an upgraded connection whose relay broke off: a TCP
/// connection with a reset once its peer has what came before, a tunnel
/// stream with an abort behind its data (see `StreamIo::abort`; dropped, it
/// would end cleanly on the inbound side).
pub(crate) async fn abort_upgraded(u: Upgraded) {
    // A captured caller's connection (outbound::serve).
    let u = match u.downcast::<TokioIo<HyperH1Io>>() {
        Ok(p) => {
            let caller = p.io.inner().inner().get_ref().inner();
            return reset_once_sent(caller, DRAIN_LIMIT).await;
        }
        Err(u) => u,
    };
    let u = match u.downcast::<TokioIo<TcpStream>>() {
        Ok(p) => return reset_once_sent(p.io.inner(), DRAIN_LIMIT).await,
        Err(u) => u,
    };
    let u = match u.downcast::<TokioIo<StreamIo>>() {
        Ok(mut p) => {
            p.io.inner_mut().abort();
            return;
        }
        Err(u) => u,
    };
    // The outbound side's next hop: a direct connection or a tunnel stream.
    if let Ok(mut p) = u.downcast::<TokioIo<Box<dyn UpgradeIo>>>() {
        let io = next_hop(&mut p.io);
        if let Some(tcp) = io.downcast_ref::<TcpStream>() {
            reset_once_sent(tcp, DRAIN_LIMIT).await;
        } else if let Some(stream) = io.downcast_mut::<crate::tunnel::TunnelStream>() {
            stream.abort(DRAIN_LIMIT).await;
        }
    }
}

/// The outbound side's next hop of an upgrade, to be downcast. `dyn Any` is
/// not `Send`: only the concrete references may cross an await.
fn next_hop(io: &mut TokioIo<Box<dyn UpgradeIo>>) -> &mut dyn Any {
    &mut **io.inner_mut()
}

/// Ends the next hop of an upgraded connection that went idle: a tunnel
/// stream with a clean end, kept until the far side ends it (dropped, it
/// would be cancelled, which the far side passes on as a reset).
pub(crate) async fn finish_upgraded(u: Upgraded) {
    if let Ok(mut p) = u.downcast::<TokioIo<Box<dyn UpgradeIo>>>()
        && let Some(stream) = next_hop(&mut p.io).downcast_mut::<crate::tunnel::TunnelStream>()
    {
        stream.finish(DRAIN_LIMIT).await;
    }
}
