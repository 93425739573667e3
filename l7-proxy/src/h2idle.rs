//! The keep-alive idle timeout of a captured HTTP/2 connection.
//!
//! hyper's HTTP/2 server has no idle timeout of its own, and its pings keep
//! a silent connection alive, so a workload's HTTP/2 connection that carries
//! no stream would stay for ever. [`StreamActivity`] counts a connection's
//! streams in flight: each stream holds an [`ActiveStream`] from its request
//! until its response is complete (it rides in the response body,
//! [`Held`]), and a `CONNECT` stream that became a WebSocket until the
//! splice ends (a clone rides in the request's extensions to
//! `upgrade::exchange`). Once none has been in flight for the keep-alive idle timeout,
//! the connection is shut down gracefully (GOAWAY): nothing in flight is
//! cut, and the client opens a new connection for its next request.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;

/// The streams in flight on one connection and when the last one began or
/// ended.
#[derive(Debug)]
pub(crate) struct StreamActivity {
    base: Instant,
    active: AtomicUsize,
    /// Nanoseconds from `base` to the last stream's beginning or end.
    last: AtomicU64,
}

impl StreamActivity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            active: AtomicUsize::new(0),
            last: AtomicU64::new(0),
        })
    }

    /// A stream begins; it is in flight until the returned guard drops.
    pub(crate) fn begin(self: &Arc<Self>) -> ActiveStream {
        self.active.fetch_add(1, Ordering::SeqCst);
        self.touch();
        ActiveStream(self.clone())
    }

    fn touch(&self) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(nanos, Ordering::SeqCst);
    }

    /// Resolves once no stream has been in flight for `limit`.
    pub(crate) async fn idle_for(&self, limit: Duration) {
        loop {
            // The end of a stream is noted before it stops counting
            // (`ActiveStream::drop`), so none in flight means `last` is the
            // last end.
            let wake = if self.active.load(Ordering::SeqCst) == 0 {
                let since = self.base + Duration::from_nanos(self.last.load(Ordering::SeqCst));
                let deadline = since + limit;
                if Instant::now() >= deadline {
                    return;
                }
                deadline
            } else {
                // Looked at again a whole limit later: a stream that ends
                // meanwhile is an activity of that time, no earlier.
                Instant::now() + limit
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// A stream in flight (see [`StreamActivity::begin`]). A clone counts as
/// one more: the stream is in flight until the last is dropped.
#[derive(Debug)]
pub(crate) struct ActiveStream(Arc<StreamActivity>);

impl Clone for ActiveStream {
    fn clone(&self) -> Self {
        self.0.begin()
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.touch();
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its stream counted as in flight until hyper
/// has handed all of it to `h2` (and drops it); what flow control still
/// holds back is sent before a graceful shutdown closes the connection.
pub(crate) struct Held {
    body: crate::body::Body,
    _active: ActiveStream,
}

impl Held {
    pub(crate) fn new(body: crate::body::Body, active: ActiveStream) -> Self {
        Self {
            body,
            _active: active,
        }
    }
}

impl http_body::Body for Held {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `idle_for(limit)` has resolved after the clock moves by
    /// `after`.
    async fn idle_after(
        idle: &mut Pin<&mut impl std::future::Future<Output = ()>>,
        after: Duration,
    ) -> bool {
        tokio::time::sleep(after).await;
        futures_util::poll!(idle.as_mut()).is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_streams_is_idle_after_the_limit() {
        let streams = StreamActivity::new();
        let idle = streams.idle_for(Duration::from_secs(10));
        let mut idle = std::pin::pin!(idle);
        assert!(!idle_after(&mut idle, Duration::from_millis(9_999)).await);
        assert!(idle_after(&mut idle, Duration::from_millis(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_in_flight_holds_it_and_its_end_starts_the_count() {
        let streams = StreamActivity::new();
        let idle = streams.idle_for(Duration::from_secs(10));
        let mut idle = std::pin::pin!(idle);
        assert!(!idle_after(&mut idle, Duration::from_secs(5)).await);
        let stream = streams.begin();
        // In flight for three limits: not idle.
        assert!(!idle_after(&mut idle, Duration::from_secs(30)).await);
        drop(stream);
        assert!(!idle_after(&mut idle, Duration::from_millis(9_999)).await);
        assert!(idle_after(&mut idle, Duration::from_millis(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn the_count_starts_at_a_streams_end_not_at_the_last_look() {
        let streams = StreamActivity::new();
        let idle = streams.idle_for(Duration::from_secs(10));
        let mut idle = std::pin::pin!(idle);
        // Looked at (t = 5 s) while a stream is in flight, which ends at
        // t = 12 s: idle at 22 s, not at 15 s.
        let stream = streams.begin();
        assert!(!idle_after(&mut idle, Duration::from_secs(5)).await);
        tokio::time::sleep(Duration::from_secs(7)).await;
        drop(stream);
        assert!(!idle_after(&mut idle, Duration::from_millis(9_999)).await);
        assert!(idle_after(&mut idle, Duration::from_millis(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_clone_holds_it_after_the_first_goes() {
        let streams = StreamActivity::new();
        let idle = streams.idle_for(Duration::from_secs(10));
        let mut idle = std::pin::pin!(idle);
        let stream = streams.begin();
        let splice = stream.clone();
        drop(stream);
        assert!(!idle_after(&mut idle, Duration::from_secs(30)).await);
        drop(splice);
        assert!(!idle_after(&mut idle, Duration::from_millis(9_999)).await);
        assert!(idle_after(&mut idle, Duration::from_millis(1)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_came_and_went_restarts_the_count() {
        let streams = StreamActivity::new();
        let idle = streams.idle_for(Duration::from_secs(10));
        let mut idle = std::pin::pin!(idle);
        tokio::time::sleep(Duration::from_secs(8)).await;
        drop(streams.begin());
        // 10 s from the start, 2 s from the stream.
        assert!(!idle_after(&mut idle, Duration::from_secs(2)).await);
        assert!(!idle_after(&mut idle, Duration::from_millis(7_999)).await);
        assert!(idle_after(&mut idle, Duration::from_millis(1)).await);
    }
}
