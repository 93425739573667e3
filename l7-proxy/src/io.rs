//! Byte-level helpers: replaying sniffed bytes, and relaying two streams with
//! an idle timeout and byte counts.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    conntable::ConnHandle,
    metrics::{Metrics, TcpLabels},
};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

pin_project_lite::pin_project! {
    /// A stream whose first bytes were already read (while sniffing): they are
    /// returned again before the rest. Optionally counts the reads that
    /// return bytes ([`Rewind::count_reads`]).
    #[derive(Debug)]
    pub struct Rewind<S> {
        prefix: Bytes,
        #[pin]
        inner: S,
        // Bumped by every read that returns bytes, when set
        // (`crate::head_timer` watches it).
        reads: Option<Arc<AtomicU64>>,
    }
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Self {
            prefix,
            inner,
            reads: None,
        }
    }
    /// Counts the reads that return bytes in `reads`.
    pub fn count_reads(mut self, reads: Arc<AtomicU64>) -> Self {
        self.reads = Some(reads);
        self
    }
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead> AsyncRead for Rewind<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            if let Some(reads) = this.reads
                && n > 0
            {
                reads.fetch_add(1, Ordering::Relaxed);
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if let Some(reads) = this.reads
            && buf.filled().len() > before
        {
            reads.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Rewind<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

const RELAY_BUF: usize = 16 * 1024;

/// Bytes moved by [`relay`]: `a_to_b` and `b_to_a`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Copies both ways until both sides have finished or nothing moved in either
/// direction for `idle`. A side that ends its stream gets its peer's write half
/// shut down (half-close), the other direction goes on. `on_a_to_b` and
/// `on_b_to_a` see each chunk's size as it moves (for live counters).
pub async fn relay<A, B>(
    a: A,
    b: B,
    idle: Duration,
    on_a_to_b: impl Fn(u64),
    on_b_to_a: impl Fn(u64),
) -> io::Result<Moved>
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    // A side reset (RST) tells only one system call: when a write to it
    // learns first, its next read returns 0 as if it had ended cleanly.
    // The write notes the reset, the read then takes its 0 for one.
    let (a_reset, b_reset) = (AtomicBool::new(false), AtomicBool::new(false));
    let (ar, aw) = tokio::io::split(a);
    let (br, bw) = tokio::io::split(b);
    let ab = one_way(
        ar,
        bw,
        idle,
        start,
        last.clone(),
        on_a_to_b,
        [&a_reset, &b_reset],
    );
    let ba = one_way(br, aw, idle, start, last, on_b_to_a, [&b_reset, &a_reset]);
    tokio::pin!(ab, ba);
    // A direction that could not write (its destination stopped taking
    // bytes, as a server that answers and closes while the upload goes on)
    // ends alone: the other one still delivers what it has. Any other
    // failure (a side reset, the idle timeout) ends the relay.
    let (mut a_to_b, mut b_to_a) = (None, None);
    while a_to_b.is_none() || b_to_a.is_none() {
        tokio::select! {
            r = &mut ab, if a_to_b.is_none() => a_to_b = Some(Broke::finished(r)?),
            r = &mut ba, if b_to_a.is_none() => b_to_a = Some(Broke::finished(r)?),
        }
    }
    match (a_to_b.expect("done"), b_to_a.expect("done")) {
        (Ok(a_to_b), Ok(b_to_a)) => Ok(Moved { a_to_b, b_to_a }),
        (Err(e), _) | (_, Err(e)) => Err(e),
    }
}

/// The error of a [`relay`] that ended because nothing moved for this long:
/// the one way a relay ends that is not a side breaking off.
#[derive(Debug)]
pub struct IdleTimeout(pub Duration);

impl std::fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no bytes in either direction for {:?}", self.0)
    }
}

impl std::error::Error for IdleTimeout {}

/// Whether a relay ended with `e` because it went idle.
pub fn went_idle(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<IdleTimeout>())
}

/// How a direction of [`relay`] failed.
#[derive(Debug)]
enum Broke {
    /// Writing to its destination: the other direction goes on.
    Writing(io::Error),
    /// Anything else: the relay ends.
    Fatal(io::Error),
}

impl Broke {
    /// The result of a finished direction, or the error that ends the relay.
    fn finished(r: Result<u64, Broke>) -> io::Result<io::Result<u64>> {
        match r {
            Ok(n) => Ok(Ok(n)),
            Err(Broke::Writing(e)) => Ok(Err(e)),
            Err(Broke::Fatal(e)) => Err(e),
        }
    }
}

/// `reset`: whether the side read from, and the side written to, was found
/// reset by a write (see [`relay`]).
async fn one_way<R, W>(
    mut r: tokio::io::ReadHalf<R>,
    mut w: tokio::io::WriteHalf<W>,
    idle: Duration,
    start: Instant,
    last: Arc<AtomicU64>,
    on_chunk: impl Fn(u64),
    [source_reset, destination_reset]: [&AtomicBool; 2],
) -> Result<u64, Broke>
where
    R: AsyncRead,
    W: AsyncWrite,
{
    let mut buf = vec![0u8; RELAY_BUF];
    let mut total = 0u64;
    // Waiting (to read, or for the other end to take a write) goes on while
    // bytes move in either direction, and ends after `idle` of silence.
    let idle_out = || {
        let quiet = start
            .elapsed()
            .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
        (quiet >= idle).then(|| io::Error::new(io::ErrorKind::TimedOut, IdleTimeout(idle)))
    };
    let moved = || last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    let writing = |e: io::Error| {
        if e.kind() == io::ErrorKind::ConnectionReset {
            destination_reset.store(true, Ordering::SeqCst);
        }
        Broke::Writing(e)
    };
    // Each wait (to read, write or flush) lasts what is left of `idle`
    // since bytes last moved either way: one that runs out while the other
    // way moved waits again only for the rest, so the relay ends `idle`
    // after the last bytes, not up to twice that.
    let remaining = || {
        let quiet = start
            .elapsed()
            .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
        idle.saturating_sub(quiet).max(Duration::from_millis(1))
    };
    loop {
        let n = match tokio::time::timeout(remaining(), r.read(&mut buf)).await {
            Ok(res) => res.map_err(Broke::Fatal)?,
            Err(_) => match idle_out() {
                Some(e) => return Err(Broke::Fatal(e)),
                None => continue,
            },
        };
        if n == 0 {
            if source_reset.load(Ordering::SeqCst) {
                return Err(Broke::Fatal(io::ErrorKind::ConnectionReset.into()));
            }
            // Half-close: the peer sees end of stream, the other way goes on.
            let _ = tokio::time::timeout(idle, w.shutdown()).await;
            return Ok(total);
        }
        moved();
        // A peer that stops reading must not hold this task (and the
        // connection's resources) forever: `write` and `flush` are
        // cancel-safe, so each wait is bounded and resumed.
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            match tokio::time::timeout(remaining(), w.write(rest)).await {
                Ok(Ok(0)) => return Err(Broke::Writing(io::ErrorKind::WriteZero.into())),
                Ok(Ok(k)) => {
                    rest = &rest[k..];
                    moved();
                    // Counted as written: a chunk cut part way by an
                    // error or the idle timeout still moved this much.
                    total += k as u64;
                    on_chunk(k as u64);
                }
                Ok(Err(e)) => return Err(writing(e)),
                Err(_) => {
                    if let Some(e) = idle_out() {
                        return Err(Broke::Fatal(e));
                    }
                }
            }
        }
        loop {
            match tokio::time::timeout(remaining(), w.flush()).await {
                Ok(res) => break res.map_err(writing)?,
                Err(_) => {
                    if let Some(e) = idle_out() {
                        return Err(Broke::Fatal(e));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rewind_replays_the_prefix_first() {
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b" world").await.unwrap();
        drop(b);
        let mut r = Rewind::new(Bytes::from_static(b"hello"), a);
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }

    /// A server that resets while the relay is writing to it: the client
    /// learns a reset, never a clean end. Linux tells a reset to one system
    /// call only; when the write learns first, the read after it returns 0,
    /// which must not pass for the server's end (which of the two learns
    /// first varies, hence the rounds).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_a_write_learns_first_is_not_taken_for_an_end() {
        use tokio::net::{TcpListener, TcpSocket, TcpStream};
        for round in 0..20 {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let mut proxy_a = l.accept().await.unwrap().0;
            // Small buffers towards the server, which reads nothing: the
            // relay's writes to it soon wait.
            let s = TcpSocket::new_v4().unwrap();
            s.set_recv_buffer_size(4096).unwrap();
            s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let l = s.listen(1).unwrap();
            let b = TcpSocket::new_v4().unwrap();
            b.set_send_buffer_size(4096).unwrap();
            let mut proxy_b = b.connect(l.local_addr().unwrap()).await.unwrap();
            let mut server = l.accept().await.unwrap().0;
            let relay = tokio::spawn(async move {
                let r = relay(
                    &mut proxy_a,
                    &mut proxy_b,
                    Duration::from_secs(30),
                    |_| {},
                    |_| {},
                )
                .await;
                // As the relay's users do with a side when it broke off.
                if r.is_err() {
                    proxy_a.set_zero_linger().unwrap();
                }
                r
            });
            let (mut cr, mut cw) = client.into_split();
            // An upload the server never reads, whole in the buffers on the
            // client's side (so that no write of the client's own learns of
            // the reset in its read's place).
            tokio::time::timeout(Duration::from_secs(10), cw.write_all(&[7u8; 200 * 1024]))
                .await
                .expect("the upload fits in the buffers before the server")
                .unwrap();
            server.write_all(b"partial").await.unwrap();
            let mut got = [0u8; 7];
            cr.read_exact(&mut got).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            server.set_zero_linger().unwrap();
            drop(server);
            let relayed = relay.await.unwrap();
            assert!(relayed.is_err(), "round {round}: {relayed:?}");
            let mut more = [0u8; 8];
            let end = cr.read(&mut more).await;
            assert!(
                matches!(&end, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
                "round {round}: the client read {end:?}, not a reset"
            );
            drop(cw);
        }
    }

    /// The way still open after the other ended is cut `idle` after the
    /// last bytes either way moved, not up to twice that: waiting to read,
    /// or (`blocked_writing`) to write to a side that stopped reading.
    async fn goes_idle_on_time(blocked_writing: bool) {
        let (client, proxy_a) = tokio::io::duplex(64 * 1024);
        let (proxy_b, server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(relay(
            proxy_a,
            proxy_b,
            Duration::from_secs(10),
            |_| {},
            |_| {},
        ));
        let begun = Instant::now();
        let (mut cr, mut cw) = tokio::io::split(client);
        let (_sr, mut sw) = tokio::io::split(server);
        if blocked_writing {
            // More than the server's side holds: the relay's write waits.
            cw.write_all(&[1u8; 32 * 1024]).await.unwrap();
        }
        // The server's way moves at 9 s, then ends.
        tokio::time::sleep(Duration::from_secs(9)).await;
        sw.write_all(b"x").await.unwrap();
        sw.shutdown().await.unwrap();
        drop(sw);
        let mut got = [0u8; 1];
        cr.read_exact(&mut got).await.unwrap();
        let r = relay.await.unwrap();
        assert!(r.as_ref().is_err_and(went_idle), "{r:?}");
        let took = begun.elapsed();
        assert!(
            took >= Duration::from_secs(19) && took < Duration::from_millis(19_500),
            "idle after {took:?}, not 10 s after the last bytes at 9 s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_half_closed_relay_goes_idle_on_time() {
        goes_idle_on_time(false).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_relay_blocked_writing_goes_idle_on_time() {
        goes_idle_on_time(true).await;
    }

    type Halves = (
        tokio::io::ReadHalf<tokio::io::DuplexStream>,
        tokio::io::WriteHalf<tokio::io::DuplexStream>,
    );

    /// A client and a server with a relay between them; the client's side
    /// holds `client_room` bytes.
    fn relayed(client_room: usize) -> (Halves, Halves, tokio::task::JoinHandle<io::Result<Moved>>) {
        let (client, proxy_a) = tokio::io::duplex(client_room);
        let (proxy_b, server) = tokio::io::duplex(1024);
        let relay = tokio::spawn(relay(
            proxy_a,
            proxy_b,
            Duration::from_secs(30),
            |_| {},
            |_| {},
        ));
        (tokio::io::split(client), tokio::io::split(server), relay)
    }

    #[tokio::test]
    async fn a_side_that_stops_taking_bytes_does_not_cut_the_other_way() {
        // The client's side holds 16 bytes: the answer waits in the relay
        // until the client reads.
        let ((mut cr, mut cw), (mut sr, mut sw), relay) = relayed(16);
        cw.write_all(b"upload part 1").await.unwrap();
        let mut got = [0u8; 13];
        sr.read_exact(&mut got).await.unwrap();
        // The server answers and goes away while the upload goes on, which
        // the relay then cannot deliver.
        sw.write_all(&[b'r'; 1000]).await.unwrap();
        drop((sr, sw));
        cw.write_all(b"upload part 2").await.unwrap();
        // Whenever the failed write happened, the answer arrives whole.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut answer = Vec::new();
        cr.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer.len(), 1000);
        let err = relay.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
    }

    #[tokio::test]
    async fn relay_moves_both_ways_and_half_closes() {
        let ((mut cr, mut cw), (mut sr, mut sw), relay) = relayed(1024);
        cw.write_all(b"ping").await.unwrap();
        cw.shutdown().await.unwrap();
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        sw.write_all(b"pong!").await.unwrap();
        sw.shutdown().await.unwrap();
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong!");
        let moved = relay.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Moved {
                a_to_b: 4,
                b_to_a: 5
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn relay_gives_up_on_a_peer_that_stops_reading() {
        // The client half-closes and never reads again while the server
        // keeps sending: the relay's write to the client can never finish.
        let (client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, server) = tokio::io::duplex(64);
        let (_client_r, mut client_w) = tokio::io::split(client);
        client_w.shutdown().await.unwrap();
        let (_server_r, mut server_w) = tokio::io::split(server);
        tokio::spawn(async move {
            let _ = server_w.write_all(&vec![7u8; 1 << 20]).await;
        });
        let to_client = AtomicU64::new(0);
        let count = |n| {
            to_client.fetch_add(n, Ordering::Relaxed);
        };
        let relay = relay(proxy_a, proxy_b, Duration::from_secs(5), |_| {}, count);
        let err = tokio::time::timeout(Duration::from_secs(60), relay)
            .await
            .expect("the relay ends after 5 s without progress")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // What the client's side took of the chunk cut short is counted.
        assert_eq!(to_client.load(Ordering::Relaxed), 64);
    }

    #[tokio::test(start_paused = true)]
    async fn relay_gives_up_when_idle() {
        let (_client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, _server) = tokio::io::duplex(1024);
        let err = relay(proxy_a, proxy_b, Duration::from_secs(5), |_| {}, |_| {})
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        // Told apart from a timeout of anything else (a connect's), which
        // breaks the connection off rather than ends it.
        assert!(went_idle(&err), "{err}");
        assert!(!went_idle(&io::Error::from(io::ErrorKind::TimedOut)));
    }
}

pin_project_lite::pin_project! {
    /// Counts the bytes of a stream into its connection table row: a stream
    /// towards the destination ([`Counted::new`]) counts its writes as sent
    /// and its reads as received; a caller's stream
    /// ([`Counted::from_caller`]) the other way round.
    pub struct Counted<S> {
        #[pin]
        inner: S,
        handle: Arc<crate::conntable::ConnHandle>,
        // A caller's stream: what it reads goes towards the destination.
        caller: bool,
    }
}

impl<S> Counted<S> {
    pub fn new(inner: S, handle: Arc<crate::conntable::ConnHandle>) -> Self {
        Self {
            inner,
            handle,
            caller: false,
        }
    }
    /// A caller's connection: its reads are sent towards the destination,
    /// its writes what was received from there.
    pub fn from_caller(inner: S, handle: Arc<crate::conntable::ConnHandle>) -> Self {
        Self {
            inner,
            handle,
            caller: true,
        }
    }
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// Counts `n` bytes as sent towards the destination, or as received from it.
fn count(handle: &crate::conntable::ConnHandle, towards_destination: bool, n: u64) {
    if towards_destination {
        handle.add_sent(n);
    } else {
        handle.add_received(n);
    }
}

impl<S: AsyncRead> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        count(this.handle, *this.caller, n);
        r
    }
}

impl<S: AsyncWrite> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            count(this.handle, !*this.caller, *n as u64);
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            count(this.handle, !*this.caller, *n as u64);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Counts one relayed connection in the `sluice_tcp_*` metrics under
/// `labels`, and its bytes there and in its connection-table row: the
/// `(sent, received)` callbacks for [`relay`].
pub(crate) fn count_relay(
    metrics: &Metrics,
    labels: &TcpLabels,
    row: Option<Arc<ConnHandle>>,
) -> (impl Fn(u64) + Send + 'static, impl Fn(u64) + Send + 'static) {
    metrics.tcp_connections.get_or_create(labels).inc();
    let sent = metrics.tcp_bytes_sent.get_or_create(labels).clone();
    let received = metrics.tcp_bytes_received.get_or_create(labels).clone();
    let (r1, r2) = (row.clone(), row);
    (
        move |n| {
            sent.inc_by(n);
            r1.iter().for_each(|r| r.add_sent(n));
        },
        move |n| {
            received.inc_by(n);
            r2.iter().for_each(|r| r.add_received(n));
        },
    )
}
