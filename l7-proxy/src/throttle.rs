//! Log lines that anyone on the network can cause, one per connection or
//! request (a failed TLS handshake, a TCP connection to a service without
//! endpoints), at most one a second from each place: a flood of them must
//! not become a flood of log lines. Each line says how many like it were
//! held back since the last (`held_back`); the metrics count every one.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// At most one line a second from one place.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);

/// One place's allowance.
pub(crate) struct Throttle {
    /// When the next line may go, in milliseconds of [`now_ms`].
    next_ms: AtomicU64,
    /// Lines held back since the last one went.
    held: AtomicU64,
}

impl Throttle {
    pub(crate) const fn new() -> Self {
        Self {
            next_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back before this one)` when a line may go now.
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(now_ms())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        let interval = INTERVAL.as_millis() as u64;
        if now >= next
            && self
                .next_ms
                .compare_exchange(next, now + interval, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Milliseconds since the first call (a fresh [`Throttle`] lets its first
/// line go whenever it comes).
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// `tracing::warn!` at most once a second from the place it is written,
/// with `held_back` = how many lines like it were held back since the last.
macro_rules! warn_throttled {
    ($($args:tt)+) => {{
        static LOG: $crate::throttle::Throttle = $crate::throttle::Throttle::new();
        if let Some(held) = LOG.allow() {
            tracing::warn!(held_back = held, $($args)+);
        }
    }};
}
pub(crate) use warn_throttled;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_and_the_count_of_those_held_back() {
        let t = Throttle::new();
        assert_eq!(t.allow_at(0), Some(0), "the first goes");
        assert_eq!(t.allow_at(10), None);
        assert_eq!(t.allow_at(999), None);
        assert_eq!(
            t.allow_at(1000),
            Some(2),
            "the next second's first goes, saying two were held"
        );
        assert_eq!(t.allow_at(1500), None);
        assert_eq!(t.allow_at(5000), Some(1));
        assert_eq!(t.allow_at(5001), None);
    }

    /// One line goes; every other is counted held back once: by the line
    /// that went (those held while it was going through) or by the next.
    #[test]
    fn many_threads_let_one_line_through() {
        let t = std::sync::Arc::new(Throttle::new());
        let went: Vec<u64> = (0..8)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    (0..1000).filter_map(|_| t.allow_at(42)).collect::<Vec<_>>()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(went.len(), 1, "{went:?}");
        let next = t.allow_at(1042).expect("the next second's line goes");
        assert_eq!(went[0] + next, 7999);
    }
}
