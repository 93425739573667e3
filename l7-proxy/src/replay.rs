//! Request bodies for retries and mirrors: recorded while they stream to the
//! first attempt, replayed whole to later attempts and to mirrors.
//!
//! The first attempt gets the caller's body as it comes (a streaming upload,
//! a gRPC stream whose caller waits for an answer before it sends more), so a
//! rule with retries or mirrors never holds a request back to read its body
//! first. The copy is kept up to the per-body limit and the proxy-wide buffer
//! budget; past either, or when the body fails, the copy is given up and the
//! request is not sent again. A retry needs the whole body by the time the
//! attempt's answer is in; a mirror goes once the body has ended.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use crate::body::{Body, BoxError, boxed, full};

/// Buffer units of the proxy-wide budget
/// ([`ProxySettings::max_buffered_total_bytes`](crate::config::ProxySettings)).
pub(crate) const BUDGET_UNIT: usize = 1024;

/// A whole request body kept for retries and mirrors: its data, its
/// trailers, and its share of the proxy's buffer budget (given back when the
/// last copy goes).
#[derive(Clone)]
pub(crate) struct Replayable {
    data: Bytes,
    trailers: Option<HeaderMap>,
    _budget: Arc<Option<OwnedSemaphorePermit>>,
}

impl Replayable {
    pub(crate) fn empty() -> Self {
        Self {
            data: Bytes::new(),
            trailers: None,
            _budget: Arc::new(None),
        }
    }

    /// The body again.
    pub(crate) fn body(&self) -> Body {
        // Without trailers, a body of known length (and known to be empty
        // when it is): what is sent, and its content-length, stay as for
        // the original request.
        let Some(t) = &self.trailers else {
            return full(self.data.clone());
        };
        let mut frames = Vec::with_capacity(2);
        if !self.data.is_empty() {
            frames.push(Ok::<_, BoxError>(Frame::data(self.data.clone())));
        }
        frames.push(Ok(Frame::trailers(t.clone())));
        boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            frames,
        )))
    }
}

/// The copy of one request's body, shared by the body streaming to an
/// attempt ([`Recording::take`]) and the request's handler.
pub(crate) struct Recording {
    inner: Mutex<Record>,
    /// The caller's body while no attempt has it: before the first, and
    /// again after an attempt that gave it back unread (its endpoint could
    /// not be reached).
    unread: Mutex<Unread>,
    limit: usize,
    budget: Arc<Semaphore>,
}

enum Record {
    Copying {
        buf: BytesMut,
        trailers: Option<HeaderMap>,
        permit: Option<OwnedSemaphorePermit>,
        /// Mirrors waiting for the whole body.
        waiting: Vec<oneshot::Sender<Replayable>>,
    },
    Whole(Replayable),
    /// Over a limit, or the body failed (how, when it did).
    GivenUp(Option<BodyFailure>),
}

impl Recording {
    /// A recording of `body`, of which nothing has been read yet, kept up to
    /// `limit` bytes and within `budget` (units of [`BUDGET_UNIT`]).
    pub(crate) fn new(body: Body, limit: usize, budget: Arc<Semaphore>) -> Arc<Self> {
        let rec = Arc::new(Self {
            inner: Mutex::new(Record::Copying {
                buf: BytesMut::new(),
                trailers: None,
                permit: None,
                waiting: Vec::new(),
            }),
            unread: Mutex::new(Unread::default()),
            limit,
            budget,
        });
        if body.is_end_stream() {
            rec.finish();
        }
        rec.unread().body = Some(body);
        rec
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unread(&self) -> std::sync::MutexGuard<'_, Unread> {
        self.unread.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The caller's body for an attempt, passing through while it is copied;
    /// `None` once an attempt has read from it.
    pub(crate) fn take(self: &Arc<Self>) -> Option<Body> {
        let body = self.unread().body.take()?;
        Some(boxed(Tee {
            inner: Some(body),
            rec: self.clone(),
            read: false,
            for_mirror: false,
        }))
    }

    /// Whether no attempt has read from the caller's body yet: the next one
    /// can have it as it is.
    pub(crate) fn is_unread(&self) -> bool {
        self.unread().body.is_some()
    }

    /// The request's handler is done with the recording (its answer is on
    /// its way). A mirror still waiting gets the body once it ends: read
    /// here when no attempt took it (there was no endpoint), read on by the
    /// attempt otherwise. Without a mirror, the copy stops here, giving its
    /// share of the buffer budget back while a long stream goes on.
    pub(crate) fn done(self: &Arc<Self>, spawn: impl FnOnce(BoxFuture)) {
        // One step with the hand-back of a Tee dropped unread on another
        // task: either the body is back by now, or it will not come back.
        let unread = {
            let mut u = self.unread();
            u.handler_done = true;
            u.body.take()
        };
        if !self.mirrors_wait() {
            self.give_up(None);
            return;
        }
        if let Some(body) = unread {
            let tee = Tee {
                inner: Some(body),
                rec: self.clone(),
                read: true,
                for_mirror: true,
            };
            spawn(Box::pin(read_for_mirrors(self.clone(), boxed(tee))));
        }
    }

    /// The body, once it has been read whole and kept.
    pub(crate) fn whole(&self) -> Option<Replayable> {
        match &*self.lock() {
            Record::Whole(r) => Some(r.clone()),
            _ => None,
        }
    }

    /// Whether the copy was given up (over a limit, or the body failed).
    pub(crate) fn given_up(&self) -> bool {
        matches!(&*self.lock(), Record::GivenUp(_))
    }

    /// How the caller's body failed, if it did.
    pub(crate) fn body_error(&self) -> Option<BodyFailure> {
        match &*self.lock() {
            Record::GivenUp(e) => e.clone(),
            _ => None,
        }
    }

    /// The whole body once it has ended; never, when the copy is given up.
    pub(crate) fn when_whole(&self) -> oneshot::Receiver<Replayable> {
        let (tx, rx) = oneshot::channel();
        match &mut *self.lock() {
            Record::Copying { waiting, .. } => waiting.push(tx),
            Record::Whole(r) => {
                let _ = tx.send(r.clone());
            }
            Record::GivenUp(_) => {}
        }
        rx
    }

    /// Whether a mirror still waits for the whole body (one whose task is
    /// gone does not).
    fn mirrors_wait(&self) -> bool {
        match &mut *self.lock() {
            Record::Copying { waiting, .. } => {
                waiting.retain(|w| !w.is_closed());
                !waiting.is_empty()
            }
            _ => false,
        }
    }

    fn add_data(&self, data: &Bytes) {
        let mut record = self.lock();
        let Record::Copying { buf, permit, .. } = &mut *record else {
            return;
        };
        let units = |n: usize| n.div_ceil(BUDGET_UNIT);
        let total = buf.len() + data.len();
        let more = units(total) - units(buf.len());
        let granted = total <= self.limit
            && (more == 0
                || u32::try_from(more)
                    .ok()
                    .and_then(|n| self.budget.clone().try_acquire_many_owned(n).ok())
                    .map(|p| match permit {
                        Some(have) => have.merge(p),
                        None => *permit = Some(p),
                    })
                    .is_some());
        if granted {
            buf.extend_from_slice(data);
        } else {
            tracing::debug!(
                "request body over {} bytes or the proxy's buffer budget: sent once, without \
                 retries or mirrors",
                self.limit
            );
            // The copy, its budget and the waiting mirrors go.
            *record = Record::GivenUp(None);
        }
    }

    fn add_trailers(&self, t: &HeaderMap) {
        if let Record::Copying { trailers, .. } = &mut *self.lock() {
            *trailers = Some(t.clone());
        }
    }

    fn finish(&self) {
        let mut record = self.lock();
        let Record::Copying {
            buf,
            trailers,
            permit,
            waiting,
        } = &mut *record
        else {
            return;
        };
        let whole = Replayable {
            data: std::mem::take(buf).freeze(),
            trailers: trailers.take(),
            _budget: Arc::new(permit.take()),
        };
        for w in waiting.drain(..) {
            let _ = w.send(whole.clone());
        }
        *record = Record::Whole(whole);
    }

    fn give_up(&self, error: Option<BodyFailure>) {
        let mut record = self.lock();
        if let Record::Copying { .. } = &*record {
            *record = Record::GivenUp(error);
        }
    }
}

/// How the caller's body failed.
#[derive(Clone, Debug)]
pub(crate) struct BodyFailure {
    pub message: String,
    /// It stopped coming ([`crate::body::TimedOut`]).
    pub timed_out: bool,
}

/// A future the caller spawns.
pub(crate) type BoxFuture = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Reads `body` (a Tee of `rec`) on for the copy mirrors wait for, while one
/// does: not a byte more once the copy is given up or its mirrors are gone.
async fn read_for_mirrors(rec: Arc<Recording>, mut body: Body) {
    use http_body_util::BodyExt as _;
    while rec.mirrors_wait() {
        match body.frame().await {
            Some(Ok(_)) => {}
            _ => return,
        }
    }
}

/// What of the caller's body no attempt holds.
#[derive(Default)]
struct Unread {
    body: Option<Body>,
    /// The handler has returned: no attempt will take the body again.
    handler_done: bool,
}

/// The caller's body on its way to an attempt, copied as it goes.
struct Tee {
    /// `None` once given back.
    inner: Option<Body>,
    rec: Arc<Recording>,
    /// A frame has been read: the body cannot go to another attempt whole.
    read: bool,
    /// Already read on for a mirror: not handed on again when dropped.
    for_mirror: bool,
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(&mut *inner).poll_frame(cx));
        this.read = true;
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    this.rec.add_data(d);
                } else if let Some(t) = f.trailers_ref() {
                    this.rec.add_trailers(t);
                }
                // Trailers end a body; so does its last byte when its
                // length was declared (the consumer may not poll again).
                if f.is_trailers() || inner.is_end_stream() {
                    this.rec.finish();
                }
            }
            None => this.rec.finish(),
            Some(Err(e)) => this.rec.give_up(Some(BodyFailure {
                message: e.to_string(),
                timed_out: e.is::<crate::body::TimedOut>(),
            })),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else {
            return;
        };
        let rec = &self.rec;
        // Never read (the attempt's endpoint could not be reached): the next
        // attempt takes the body as it is.
        let body = {
            let mut u = rec.unread();
            if !self.read && !u.handler_done {
                u.body = Some(body);
                return;
            }
            body
        };
        // The attempt stopped before the body's end (its workload answered
        // early): a mirror still waiting gets the rest read for it.
        if !self.for_mirror
            && rec.mirrors_wait()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let rest = Tee {
                inner: Some(body),
                rec: rec.clone(),
                read: true,
                for_mirror: true,
            };
            runtime.spawn(read_for_mirrors(rec.clone(), boxed(rest)));
            return;
        }
        // Nobody will finish the copy.
        rec.give_up(None);
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    fn replayable(data: &'static [u8], trailers: Option<HeaderMap>) -> Replayable {
        Replayable {
            data: Bytes::from_static(data),
            trailers,
            _budget: Arc::new(None),
        }
    }

    #[tokio::test]
    async fn a_replayed_body_keeps_its_length_and_its_trailers() {
        // Without trailers: the exact length, and an empty body known to be
        // over (a GET is sent with END_STREAM on its headers, not chunked).
        let empty = replayable(b"", None).body();
        assert!(empty.is_end_stream());
        assert_eq!(empty.size_hint().exact(), Some(0));
        let b = replayable(b"payload", None).body();
        assert_eq!(b.size_hint().exact(), Some(7));
        assert_eq!(b.collect().await.unwrap().to_bytes(), "payload");
        // With trailers: data, then the trailers.
        let mut t = HeaderMap::new();
        t.insert("x-checksum", "c0ffee".parse().unwrap());
        let c = replayable(b"payload", Some(t))
            .body()
            .collect()
            .await
            .unwrap();
        assert_eq!(c.trailers().unwrap()["x-checksum"], "c0ffee");
        assert_eq!(c.to_bytes(), "payload");
    }

    /// A body fed by the test, frame by frame.
    fn channel_body() -> (
        tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
        Body,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        (tx, boxed(http_body_util::StreamBody::new(stream)))
    }

    fn data(b: &'static [u8]) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(Bytes::from_static(b)))
    }

    fn spawn(f: BoxFuture) {
        tokio::spawn(f);
    }

    #[tokio::test]
    async fn the_first_attempt_gets_each_frame_as_it_comes_and_the_copy_once_whole() {
        let budget = Arc::new(Semaphore::new(64));
        let (tx, body) = channel_body();
        let rec = Recording::new(body, 4096, budget.clone());
        let mut tee = rec.take().unwrap();
        assert!(rec.take().is_none(), "one attempt at a time");
        let mirror = rec.when_whole();
        tx.send(data(b"part one, ")).await.unwrap();
        // The frame passes before the body has ended: nothing waits for it.
        let f = tee.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "part one, ");
        assert!(rec.whole().is_none() && !rec.given_up());
        assert_eq!(budget.available_permits(), 63, "one unit held for the copy");
        tx.send(data(b"part two")).await.unwrap();
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        tx.send(Ok(Frame::trailers(t))).await.unwrap();
        drop(tx);
        let rest = tee.collect().await.unwrap();
        assert_eq!(rest.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(rest.to_bytes(), "part two");
        // Whole: for a retry now, and for the mirror that waited.
        let again = rec.whole().unwrap().body().collect().await.unwrap();
        assert_eq!(again.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(again.to_bytes(), "part one, part two");
        let copy = mirror.await.unwrap().body().collect().await.unwrap();
        assert_eq!(copy.to_bytes(), "part one, part two");
        // The budget comes back with the last copy.
        drop(rec);
        assert_eq!(budget.available_permits(), 64);
    }

    #[tokio::test]
    async fn a_body_of_declared_length_is_whole_with_its_last_byte() {
        let rec = Recording::new(full("abc"), 4096, Arc::new(Semaphore::new(64)));
        let mut tee = rec.take().unwrap();
        tee.frame().await.unwrap().unwrap();
        assert!(tee.is_end_stream());
        let again = rec.whole().expect("whole without a poll for the end");
        assert_eq!(again.body().collect().await.unwrap().to_bytes(), "abc");
        // An empty body is whole at once.
        let rec = Recording::new(crate::body::empty(), 4096, Arc::new(Semaphore::new(64)));
        assert!(rec.whole().is_some());
    }

    #[tokio::test]
    async fn a_body_an_attempt_never_read_goes_to_the_next_one_as_it_is() {
        let (tx, body) = channel_body();
        let rec = Recording::new(body, 4096, Arc::new(Semaphore::new(64)));
        // The first endpoint could not be reached: its attempt drops the
        // body unread.
        drop(rec.take().unwrap());
        assert!(rec.is_unread() && !rec.given_up());
        let mut tee = rec.take().expect("the body again");
        tx.send(data(b"all of it")).await.unwrap();
        drop(tx);
        let got = (&mut tee).collect().await.unwrap().to_bytes();
        assert_eq!(got, "all of it");
        assert!(rec.whole().is_some());
    }

    #[tokio::test]
    async fn the_copy_is_given_up_past_a_limit_a_failure_or_an_early_drop() {
        // Over the per-body limit: the body goes on, the copy and its
        // budget go, and the mirror that waited is told.
        let budget = Arc::new(Semaphore::new(64));
        let (tx, body) = channel_body();
        let rec = Recording::new(body, 8, budget.clone());
        let mirror = rec.when_whole();
        let mut tee = rec.take().unwrap();
        tx.send(data(b"12345")).await.unwrap();
        tee.frame().await.unwrap().unwrap();
        assert_eq!(budget.available_permits(), 63);
        tx.send(data(b"6789")).await.unwrap();
        let f = tee.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "6789", "the body still passes");
        assert!(rec.given_up() && rec.body_error().is_none());
        assert_eq!(budget.available_permits(), 64);
        assert!(mirror.await.is_err());
        drop(tx);
        assert!(tee.frame().await.is_none());
        assert!(rec.whole().is_none(), "given up stays given up");
        // Over the proxy-wide budget.
        let rec = Recording::new(full(vec![b'x'; 2000]), 4096, Arc::new(Semaphore::new(1)));
        rec.take().unwrap().frame().await.unwrap().unwrap();
        assert!(rec.given_up());
        // A failing body: its error is kept for the caller's answer.
        let (tx, body) = channel_body();
        let rec = Recording::new(body, 4096, Arc::new(Semaphore::new(64)));
        let mut tee = rec.take().unwrap();
        tx.send(Err("the request body sent nothing for 300ms".into()))
            .await
            .unwrap();
        assert!(tee.frame().await.unwrap().is_err());
        let failure = rec.body_error().unwrap();
        assert_eq!(failure.message, "the request body sent nothing for 300ms");
        assert!(!failure.timed_out);
        // Dropped before its end, no mirror waiting: no copy.
        let (tx, body) = channel_body();
        let rec = Recording::new(body, 4096, Arc::new(Semaphore::new(64)));
        let mut tee = rec.take().unwrap();
        tx.send(data(b"half")).await.unwrap();
        tee.frame().await.unwrap().unwrap();
        drop(tee);
        assert!(rec.given_up() && rec.whole().is_none());
    }

    #[tokio::test]
    async fn once_the_handler_is_done_the_copy_goes_on_only_for_a_waiting_mirror() {
        // No mirror: a long stream stops holding the budget.
        let budget = Arc::new(Semaphore::new(64));
        let (tx, body) = channel_body();
        let rec = Recording::new(body, 4096, budget.clone());
        let mut tee = rec.take().unwrap();
        tx.send(data(b"first")).await.unwrap();
        tee.frame().await.unwrap().unwrap();
        assert_eq!(budget.available_permits(), 63);
        rec.done(spawn);
        assert!(rec.given_up());
        assert_eq!(budget.available_permits(), 64);
        tx.send(data(b"more")).await.unwrap();
        let f = tee.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "more", "the stream goes on");
        // A mirror, and no attempt ever took the body (no endpoint): it is
        // read for the mirror.
        let (tx, body) = channel_body();
        let rec = Recording::new(body, 4096, Arc::new(Semaphore::new(64)));
        let mirror = rec.when_whole();
        rec.done(spawn);
        tx.send(data(b"for the mirror")).await.unwrap();
        drop(tx);
        let copy = mirror.await.unwrap().body().collect().await.unwrap();
        assert_eq!(copy.to_bytes(), "for the mirror");
        // A mirror, and the attempt stopped reading half-way (its workload
        // answered early): the rest is read for the mirror.
        let (tx, body) = channel_body();
        let rec = Recording::new(body, 4096, Arc::new(Semaphore::new(64)));
        let mirror = rec.when_whole();
        let mut tee = rec.take().unwrap();
        tx.send(data(b"early ")).await.unwrap();
        tee.frame().await.unwrap().unwrap();
        rec.done(spawn);
        drop(tee);
        tx.send(data(b"and late")).await.unwrap();
        drop(tx);
        let copy = mirror.await.unwrap().body().collect().await.unwrap();
        assert_eq!(copy.to_bytes(), "early and late");
    }

    #[tokio::test]
    async fn a_reader_for_mirrors_reads_no_more_once_they_cannot_have_the_copy() {
        // Past the limit the copy is given up: the reader stops there and
        // lets go of the caller's body, which is still coming.
        let (tx, body) = channel_body();
        let rec = Recording::new(body, 8, Arc::new(Semaphore::new(64)));
        let mirror = rec.when_whole();
        let (finished, reader_done) = oneshot::channel();
        rec.done(|read| {
            tokio::spawn(async move {
                read.await;
                let _ = finished.send(());
            });
        });
        tx.send(data(b"123456789")).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), reader_done)
            .await
            .expect("the reader stops while the body is still open")
            .unwrap();
        assert!(mirror.await.is_err());
        assert!(tx.is_closed(), "the rest of the stream is not read");
        // A mirror whose task is gone waits for nothing: no reader at all.
        let (tx, body) = channel_body();
        let rec = Recording::new(body, 4096, Arc::new(Semaphore::new(64)));
        drop(rec.when_whole());
        rec.done(|_| panic!("nothing to read for"));
        assert!(rec.given_up());
        drop(rec);
        assert!(tx.is_closed());
    }
}
