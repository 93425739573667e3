//! Write batching for tunnel connections.
//!
//! The HTTP/2 codec flushes after every DATA frame of 256 bytes or more, and
//! TLS turns every flushed write into a record and a `writev`. Under load that
//! is one record and one system call per response, although the connection's
//! task has the frames of many streams in hand at once. [`BatchIo`] buffers
//! the plaintext instead, and [`FlushAtEnd`] flushes it once the connection's
//! task has done everything it could in this poll: one record (per 16 KiB)
//! and one system call for all of it, and no later than before the task
//! sleeps, so no frame waits.
//!
//! Streams are served by other tasks, and tokio runs a task woken by the
//! running one next: the connection's task would wake, write one stream's
//! frames and sleep, once per stream. So when other streams are in flight it
//! yields once before writing, which puts it behind the tasks already
//! runnable; they add their frames and one write carries them all. With one
//! stream in flight there is nothing to wait for, and it writes at once.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// Plaintext buffered beyond this is written through at once (back-pressure);
/// a write this large into an empty buffer goes through unbuffered.
const LIMIT: usize = 64 * 1024;

struct Inner<T> {
    io: T,
    buf: BytesMut,
    /// The connection's task is inside [`FlushAtEnd::poll`]: flushes wait for
    /// its end.
    in_poll: bool,
    /// A flush was asked for during the poll.
    owed: bool,
    /// A deferred flush failed; the next operation reports it.
    error: Option<io::Error>,
    /// Since when the socket has taken nothing though there was something
    /// to write (see [`WriteStall`]).
    stalled_since: Option<Instant>,
}

impl<T: AsyncWrite + Unpin> Inner<T> {
    /// Writes out the buffer, then flushes `io`.
    fn flush_now(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.note(r.is_pending());
        r
    }

    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buf.is_empty() {
            let r = Pin::new(&mut self.io).poll_write(cx, &self.buf);
            self.note(r.is_pending());
            let n = ready!(r)?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buf.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Notes whether a write or flush had to wait for the socket.
    fn note(&mut self, waiting: bool) {
        if !waiting {
            self.stalled_since = None;
        } else if self.stalled_since.is_none() {
            self.stalled_since = Some(Instant::now());
        }
    }

    /// Makes room for `len` more bytes; `Ready(true)` when they should bypass
    /// the buffer.
    fn reserve(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if let Some(e) = self.error.take() {
            return Poll::Ready(Err(e));
        }
        if self.buf.len() + len > LIMIT {
            ready!(self.drain(cx))?;
        }
        Poll::Ready(Ok(self.buf.is_empty() && len >= LIMIT))
    }
}

/// The I/O of one connection as its HTTP/2 codec sees it. Only the
/// connection's own task may use it (the lock is never contended).
pub struct BatchIo<T> {
    inner: Arc<Mutex<Inner<T>>>,
}

fn lock<T>(m: &Mutex<Inner<T>>) -> MutexGuard<'_, Inner<T>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T> BatchIo<T> {
    /// The I/O for the codec, and the handle [`FlushAtEnd`] needs.
    pub fn new(io: T) -> (Self, BatchHandle<T>) {
        let inner = Arc::new(Mutex::new(Inner {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
            in_poll: false,
            owed: false,
            error: None,
            stalled_since: None,
        }));
        (
            BatchIo {
                inner: inner.clone(),
            },
            BatchHandle { inner },
        )
    }

    /// Runs `f` on the underlying I/O (to read TLS facts, say).
    pub fn with_io<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&lock(&self.inner).io)
    }
}

/// Lets [`FlushAtEnd`] reach the buffer of a [`BatchIo`].
pub struct BatchHandle<T> {
    inner: Arc<Mutex<Inner<T>>>,
}

impl<T> BatchHandle<T> {
    /// A watch on the connection's writes, for its task to cut a peer that
    /// stopped reading.
    pub fn stall(&self) -> WriteStall<T> {
        WriteStall {
            inner: self.inner.clone(),
        }
    }
}

/// Whether a connection's peer has stopped reading: bytes waiting for the
/// socket, and none taken, for a while. HTTP/2 keep-alive cannot tell (its
/// pings wait behind the same bytes), and without this such a connection,
/// and every stream on it, would stay until the drain at shutdown.
pub struct WriteStall<T> {
    inner: Arc<Mutex<Inner<T>>>,
}

impl<T> WriteStall<T> {
    /// Returns once the socket has taken nothing for `limit` while there was
    /// something to write (looked at every quarter of `limit`).
    pub async fn exceeded(&self, limit: Duration) {
        let every = (limit / 4).max(Duration::from_millis(10));
        loop {
            tokio::time::sleep(every).await;
            if lock(&self.inner)
                .stalled_since
                .is_some_and(|t| t.elapsed() >= limit)
            {
                return;
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for BatchIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.inner).io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for BatchIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut s = lock(&self.inner);
        if ready!(s.reserve(cx, buf.len()))? {
            let r = Pin::new(&mut s.io).poll_write(cx, buf);
            s.note(r.is_pending());
            return r;
        }
        s.buf.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        let mut s = lock(&self.inner);
        if ready!(s.reserve(cx, len))? {
            let r = Pin::new(&mut s.io).poll_write_vectored(cx, bufs);
            s.note(r.is_pending());
            return r;
        }
        for b in bufs {
            s.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = lock(&self.inner);
        if let Some(e) = s.error.take() {
            return Poll::Ready(Err(e));
        }
        if s.in_poll {
            s.owed = true;
            return Poll::Ready(Ok(()));
        }
        s.flush_now(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = lock(&self.inner);
        ready!(s.flush_now(cx))?;
        Pin::new(&mut s.io).poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// Drives a connection future, flushing what its [`BatchIo`] buffered once
    /// per poll.
    pub struct FlushAtEnd<F: Future, T> {
        #[pin]
        fut: F,
        inner: Arc<Mutex<Inner<T>>>,
        // The connection's result, held until the last bytes are out.
        done: Option<F::Output>,
        // This write already waited for the other runnable tasks once.
        yielded: bool,
        // Streams in flight on the connection.
        streams: Arc<AtomicUsize>,
    }
}

impl<F: Future, T> FlushAtEnd<F, T> {
    /// `streams` counts the streams in flight on the connection: with more
    /// than one, a write waits once for the other runnable tasks.
    pub fn new(fut: F, handle: BatchHandle<T>, streams: Arc<AtomicUsize>) -> Self {
        Self {
            fut,
            inner: handle.inner,
            done: None,
            yielded: false,
            streams,
        }
    }

    /// The connection future (for a graceful shutdown, say).
    pub fn inner_mut(self: Pin<&mut Self>) -> Pin<&mut F> {
        self.project().fut
    }
}

impl<F: Future, T: AsyncWrite + Unpin> Future for FlushAtEnd<F, T> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if this.done.is_none() {
            lock(this.inner).in_poll = true;
            let r = this.fut.poll(cx);
            lock(this.inner).in_poll = false;
            if let Poll::Ready(out) = r {
                *this.done = Some(out);
            }
        }
        let mut s = lock(this.inner);
        if s.owed || !s.buf.is_empty() {
            if this.done.is_none()
                && !*this.yielded
                && s.buf.len() < LIMIT / 2
                && this.streams.load(Ordering::Relaxed) > 1
            {
                *this.yielded = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            *this.yielded = false;
            match s.flush_now(cx) {
                Poll::Ready(r) => {
                    s.owed = false;
                    if let Err(e) = r
                        && this.done.is_none()
                    {
                        // The codec hears of it at its next write or flush.
                        s.error = Some(e);
                        cx.waker().wake_by_ref();
                    }
                }
                // The socket wakes the task when it can take more.
                Poll::Pending => return Poll::Pending,
            }
        }
        match this.done.take() {
            Some(out) => Poll::Ready(out),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach the underlying stream.
    struct CountWrites<S> {
        inner: S,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for CountWrites<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn writes_and_flushes_of_one_poll_leave_in_one_write() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let (mut io, handle) = BatchIo::new(CountWrites {
            inner: a,
            writes: writes.clone(),
        });
        // One "poll" of a connection: three frames, each flushed.
        let conn = async move {
            for part in [&b"one "[..], b"two ", b"three"] {
                io.write_all(part).await.unwrap();
                io.flush().await.unwrap();
            }
            io
        };
        let mut io = FlushAtEnd::new(conn, handle, Arc::default()).await;
        assert_eq!(writes.load(Ordering::Relaxed), 1);
        let mut got = vec![0u8; 13];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"one two three");
        // Outside a FlushAtEnd poll a flush is immediate.
        io.write_all(b"!").await.unwrap();
        io.flush().await.unwrap();
        let mut one = [0u8; 1];
        b.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"!");
    }

    #[tokio::test]
    async fn a_full_buffer_is_written_through() {
        let (a, mut b) = tokio::io::duplex(4 * LIMIT);
        let (mut io, handle) = BatchIo::new(a);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            b.read_to_end(&mut all).await.unwrap();
            all
        });
        let chunk = vec![7u8; LIMIT / 2 + 1];
        // Not flushed by hand: the third chunk does not fit, the first two go.
        for _ in 0..3 {
            io.write_all(&chunk).await.unwrap();
        }
        io.shutdown().await.unwrap();
        drop((io, handle));
        assert_eq!(reader.await.unwrap().len(), 3 * chunk.len());
    }

    #[tokio::test]
    async fn a_peer_that_stops_reading_is_seen_and_one_that_reads_is_not() {
        let (a, mut b) = tokio::io::duplex(1024);
        let (mut io, handle) = BatchIo::new(a);
        let stall = handle.stall();
        // Far above the reader's pauses (5 ms), so that a busy machine does
        // not turn a slow reader into a stalled one.
        let limit = Duration::from_secs(1);
        // The peer reads slowly but steadily: never a stall.
        let writer = tokio::spawn(async move {
            for _ in 0..40 {
                io.write_all(&[1u8; 512]).await.unwrap();
                io.flush().await.unwrap();
            }
            io
        });
        let reader = async {
            let mut got = 0;
            let mut buf = [0u8; 256];
            while got < 40 * 512 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                got += b.read(&mut buf).await.unwrap();
            }
        };
        tokio::select! {
            () = reader => {}
            () = stall.exceeded(limit) => panic!("a reading peer was taken for a stalled one"),
        }
        let mut io = writer.await.unwrap();
        // Now it stops reading: the write waits, and the watch fires.
        let stuck = tokio::spawn(async move {
            let _ = io.write_all(&[2u8; 8192]).await;
            let _ = io.flush().await;
        });
        tokio::time::timeout(Duration::from_secs(10), stall.exceeded(limit))
            .await
            .expect("a peer that stopped reading was not seen");
        stuck.abort();
        drop(b);
    }
}
