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

use std::{os::fd::AsRawFd, time::Duration};

use tokio::net::TcpStream;

/// How long a reset waits for a peer to take what was written before it.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Bytes written to `sock` and not yet acknowledged by its peer (`SIOCOUTQ`),
/// or `None` when the kernel cannot tell (the socket is already gone).
pub fn unacknowledged(sock: &TcpStream) -> Option<usize> {
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
