//! Request bodies for retries and mirrors: recorded while they stream to the
//! first attempt, replayed whole to later attempts and to mirrors.
//!
//! The first attempt gets the caller's body as it comes (a streaming upload,
//! a gRPC stream whose caller waits for an answer before it sends more), so a
//! rule with retries or mirrors never holds a request back to read its body
//! first. The copy is kept up to the per-body limit and the proxy-wide buffer
//! budget; past either, or when the body fails, the copy is given up and the
//! request is not sent again. A mirror goes once the body has ended.
//!
//! A retry does not wait for the body's end either: when an attempt is
//! answered before its body has all gone (a workload shedding load answers
//! 503 to an upload's head), the caller's body is taken back from it
//! ([`Recording::recall`]) and the next attempt gets what was kept, then the
//! rest as it comes.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
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
    budget: Arc<Option<OwnedSemaphorePermit>>,
}

impl Replayable {
    pub(crate) fn empty() -> Self {
        Self {
            data: Bytes::new(),
            trailers: None,
            budget: Arc::new(None),
        }
    }

    /// The body, holding this copy's share of the budget for as long as
    /// the body lives (until it is sent, or given up): a mirror that waits
    /// for an answer long after its body went must not hold buffer budget
    /// (every body of every route would go unbuffered, unretried, when
    /// mirrors of a target that hangs had it all).
    pub(crate) fn into_body(self) -> Body {
        boxed(Holding {
            body: self.body(),
            _budget: self.budget,
        })
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

pin_project_lite::pin_project! {
    /// A body that holds a budget share until it is dropped.
    struct Holding {
        #[pin]
        body: Body,
        _budget: Arc<Option<OwnedSemaphorePermit>>,
    }
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The copy of one request's body, shared by the body streaming to an
/// attempt ([`Recording::take`]) and the request's handler.
pub(crate) struct Recording {
    inner: Mutex<Record>,
    /// Where the attempt reading the caller's body holds it, for
    /// [`Recording::recall`] (weak: the slot holds the recording).
    lent: Mutex<std::sync::Weak<Mutex<Lent>>>,
    /// The caller's body while no attempt has it: before the first, and
    /// again after an attempt that gave it back (its endpoint could not be
    /// reached) or had it taken back (see [`Recording::recall`]).
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
            lent: Mutex::new(std::sync::Weak::new()),
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

    /// The caller's body for an attempt, passing through while it is copied:
    /// as it is when no attempt has read from it, else what was kept of it
    /// then the rest as it comes (one attempt was answered before the body
    /// had all gone to it). `None` while an attempt holds the body, or when
    /// the copy of what was read is gone.
    pub(crate) fn take(self: &Arc<Self>) -> Option<Body> {
        let (body, partial) = {
            let mut u = self.unread();
            let body = u.body.take()?;
            (body, std::mem::take(&mut u.partial))
        };
        // What was read so far, as kept: the copy goes on from there (no
        // other reader has the body meanwhile).
        let kept = if partial {
            match &*self.lock() {
                Record::Copying { buf, .. } => Some(Bytes::copy_from_slice(buf)),
                // The rest had ended by the time it came back.
                Record::Whole(whole) => return Some(whole.body()),
                Record::GivenUp(_) => return None,
            }
        } else {
            None
        };
        let slot = Lent::slot(body, self.clone());
        *self.lent.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(&slot);
        let tee = Tee {
            slot,
            read: partial,
            for_mirror: false,
        };
        Some(match kept {
            None => boxed(tee),
            Some(kept) => boxed(Resumed {
                kept: (!kept.is_empty()).then_some(kept),
                rest: tee,
            }),
        })
    }

    /// Whether the next attempt can have the body: no attempt holds it, and
    /// either none read from it or the copy of what was read is kept.
    pub(crate) fn is_unread(&self) -> bool {
        let u = self.unread();
        u.body.is_some() && (!u.partial || self.copying())
    }

    /// Takes the caller's body back from the attempt reading it, for the
    /// next one (see [`Recording::take`]): that attempt's body ends there
    /// with an error. Whether the next attempt can have the body: taken
    /// back, or back already; not when the copy of what was read is gone
    /// (over a limit, failed, or ended: see [`Recording::whole`]).
    pub(crate) fn recall(&self) -> bool {
        let lent = std::mem::take(&mut *self.lent.lock().unwrap_or_else(|e| e.into_inner()));
        let Some(slot) = lent.upgrade() else {
            // Its attempt let go of it: back already, or gone.
            return self.is_unread();
        };
        // Under the slot's lock: the attempt's reader neither records a
        // frame nor lets go of the body meanwhile.
        let mut lent = slot.lock().unwrap_or_else(|e| e.into_inner());
        if lent.body.is_none() {
            drop(lent);
            return self.is_unread();
        }
        if !self.copying() {
            // Nothing to resume from: the attempt keeps the body.
            return false;
        }
        let body = lent.body.take();
        // The recording is the next attempt's to hold, not this one's.
        let _rec = lent.rec.take();
        let waker = lent.waker.take();
        {
            let mut u = self.unread();
            u.body = body;
            u.partial = true;
        }
        drop(lent);
        // The attempt's upload learns at once that its body ended (it may
        // wait for more of it, and would not hear of the caller again).
        if let Some(w) = waker {
            w.wake();
        }
        true
    }

    fn copying(&self) -> bool {
        matches!(&*self.lock(), Record::Copying { .. })
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
                slot: Lent::slot(body, self.clone()),
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
            budget: Arc::new(permit.take()),
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

impl BodyFailure {
    /// The caller's answer: `408` when it stopped coming, else `400`, with
    /// the reason.
    pub(crate) fn answer(&self) -> (http::StatusCode, String) {
        let status = if self.timed_out {
            http::StatusCode::REQUEST_TIMEOUT
        } else {
            http::StatusCode::BAD_REQUEST
        };
        (
            status,
            format!("reading the request body: {}", self.message),
        )
    }

    fn of(e: &BoxError) -> Self {
        Self {
            message: e.to_string(),
            timed_out: e.is::<crate::body::TimedOut>(),
        }
    }
}

/// Where a body sent once notes how it failed: the caller's failure, which
/// the attempt reports as the endpoint's (a 502) without it.
pub(crate) type FailureNote = std::sync::Arc<std::sync::OnceLock<BodyFailure>>;

/// `body`, noting in the returned note how it fails, if it does (a body
/// that has ended already is passed on as it is, with no note).
pub(crate) fn noted(body: Body) -> (Body, Option<FailureNote>) {
    if body.is_end_stream() {
        return (body, None);
    }
    let note = FailureNote::default();
    (
        boxed(Noted {
            inner: body,
            note: note.clone(),
        }),
        Some(note),
    )
}

pin_project_lite::pin_project! {
    struct Noted {
        #[pin]
        inner: Body,
        note: FailureNote,
    }
}

impl http_body::Body for Noted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(e))) = &frame {
            let _ = this.note.set(BodyFailure::of(e));
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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
    /// An attempt read part of `body` before it was taken back: the next
    /// one gets the copy of that part first.
    partial: bool,
    /// The handler has returned: no attempt will take the body again.
    handler_done: bool,
}

/// The caller's body while an attempt reads it.
type Slot = Arc<Mutex<Lent>>;

struct Lent {
    /// Empty once given back or taken back.
    body: Option<Body>,
    /// Where its frames are copied; goes with the body.
    rec: Option<Arc<Recording>>,
    /// The reader's, while it waits for the body.
    waker: Option<Waker>,
}

impl Lent {
    fn slot(body: Body, rec: Arc<Recording>) -> Slot {
        Arc::new(Mutex::new(Lent {
            body: Some(body),
            rec: Some(rec),
            waker: None,
        }))
    }
}

/// Recalled: the caller's body was taken back for another attempt.
#[derive(Debug, thiserror::Error)]
#[error("the request body was taken back for a retry")]
pub(crate) struct Recalled;

/// The caller's body on its way to an attempt, copied as it goes.
struct Tee {
    /// The body and its recording; empty once given back or taken back.
    slot: Slot,
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
        let mut slot = this.slot.lock().unwrap_or_else(|e| e.into_inner());
        let lent = &mut *slot;
        let (Some(inner), Some(rec)) = (lent.body.as_mut(), lent.rec.as_ref()) else {
            // Taken back: this attempt's body ends here, without a word to
            // the copy, which goes on with the next attempt.
            return Poll::Ready(Some(Err(Recalled.into())));
        };
        let Poll::Ready(frame) = Pin::new(&mut *inner).poll_frame(cx) else {
            if !lent.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                lent.waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        };
        this.read = true;
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    rec.add_data(d);
                } else if let Some(t) = f.trailers_ref() {
                    rec.add_trailers(t);
                }
                // Trailers end a body; so does its last byte when its
                // length was declared (the consumer may not poll again).
                if f.is_trailers() || inner.is_end_stream() {
                    rec.finish();
                }
            }
            None => rec.finish(),
            Some(Err(e)) => rec.give_up(Some(BodyFailure::of(e))),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        // Taken back: not over, the next poll says why it ended.
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.body.as_ref().is_some_and(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.body
            .as_ref()
            .map_or_else(SizeHint::default, |b| b.size_hint())
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        let mut lent = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(body), Some(rec)) = (lent.body.take(), lent.rec.take()) else {
            return;
        };
        let rec = &rec;
        // While the handler may still send the request again, the body goes
        // back for its next attempt: as it is when never read (the
        // attempt's endpoint could not be reached), after the copy of what
        // was read otherwise (the attempt was answered, or failed, before
        // the body's end), unless that copy is gone. Under the slot's lock:
        // a recall finds the body lent or back, never in between.
        let body = {
            let mut u = rec.unread();
            if !u.handler_done && !self.for_mirror && (!self.read || rec.copying()) {
                u.body = Some(body);
                u.partial = self.read;
                return;
            }
            body
        };
        drop(lent);
        // The handler is done and the attempt stopped before the body's end
        // (its workload answered early): a mirror still waiting gets the
        // rest read for it.
        if !self.for_mirror
            && rec.mirrors_wait()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let rest = Tee {
                slot: Lent::slot(body, rec.clone()),
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

/// The body of an attempt after one that read part of it: the copy of that
/// part, then the rest of the caller's body as it comes.
struct Resumed {
    kept: Option<Bytes>,
    rest: Tee,
}

impl http_body::Body for Resumed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(kept) = self.kept.take() {
            return Poll::Ready(Some(Ok(Frame::data(kept))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.kept.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let kept = self.kept.as_ref().map_or(0, |k| k.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + kept);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + kept);
        }
        hint
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
            budget: Arc::new(None),
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
        // Dropped before its end, no mirror waiting, and the handler done
        // without sending it again: no copy.
        let (tx, body) = channel_body();
        let rec = Recording::new(body, 4096, Arc::new(Semaphore::new(64)));
        let mut tee = rec.take().unwrap();
        tx.send(data(b"half")).await.unwrap();
        tee.frame().await.unwrap().unwrap();
        drop(tee);
        assert!(!rec.given_up(), "kept for an attempt the handler may make");
        rec.done(spawn);
        assert!(rec.given_up() && rec.whole().is_none());
        assert!(tx.is_closed(), "nobody reads the rest");
    }

    #[tokio::test]
    async fn a_body_taken_back_mid_way_goes_on_to_the_next_attempt_after_its_copy() {
        let (tx, body) = channel_body();
        let rec = Recording::new(body, 4096, Arc::new(Semaphore::new(64)));
        let mirror = rec.when_whole();
        let mut first = rec.take().unwrap();
        tx.send(data(b"head of ")).await.unwrap();
        first.frame().await.unwrap().unwrap();
        // The first attempt's upload waits for more of the body...
        let upload = tokio::spawn(async move {
            let r = first.frame().await;
            (r, first)
        });
        // (It waits: its waker is with the body.)
        let waits = || {
            let lent = rec.lent.lock().unwrap().upgrade().unwrap();
            lent.lock().unwrap().waker.is_some()
        };
        while !waits() {
            tokio::task::yield_now().await;
        }
        // ...when its answer comes: the body is taken back for a retry, and
        // the upload hears of it at once.
        let held = Arc::strong_count(&rec);
        assert!(rec.recall());
        assert!(rec.is_unread());
        assert_eq!(
            Arc::strong_count(&rec),
            held - 1,
            "an upload still going holds no part of the copy"
        );
        let (r, first) = tokio::time::timeout(std::time::Duration::from_secs(10), upload)
            .await
            .expect("the waiting upload is woken")
            .unwrap();
        let err = r.unwrap().unwrap_err();
        assert!(err.is::<Recalled>(), "{err}");
        assert!(!rec.given_up(), "the first attempt's end is not the body's");
        drop(first);
        // The next attempt: the copy of what the first read, then the rest.
        let mut second = rec.take().expect("the body again");
        assert!(rec.take().is_none(), "one attempt at a time");
        let f = second.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "head of ");
        tx.send(data(b"the upload")).await.unwrap();
        drop(tx);
        let rest = second.collect().await.unwrap().to_bytes();
        assert_eq!(rest, "the upload");
        // Kept whole for a third attempt and for the mirror.
        let again = rec.whole().unwrap().body().collect().await.unwrap();
        assert_eq!(again.to_bytes(), "head of the upload");
        let copy = mirror.await.unwrap().body().collect().await.unwrap();
        assert_eq!(copy.to_bytes(), "head of the upload");
    }

    #[tokio::test]
    async fn a_body_cannot_be_taken_back_without_its_copy() {
        // Over the limit: the copy is gone, the attempt keeps the body.
        let (tx, body) = channel_body();
        let rec = Recording::new(body, 4, Arc::new(Semaphore::new(64)));
        let mut tee = rec.take().unwrap();
        tx.send(data(b"too long")).await.unwrap();
        tee.frame().await.unwrap().unwrap();
        assert!(!rec.recall());
        tx.send(data(b" and on")).await.unwrap();
        let f = tee.frame().await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), " and on", "the upload goes on");
        // Dropped mid-way, the copy gone: nothing for a next attempt.
        drop(tee);
        assert!(!rec.is_unread() && rec.take().is_none());
        // No attempt holds it: there for the next as it is.
        let rec = Recording::new(full("abc"), 4096, Arc::new(Semaphore::new(64)));
        assert!(rec.recall() && rec.is_unread());
        assert_eq!(
            rec.take().unwrap().collect().await.unwrap().to_bytes(),
            "abc"
        );
    }

    /// A body of declared length in pieces, saying what is left of it.
    struct Pieces(std::collections::VecDeque<Bytes>);

    impl http_body::Body for Pieces {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
        fn is_end_stream(&self) -> bool {
            self.0.is_empty()
        }
        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.0.iter().map(|b| b.len() as u64).sum())
        }
    }

    #[tokio::test]
    async fn a_resumed_body_keeps_its_declared_length() {
        let pieces = ["abc", "defg", "hij"].map(Bytes::from);
        let rec = Recording::new(
            boxed(Pieces(pieces.into())),
            4096,
            Arc::new(Semaphore::new(64)),
        );
        let mut first = rec.take().unwrap();
        assert_eq!(first.size_hint().exact(), Some(10));
        first.frame().await.unwrap().unwrap();
        // Taken back after its first piece: the next attempt's body says
        // the whole length (what was read, and what is left).
        assert!(rec.recall());
        let second = rec.take().unwrap();
        assert_eq!(second.size_hint().exact(), Some(10));
        assert!(!second.is_end_stream());
        assert_eq!(second.collect().await.unwrap().to_bytes(), "abcdefghij");
        assert!(rec.whole().is_some());
        // Read in part, then dropped while the handler is not done (its
        // attempt failed): the rest waits for the next attempt.
        let (tx, body) = channel_body();
        let rec = Recording::new(body, 4096, Arc::new(Semaphore::new(64)));
        let mut first = rec.take().unwrap();
        tx.send(data(b"abc")).await.unwrap();
        first.frame().await.unwrap().unwrap();
        drop(first);
        assert!(rec.is_unread());
        let second = rec.take().unwrap();
        assert_eq!(second.size_hint().lower(), 3, "the copy's bytes count");
        tx.send(data(b"def")).await.unwrap();
        drop(tx);
        assert_eq!(second.collect().await.unwrap().to_bytes(), "abcdef");
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
