//! Per-request load balancing among a service's ready endpoints:
//! power of two choices on a latency EWMA weighted by requests in flight
//! (the "peak EWMA" idea of Finagle and Linkerd).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use rand::Rng;

use crate::{metrics::Label, state::ReadySet};

/// Latency assumed for an endpoint nothing was measured for yet: none, so
/// that every new endpoint is tried and measured.
const INITIAL_EWMA_NS: u64 = 0;
/// Time constant of the moving average. An estimate also decays towards zero
/// while nothing refreshes it, so a once-slow endpoint is tried again.
const DECAY_NS: f64 = 10e9;
/// Added to every estimate so that requests in flight still count between
/// endpoints with no measurement.
const FLOOR_NS: f64 = 1_000.0;
/// The estimate of an endpoint that could not be reached: far above any
/// answer's, so that the next picks (a retry's among them) go elsewhere while
/// it decays, and the endpoint is tried again some tens of seconds later.
const UNREACHABLE_NS: u64 = 1_000_000_000;

#[derive(Debug)]
pub struct EndpointLoad {
    ewma_ns: AtomicU64,
    last_ns: AtomicU64,
    in_flight: AtomicU32,
    /// When it last could not be reached (0: never), for session affinity.
    unreachable_ns: AtomicU64,
}

impl EndpointLoad {
    fn cost(&self, now_ns: u64) -> f64 {
        let idle = now_ns.saturating_sub(self.last_ns.load(Ordering::Relaxed)) as f64;
        let ewma = self.ewma_ns.load(Ordering::Relaxed) as f64 * (-idle / DECAY_NS).exp();
        (ewma + FLOOR_NS) * (self.in_flight.load(Ordering::Relaxed) as f64 + 1.0)
    }

    pub fn ewma(&self) -> Duration {
        Duration::from_nanos(self.ewma_ns.load(Ordering::Relaxed))
    }
}

/// Load of every endpoint seen, shared by all requests and kept across
/// snapshots (an endpoint keeps its history when routes change).
#[derive(Debug)]
pub struct Balancer {
    loads: Mutex<HashMap<SocketAddr, Arc<EndpointLoad>>>,
    /// ClientIP session affinity: the endpoint each client was given, by
    /// service port, when it last used it, and the service's timeout.
    sticky: Mutex<Sticky>,
    epoch: Instant,
}

#[derive(Debug)]
struct Sticky {
    map: HashMap<StickyKey, (SocketAddr, Instant, Duration)>,
    /// The size at which expired entries are swept next.
    sweep_at: usize,
}

impl Default for Sticky {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            sweep_at: STICKY_SWEEP_AT,
        }
    }
}

/// How long an endpoint that could not be reached loses its sticky clients.
const UNREACHABLE_HOLD_NS: u64 = 10_000_000_000;

/// Of two of `n` candidates (at least two) drawn at random, the one of
/// lower `cost`.
fn choose_of_two(n: usize, cost: impl Fn(usize) -> f64) -> usize {
    let mut rng = rand::rng();
    let a = rng.random_range(0..n);
    let mut b = rng.random_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    if cost(a) <= cost(b) { a } else { b }
}

fn recently_unreachable(load: &EndpointLoad, now_ns: u64) -> bool {
    let at = load.unreachable_ns.load(Ordering::Relaxed);
    at != 0 && now_ns.saturating_sub(at) < UNREACHABLE_HOLD_NS
}

/// A client of a service port: (service, service port, client address).
type StickyKey = (Label, u16, IpAddr);

/// Past this many remembered clients, the expired ones are swept out.
const STICKY_SWEEP_AT: usize = 16_384;

impl Default for Balancer {
    fn default() -> Self {
        Self {
            loads: Mutex::default(),
            sticky: Mutex::default(),
            epoch: Instant::now(),
        }
    }
}

/// Held while a request is in flight to an endpoint; call [`Pick::answered`]
/// when its response head arrives ([`Pick::unreachable`], or
/// [`Pick::connected`] for a TCP connection). One dropped before any of
/// them (a per-try or request timeout, its caller gone) counts its time as
/// a sample of at least that latency: an endpoint that takes requests and
/// never answers must not keep the estimate it had and draw the traffic.
#[derive(Debug)]
pub struct Pick {
    pub index: usize,
    load: Arc<EndpointLoad>,
    started: Instant,
    epoch: Instant,
    settled: std::sync::atomic::AtomicBool,
}

/// The least a server error counts for (see [`Pick::failed`]).
const FAILED_FLOOR_NS: f64 = 1_000_000.0;

impl Pick {
    pub fn observe(&self) {
        self.sample(false, |rtt, _| rtt);
    }

    /// The endpoint answered with a server error (`5xx`). Its latency is no
    /// measure of its worth: an endpoint failing fast would otherwise look
    /// the fastest and draw the traffic (a black hole). It counts as at
    /// least twice the current estimate (and a millisecond), so repeated
    /// failures push it out of the choices quickly while one stray error
    /// costs little, and it decays back like any estimate.
    pub fn failed(&self) {
        self.sample(true, |rtt, old| {
            rtt.max(2.0 * old)
                .max(FAILED_FLOOR_NS)
                .min(UNREACHABLE_NS as f64)
        });
    }

    /// Folds in an answer: a server error as [`Pick::failed`], any other
    /// as [`Pick::observe`].
    pub fn answered(&self, status: http::StatusCode) {
        if status.is_server_error() {
            self.failed();
        } else {
            self.observe();
        }
    }

    /// Nothing to measure: a TCP connection to the endpoint is open (its
    /// length is the caller's), or an attempt ended by the caller's own
    /// body failing; and nothing to count when the pick drops.
    pub fn connected(&self) {
        self.settled.store(true, Ordering::Relaxed);
    }

    /// Folds a response into the estimate: `value(rtt, old)` gives the
    /// sample. An endpoint's first response counts only if `first_counts`.
    fn sample(&self, first_counts: bool, value: impl FnOnce(f64, f64) -> f64) {
        self.settled.store(true, Ordering::Relaxed);
        let now = Instant::now();
        let now_ns = now.duration_since(self.epoch).as_nanos() as u64;
        let last = self.load.last_ns.swap(now_ns, Ordering::Relaxed);
        if last == 0 && !first_counts {
            // An endpoint's first response usually paid for setting up the
            // tunnel or the connection to the workload: counted as a peak it
            // would keep the endpoint out of rotation for tens of seconds.
            return;
        }
        let old = self.load.ewma_ns.load(Ordering::Relaxed) as f64;
        let w = (-((now_ns.saturating_sub(last)) as f64) / DECAY_NS).exp();
        // The sample may depend on the estimate as it stands now, decayed
        // since the last answer (as `cost` sees it).
        let rtt = value(now.duration_since(self.started).as_nanos() as f64, old * w);
        // Peak-sensitive: a slower sample replaces the average at once.
        let new = if rtt > old {
            rtt
        } else {
            old * w + rtt * (1.0 - w)
        };
        self.load
            .ewma_ns
            .store(new.max(1.0) as u64, Ordering::Relaxed);
    }
}

impl Pick {
    /// The endpoint could not be reached (nothing answered, refused, no
    /// tunnel): it fails fast, and without this its unmeasured, near-zero
    /// estimate would win every choice.
    pub fn unreachable(&self) {
        self.settled.store(true, Ordering::Relaxed);
        let now_ns = Instant::now().duration_since(self.epoch).as_nanos() as u64;
        self.load.last_ns.store(now_ns.max(1), Ordering::Relaxed);
        self.load.ewma_ns.store(UNREACHABLE_NS, Ordering::Relaxed);
        self.load
            .unreachable_ns
            .store(now_ns.max(1), Ordering::Relaxed);
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Relaxed) {
            // Given up on: it took at least this long (never lowering the
            // estimate, as a caller that left early says little), counted
            // no worse than an endpoint that could not be reached.
            self.sample(true, |rtt, old| rtt.max(old).min(UNREACHABLE_NS as f64));
        }
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    /// The load record of `addr`, made on first use. Snapshots take them
    /// once (`State::build_with`); requests never look them up.
    pub fn load(&self, addr: SocketAddr) -> Arc<EndpointLoad> {
        let mut loads = self.loads.lock().unwrap_or_else(|e| e.into_inner());
        loads
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(EndpointLoad {
                    ewma_ns: AtomicU64::new(INITIAL_EWMA_NS),
                    last_ns: AtomicU64::new(0),
                    in_flight: AtomicU32::new(0),
                    unreachable_ns: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// Chooses among `candidates` (the load records of the ready endpoints):
    /// two at random, the cheaper one wins. `None` when there is none. Takes
    /// no lock: requests on every core pick at once.
    pub fn pick(&self, candidates: &[Arc<EndpointLoad>]) -> Option<Pick> {
        let index = self.choose(candidates)?;
        Some(self.take(candidates, index))
    }

    /// [`Balancer::pick`] for a retry: an endpoint no earlier attempt went
    /// to (`tried`, in order); once every one was tried, any but the last
    /// tried, unless it is the only one.
    pub fn pick_except(&self, candidates: &[Arc<EndpointLoad>], tried: &[usize]) -> Option<Pick> {
        let mut others: Vec<usize> = (0..candidates.len())
            .filter(|i| !tried.contains(i))
            .collect();
        if others.is_empty() {
            let last = tried.last().copied();
            others = (0..candidates.len()).filter(|i| Some(*i) != last).collect();
        }
        if others.is_empty() {
            return self.pick(candidates);
        }
        let subset: Vec<Arc<EndpointLoad>> =
            others.iter().map(|&i| candidates[i].clone()).collect();
        let index = others[self.choose(&subset)?];
        Some(self.take(candidates, index))
    }

    /// [`Balancer::pick`] for `client` among `ready`: with ClientIP session
    /// affinity, the endpoint the client was given before, while it is
    /// ready and the client used it within the timeout; otherwise a new pick,
    /// which the client keeps.
    pub fn pick_for(&self, ready: &ReadySet, client: IpAddr) -> Option<Pick> {
        let Some(timeout) = ready.affinity else {
            return self.pick(&ready.loads);
        };
        let key = (ready.service.clone(), ready.port, client);
        let now = Instant::now();
        let mut sticky = self.sticky.lock().unwrap_or_else(|e| e.into_inner());
        let now_ns = now.duration_since(self.epoch).as_nanos() as u64;
        if let Some((addr, last, _)) = sticky.map.get_mut(&key)
            && now.duration_since(*last) < timeout
            && let Some(index) = ready.upstreams.iter().position(|u| u.addr == *addr)
            // One that could not be reached lately loses its clients (as
            // an endpoint leaving the ready set does): they move on.
            && !recently_unreachable(&ready.loads[index], now_ns)
        {
            *last = now;
            return Some(self.take(&ready.loads, index));
        }
        // Not one it just had to leave while there is another (`choose`).
        let index = self.choose(&ready.loads)?;
        // Expired clients are swept when the map has doubled since the
        // last sweep: a few sweeps, however many clients come and go.
        if sticky.map.len() >= sticky.sweep_at {
            sticky
                .map
                .retain(|_, (_, last, t)| now.duration_since(*last) < *t);
            sticky.sweep_at = (sticky.map.len() * 2).max(STICKY_SWEEP_AT);
        }
        sticky
            .map
            .insert(key, (ready.upstreams[index].addr, now, timeout));
        Some(self.take(&ready.loads, index))
    }

    fn take(&self, candidates: &[Arc<EndpointLoad>], index: usize) -> Pick {
        let load = candidates[index].clone();
        load.in_flight.fetch_add(1, Ordering::Relaxed);
        Pick {
            index,
            load,
            started: Instant::now(),
            epoch: self.epoch,
            settled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Two at random, the cheaper one; never one that could not be reached
    /// lately while another can be: its estimate decays, and may be below a
    /// slow endpoint's by now, and when both drawn are such (half of a
    /// service's endpoints behind a node that went down) one of them would
    /// be sent the request.
    fn choose(&self, candidates: &[Arc<EndpointLoad>]) -> Option<usize> {
        match candidates.len() {
            0 => return None,
            1 => return Some(0),
            _ => {}
        }
        let now_ns = self.epoch.elapsed().as_nanos() as u64;
        let index = choose_of_two(candidates.len(), |i| candidates[i].cost(now_ns));
        if !recently_unreachable(&candidates[index], now_ns) {
            return Some(index);
        }
        let others: Vec<usize> = (0..candidates.len())
            .filter(|&i| !recently_unreachable(&candidates[i], now_ns))
            .collect();
        Some(match others.len() {
            0 => index,
            1 => others[0],
            n => others[choose_of_two(n, |i| candidates[others[i]].cost(now_ns))],
        })
    }

    /// Forgets endpoints that are no longer in any service.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        let mut loads = self.loads.lock().unwrap_or_else(|e| e.into_inner());
        loads.retain(|a, l| keep(a) || l.in_flight.load(Ordering::Relaxed) > 0);
    }

    pub fn ewma(&self, addr: SocketAddr) -> Duration {
        self.load(addr).ewma()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sticky_set(b: &Balancer, addrs: &[SocketAddr]) -> ReadySet {
        let upstreams: Vec<Arc<crate::state::Upstream>> = addrs
            .iter()
            .map(|a| {
                Arc::new(crate::state::Upstream {
                    addr: *a,
                    target: http::HeaderValue::from_static("x"),
                    label: Label::default(),
                    tunnel: None,
                    workload: None,
                })
            })
            .collect();
        ReadySet {
            upstreams: upstreams.into(),
            loads: addrs.iter().map(|a| b.load(*a)).collect::<Vec<_>>().into(),
            service: Label::default(),
            port: 80,
            affinity: Some(Duration::from_secs(60)),
        }
    }

    #[test]
    fn a_sticky_client_moves_off_an_endpoint_that_could_not_be_reached() {
        let b = Balancer::default();
        let addrs: Vec<SocketAddr> = (1..=3)
            .map(|i| format!("10.0.0.{i}:80").parse().unwrap())
            .collect();
        let ready = sticky_set(&b, &addrs);
        let client: IpAddr = "10.1.0.1".parse().unwrap();
        let first = b.pick_for(&ready, client).unwrap().index;
        for _ in 0..20 {
            assert_eq!(b.pick_for(&ready, client).unwrap().index, first);
        }
        // Its node proxy is gone: the client moves on, and stays on the new one.
        b.pick_for(&ready, client).unwrap().unreachable();
        let second = b.pick_for(&ready, client).unwrap().index;
        assert_ne!(second, first);
        for _ in 0..20 {
            assert_eq!(b.pick_for(&ready, client).unwrap().index, second);
        }
    }

    /// A sticky client that leaves an unreachable endpoint is not given it
    /// back, even when its estimate is below a slow endpoint's.
    #[test]
    fn a_sticky_client_is_not_given_back_the_endpoint_it_left() {
        let b = Balancer::default();
        let addrs: Vec<SocketAddr> = (1..=2)
            .map(|i| format!("10.0.0.{i}:80").parse().unwrap())
            .collect();
        let ready = sticky_set(&b, &addrs);
        let client: IpAddr = "10.1.0.1".parse().unwrap();
        let first = b.pick_for(&ready, client).unwrap().index;
        let other = 1 - first;
        // The other one answers, slowly: 2 s, measured just now.
        let now_ns = b.epoch.elapsed().as_nanos() as u64;
        ready.loads[other]
            .ewma_ns
            .store(2_000_000_000, Ordering::Relaxed);
        ready.loads[other].last_ns.store(now_ns, Ordering::Relaxed);
        b.pick_for(&ready, client).unwrap().unreachable();
        for _ in 0..20 {
            assert_eq!(b.pick_for(&ready, client).unwrap().index, other);
        }
    }

    #[test]
    fn slow_endpoint_loses_most_picks() {
        let b = Balancer::default();
        let fast: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let slow: SocketAddr = "10.0.0.2:80".parse().unwrap();
        b.load(fast).ewma_ns.store(1_000_000, Ordering::Relaxed);
        b.load(slow).ewma_ns.store(50_000_000, Ordering::Relaxed);
        let eps = [fast, slow];
        let loads = [b.load(fast), b.load(slow)];
        let mut slow_picks = 0;
        for _ in 0..200 {
            let p = b.pick(&loads).unwrap();
            if eps[p.index] == slow {
                slow_picks += 1;
            }
        }
        // With two endpoints both are always the candidates: the fast one wins.
        assert_eq!(slow_picks, 0);
    }

    #[test]
    fn an_endpoint_failing_fast_does_not_draw_the_traffic() {
        let b = Balancer::default();
        let ok: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let bad: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let loads = [b.load(ok), b.load(bad)];
        // The healthy one answers in 2 ms; the other fails in microseconds.
        let mut bad_picks = 0;
        for _ in 0..200 {
            let mut p = b.pick(&loads).unwrap();
            if p.index == 0 {
                p.started -= Duration::from_millis(2);
                p.answered(http::StatusCode::OK);
            } else {
                bad_picks += 1;
                p.answered(http::StatusCode::SERVICE_UNAVAILABLE);
            }
        }
        // Its first failure already counts; each next one doubles its
        // estimate: it is out of the choices after a few.
        assert!(
            bad_picks <= 4,
            "{bad_picks} of 200 went to the failing endpoint"
        );
        assert!(b.ewma(bad) > b.ewma(ok));
    }

    /// An endpoint that takes requests and never answers (each attempt
    /// given up on at its timeout) is not left with its near-zero estimate
    /// of a new endpoint, drawing every request.
    #[test]
    fn an_endpoint_whose_requests_are_given_up_on_does_not_draw_the_traffic() {
        let b = Balancer::default();
        let ok: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let hangs: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let loads = [b.load(ok), b.load(hangs)];
        let mut hung = 0;
        for _ in 0..200 {
            let mut p = b.pick(&loads).unwrap();
            if p.index == 0 {
                p.started -= Duration::from_millis(2);
                p.answered(http::StatusCode::OK);
            } else {
                hung += 1;
                // Dropped at a 10-minute timeout, unanswered.
                p.started -= Duration::from_secs(600);
            }
        }
        assert!(hung <= 2, "{hung} of 200 went to the endpoint that hangs");
        // As bad as unreachable, no worse (one slow caller must not keep
        // an endpoint out for longer than an outage would).
        assert_eq!(b.ewma(hangs), Duration::from_nanos(UNREACHABLE_NS));
        // A TCP connection's length (an hour) is not a latency.
        let mut p = b.pick(&[b.load(ok)]).unwrap();
        p.started -= Duration::from_secs(3600);
        p.connected();
        drop(p);
        assert!(b.ewma(ok) < Duration::from_millis(10), "{:?}", b.ewma(ok));
    }

    /// Endpoints that could not be reached lately are not chosen while
    /// one can be, even when both drawn are such (three of four behind a
    /// node that went down).
    #[test]
    fn endpoints_just_found_unreachable_are_passed_over() {
        let b = Balancer::default();
        let loads: Vec<_> = (1..=4)
            .map(|i| b.load(format!("10.0.0.{i}:80").parse().unwrap()))
            .collect();
        for i in 1..4 {
            b.take(&loads, i).unreachable();
        }
        for _ in 0..1000 {
            let p = b.pick(&loads).unwrap();
            assert_eq!(p.index, 0);
            p.answered(http::StatusCode::OK);
        }
        // A retry's pick too.
        for _ in 0..100 {
            assert_eq!(b.pick_except(&loads, &[1]).unwrap().index, 0);
        }
    }

    #[test]
    fn a_stray_error_after_a_quiet_spell_costs_little() {
        // Unreachable (1 s) five minutes ago, nothing since: it has decayed.
        let b = Balancer {
            epoch: Instant::now() - Duration::from_secs(300),
            ..Balancer::default()
        };
        let ep: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let load = b.load(ep);
        load.ewma_ns.store(UNREACHABLE_NS, Ordering::Relaxed);
        load.last_ns.store(1, Ordering::Relaxed);
        b.pick(&[load])
            .unwrap()
            .answered(http::StatusCode::BAD_GATEWAY);
        assert!(
            b.ewma(ep) < Duration::from_millis(10),
            "one error after a quiet spell: {:?}",
            b.ewma(ep)
        );
    }

    #[test]
    fn a_retry_goes_to_another_endpoint() {
        let b = Balancer::default();
        let eps: Vec<SocketAddr> = (1..=3)
            .map(|i| format!("10.0.0.{i}:80").parse().unwrap())
            .collect();
        let loads: Vec<_> = eps.iter().map(|a| b.load(*a)).collect();
        // The tried one is the cheapest by far, and still never picked.
        for a in &eps[1..] {
            b.load(*a).ewma_ns.store(50_000_000, Ordering::Relaxed);
        }
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[b.pick_except(&loads, &[0]).unwrap().index] += 1;
        }
        assert_eq!(seen[0], 0, "{seen:?}");
        assert!(seen[1] > 50 && seen[2] > 50, "{seen:?}");
        let last = b.pick_except(&loads, &[2]).unwrap().index;
        assert_ne!(last, 2);
        // A third attempt goes to the one not tried yet, not back to the
        // first (the cheapest).
        for _ in 0..100 {
            assert_eq!(b.pick_except(&loads, &[0, 1]).unwrap().index, 2);
        }
        // Every one tried: any but the last (here the cheapest of the rest).
        for _ in 0..100 {
            assert_ne!(b.pick_except(&loads, &[1, 2, 0]).unwrap().index, 0);
            assert_eq!(b.pick_except(&loads, &[0, 2, 1]).unwrap().index, 0);
        }
        // With one endpoint, it is that one.
        assert_eq!(b.pick_except(&loads[..1], &[0]).unwrap().index, 0);
    }

    #[test]
    fn in_flight_requests_spread_load() {
        let b = Balancer::default();
        let eps: Vec<SocketAddr> = vec![
            "10.0.0.1:80".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        ];
        let loads: Vec<_> = eps.iter().map(|a| b.load(*a)).collect();
        let held: Vec<Pick> = (0..10).map(|_| b.pick(&loads).unwrap()).collect();
        let first = held.iter().filter(|p| p.index == 0).count();
        assert_eq!(
            first, 5,
            "equal latency: in-flight counts alternate the choice"
        );
        drop(held);
        assert_eq!(b.load(eps[0]).in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn observing_a_slow_response_raises_the_average() {
        let b = Balancer::default();
        let ep: SocketAddr = "10.0.0.1:80".parse().unwrap();
        b.load(ep).ewma_ns.store(1, Ordering::Relaxed);
        // The first response (connection setup) is not counted.
        let one = [b.load(ep)];
        let mut p = b.pick(&one).unwrap();
        p.started -= Duration::from_millis(50);
        p.observe();
        assert_eq!(b.ewma(ep), Duration::from_nanos(1));
        let mut p = b.pick(&one).unwrap();
        p.started -= Duration::from_millis(2);
        p.observe();
        assert!(b.ewma(ep) >= Duration::from_millis(2));
        assert!(b.pick(&[]).is_none());
    }
}

#[cfg(test)]
mod decay_tests {
    use super::*;

    #[test]
    fn unmeasured_endpoints_are_tried_and_old_estimates_fade() {
        let b = Balancer::default();
        let seen: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let new: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let now = b.epoch.elapsed().as_nanos() as u64;
        b.load(seen).ewma_ns.store(200_000, Ordering::Relaxed);
        b.load(seen).last_ns.store(now, Ordering::Relaxed);
        assert_eq!(
            [seen, new][b.pick(&[b.load(seen), b.load(new)]).unwrap().index],
            new,
            "the unmeasured endpoint goes first"
        );
        // A 50 ms estimate from a minute ago weighs less than a fresh 1 ms one.
        let old = b.load(seen);
        old.ewma_ns.store(50_000_000, Ordering::Relaxed);
        old.last_ns.store(0, Ordering::Relaxed);
        let fresh = b.load(new);
        fresh.ewma_ns.store(1_000_000, Ordering::Relaxed);
        let minute = 60_000_000_000;
        fresh.last_ns.store(minute, Ordering::Relaxed);
        assert!(old.cost(minute) < fresh.cost(minute));
    }
}
