//! Shutdown signals for connection tasks that cost nothing while the proxy
//! runs: each connection registers once (a lock per connection), instead of
//! polling a shared cancellation token on every wake-up (a lock per poll,
//! contended across worker threads).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::{sync::oneshot, task::AbortHandle};

#[derive(Default)]
pub(crate) struct Drain {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    draining: bool,
    stopped: bool,
    graceful: HashMap<u64, oneshot::Sender<()>>,
    tasks: HashMap<u64, Option<AbortHandle>>,
}

/// Unregisters on drop.
pub(crate) struct Registration {
    drain: Arc<Drain>,
    id: u64,
    task: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = self.drain.lock();
        if self.task {
            inner.tasks.remove(&self.id);
        } else {
            inner.graceful.remove(&self.id);
        }
    }
}

impl Drain {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A signal that fires when shutdown begins (at once if it has).
    pub fn watch(self: &Arc<Self>) -> (oneshot::Receiver<()>, Registration) {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        inner.next += 1;
        let id = inner.next;
        if inner.draining {
            let _ = tx.send(());
        } else {
            inner.graceful.insert(id, tx);
        }
        (
            rx,
            Registration {
                drain: self.clone(),
                id,
                task: false,
            },
        )
    }

    /// Reserves a place for a task about to be spawned; `None` once stopped.
    pub fn reserve_task(self: &Arc<Self>) -> Option<Registration> {
        let mut inner = self.lock();
        if inner.stopped {
            return None;
        }
        inner.next += 1;
        let id = inner.next;
        inner.tasks.insert(id, None);
        Some(Registration {
            drain: self.clone(),
            id,
            task: true,
        })
    }

    /// Records how to abort the task of `reg` (unless it already finished).
    pub fn set_abort(&self, reg_id: u64, handle: AbortHandle) {
        let mut inner = self.lock();
        if inner.stopped {
            handle.abort();
        } else if let Some(slot) = inner.tasks.get_mut(&reg_id) {
            *slot = Some(handle);
        }
    }

    /// Shutdown begins: every registered connection is asked to finish.
    pub fn begin(&self) {
        let mut inner = self.lock();
        inner.draining = true;
        for (_, tx) in inner.graceful.drain() {
            let _ = tx.send(());
        }
    }

    /// Whether the drain time is over (tasks being aborted).
    pub fn stopped(&self) -> bool {
        self.lock().stopped
    }

    /// The drain time is over: every registered task is aborted.
    pub fn stop(&self) {
        let mut inner = self.lock();
        inner.stopped = true;
        for h in inner.tasks.drain().filter_map(|(_, h)| h) {
            h.abort();
        }
    }
}

impl Registration {
    pub fn id(&self) -> u64 {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn begin_signals_watchers_and_stop_aborts_tasks() {
        let d = Arc::new(Drain::default());
        let (rx, reg) = d.watch();
        let task = d.reserve_task().unwrap();
        let id = task.id();
        let h = tokio::spawn(async move {
            let _task = task;
            std::future::pending::<()>().await
        });
        d.set_abort(id, h.abort_handle());
        d.begin();
        rx.await.expect("signalled");
        let (late, _late_reg) = d.watch();
        late.await
            .expect("a watcher after the start of the drain is signalled at once");
        d.stop();
        assert!(h.await.unwrap_err().is_cancelled());
        assert!(d.reserve_task().is_none(), "nothing new after stop");
        drop(reg);
        assert!(d.lock().tasks.is_empty() && d.lock().graceful.is_empty());
    }
}
