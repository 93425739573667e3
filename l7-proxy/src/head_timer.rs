//! The timer a captured HTTP/1.1 connection's hyper server runs its head
//! timeout on (a connection hyper serves from a request [`crate::h1server`]
//! left to it: an upgrade, `Expect`, HTTP/1.0).
//!
//! hyper starts the head timeout (`header_read_timeout`) as soon as a
//! response is out, before the next head's first byte: by itself it would
//! also close every keep-alive connection that carries no request for that
//! long (10 s by default), sooner than most client pools let theirs go, and
//! a client that sends just as the proxy closes gets an error. [`HeadTimer`]
//! gives hyper a timer that waits for the first bytes of the head for the
//! keep-alive idle timeout, and from those bytes for the head timeout: a
//! slow or stalled head is cut as before, an idle connection stays open.
//!
//! The connection's reads are counted ([`crate::io::Rewind::count_reads`]);
//! hyper looks at its head timer whenever a read leaves the head
//! incomplete, which is when the count has moved. Bytes of a next head
//! read along with the previous request (pipelined) are in hyper's buffer
//! before the timer starts, where it cannot see them: if that head then
//! stalls, it has the idle timeout. (hyper 1.12 uses an HTTP/1.1 server's
//! timer for the head timeout only; `sleep_until` relies on that.)

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::time::Instant;

/// A [`hyper::rt::Timer`] for one HTTP/1.1 server connection whose only
/// timer is the head timeout (hyper's server uses it for nothing else).
#[derive(Clone, Debug)]
pub(crate) struct HeadTimer {
    /// Reads of the connection that returned bytes.
    reads: Arc<AtomicU64>,
    /// The head timeout hyper is configured with.
    head: Duration,
    /// How long the connection may wait for a head's first bytes.
    idle: Duration,
}

impl HeadTimer {
    pub(crate) fn new(reads: Arc<AtomicU64>, head: Duration, idle: Duration) -> Self {
        Self { reads, head, idle }
    }
}

impl hyper::rt::Timer for HeadTimer {
    /// tokio's clock, which the sleeps run on (and tests pause).
    fn now(&self) -> std::time::Instant {
        Instant::now().into_std()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    /// hyper asks for `now + head timeout` when it starts waiting for a
    /// head: until its first bytes, the connection is idle.
    fn sleep_until(&self, deadline: std::time::Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let deadline = Instant::from_std(deadline);
        let start = deadline.checked_sub(self.head).unwrap_or(deadline);
        Box::pin(HeadSleep {
            sleep: tokio::time::sleep_until(start + self.idle),
            waiting: Some(Waiting {
                reads: self.reads.clone(),
                at_start: self.reads.load(Ordering::Relaxed),
                head: self.head,
            }),
        })
    }
}

/// A head that has not begun yet.
struct Waiting {
    reads: Arc<AtomicU64>,
    at_start: u64,
    head: Duration,
}

pin_project_lite::pin_project! {
    /// Fires at the keep-alive idle timeout, or, once the connection has
    /// read bytes since it started, at the head timeout from then.
    struct HeadSleep {
        #[pin]
        sleep: tokio::time::Sleep,
        waiting: Option<Waiting>,
    }
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if let Some(w) = this.waiting
            && w.reads.load(Ordering::Relaxed) != w.at_start
        {
            // The head's first bytes came in since the last look: it has
            // the head timeout from about now.
            let until = Instant::now() + w.head;
            *this.waiting = None;
            this.sleep.as_mut().reset(until);
        }
        this.sleep.poll(cx)
    }
}

impl hyper::rt::Sleep for HeadSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer as _;

    fn timer() -> (Arc<AtomicU64>, HeadTimer) {
        let reads = Arc::new(AtomicU64::new(0));
        let t = HeadTimer::new(
            reads.clone(),
            Duration::from_secs(10),
            Duration::from_secs(600),
        );
        (reads, t)
    }

    fn ready(s: &mut Pin<Box<dyn hyper::rt::Sleep>>) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        s.as_mut().poll(&mut cx).is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn waits_the_idle_timeout_for_a_head_to_begin() {
        let (_reads, t) = timer();
        let mut s = t.sleep_until(t.now() + Duration::from_secs(10));
        assert!(!ready(&mut s));
        tokio::time::advance(Duration::from_secs(599)).await;
        assert!(!ready(&mut s), "fired before the idle timeout");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(ready(&mut s), "not fired after the idle timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn a_begun_head_has_the_head_timeout_from_its_first_bytes() {
        let (reads, t) = timer();
        let mut s = t.sleep_until(t.now() + Duration::from_secs(10));
        assert!(!ready(&mut s));
        tokio::time::advance(Duration::from_secs(100)).await;
        // Bytes, not a whole head: hyper looks at its timer.
        reads.fetch_add(1, Ordering::Relaxed);
        assert!(!ready(&mut s));
        tokio::time::advance(Duration::from_secs(9)).await;
        reads.fetch_add(1, Ordering::Relaxed);
        assert!(
            !ready(&mut s),
            "more bytes do not restart it, nor end it early"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(ready(&mut s), "a head begun 11 s ago is still running");
    }

    #[tokio::test(start_paused = true)]
    async fn reads_before_the_timer_started_do_not_count() {
        let (reads, t) = timer();
        reads.fetch_add(5, Ordering::Relaxed);
        let mut s = t.sleep_until(t.now() + Duration::from_secs(10));
        assert!(!ready(&mut s));
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(
            !ready(&mut s),
            "the previous request's reads began this head"
        );
    }
}
