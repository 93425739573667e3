//! `mesh-agent run`: the source, the reconciler thread, the admin API (and,
//! once wired, the node proxy and the identity manager), tied together.

use std::{
    sync::mpsc::{self, RecvTimeoutError},
    thread,
};

use crate::{
    config,
    reconcile::{Input, Reconciler},
};

/// Runs the reconciler on its own thread: each batch of inputs that arrived
/// together is handled in one step; a tick retries what failed when nothing
/// arrives for a while. Ends when every sender is gone.
pub fn spawn_reconciler(
    mut r: Reconciler,
    rx: mpsc::Receiver<Vec<Input>>,
) -> thread::JoinHandle<Reconciler> {
    thread::Builder::new()
        .name("reconciler".into())
        .spawn(move || {
            loop {
                match rx.recv_timeout(config::CGROUP_RETRY) {
                    Ok(mut batch) => {
                        while let Ok(more) = rx.try_recv() {
                            batch.extend(more);
                        }
                        r.step(batch);
                    }
                    Err(RecvTimeoutError::Timeout) => r.step(vec![Input::Tick]),
                    Err(RecvTimeoutError::Disconnected) => return r,
                }
            }
        })
        .expect("spawning the reconciler thread")
}
