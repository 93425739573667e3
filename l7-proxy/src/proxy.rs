//! The handle the agent embeds: start the listeners, follow snapshots, expose
//! metrics and the connection table, drain on shutdown.

use std::{future::Future, net::SocketAddr, sync::Arc};

use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    balance::Balancer,
    config::{ProxySettings, Snapshot},
    conntable::{ConnTable, ConnectionInfo},
    identity::IdentityProvider,
    metrics::Metrics,
    outbound::OriginalDst,
    state::State,
    tunnel::TunnelPool,
    upstream::WorkloadClients,
};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "binding the {which} listener on {addr}: {source}; is another proxy running, or is the address not local?"
    )]
    Bind {
        which: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What every connection task shares.
pub(crate) struct Shared {
    pub settings: ProxySettings,
    state: watch::Receiver<Arc<State>>,
    pub metrics: Metrics,
    pub table: ConnTable,
    pub pool: TunnelPool,
    pub clients: WorkloadClients,
    pub balancer: Balancer,
    pub identity: Arc<dyn IdentityProvider>,
    pub original_dst: Arc<dyn OriginalDst>,
    /// Stop accepting, finish what is in flight.
    pub shutdown: CancellationToken,
    /// Per-connection shutdown signals.
    pub drain: Arc<crate::drain::Drain>,
    /// The budget of request bodies buffered for retries and mirrors, in
    /// [`crate::replay::BUDGET_UNIT`]s.
    pub buffer_budget: Arc<tokio::sync::Semaphore>,
    /// A slot per mirrored request in flight (`max_mirrors_in_flight`).
    pub mirror_slots: Arc<tokio::sync::Semaphore>,
    /// TLS handshakes in progress on the tunnel port, by peer address.
    pub handshakes: crate::inbound::Handshakes,
    /// Tunnel connections open, by peer identity and address.
    pub peer_connections: crate::inbound::PeerConnections,
    tracker: TaskTracker,
    /// Captured connections waiting for a configuration that knows their
    /// source ([`Shared::state_knowing`]).
    waiting_for_source: std::sync::atomic::AtomicUsize,
}

/// Connections that may wait for their source at once.
const MAX_WAITING_FOR_SOURCE: usize = 1024;

/// One of at most a number of places, given back when dropped.
struct Place<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Place<'a> {
    fn take(taken: &'a std::sync::atomic::AtomicUsize, max: usize) -> Option<Self> {
        use std::sync::atomic::Ordering::AcqRel;
        if taken.fetch_add(1, AcqRel) >= max {
            taken.fetch_sub(1, AcqRel);
            return None;
        }
        Some(Place(taken))
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Shared {
    /// The configuration in force now.
    pub fn state(&self) -> Arc<State> {
        self.state.borrow().clone()
    }

    /// The configuration that knows the local workload at `ip`, and the
    /// workload: the one in force now, else the first within `wait` that
    /// does (`None` past it, or at shutdown). A pod's first connections can
    /// come before the proxy has the configuration that enrols it (the
    /// kernel enrols its cgroup in the same pass that publishes it, and at
    /// an agent's restart the proxy starts before the first sync): they
    /// wait for it rather than being reset.
    pub async fn state_knowing(
        &self,
        ip: std::net::IpAddr,
        wait: std::time::Duration,
    ) -> Option<(Arc<State>, Arc<crate::config::LocalWorkload>)> {
        let state = self.state();
        if let Some(w) = state.local_workload(ip) {
            return Some((state.clone(), w.clone()));
        }
        // Bounded: connections the kernel keeps sending from an address no
        // configuration will list (a pod's cgroup left enrolled) are reset
        // at once beyond these.
        let _waiting = Place::take(&self.waiting_for_source, MAX_WAITING_FOR_SOURCE)?;
        let mut rx = self.state.clone();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let state = rx.borrow_and_update().clone();
            if let Some(w) = state.local_workload(ip) {
                return Some((state.clone(), w.clone()));
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                r = tokio::time::timeout_at(deadline, rx.changed()) => {
                    if !matches!(r, Ok(Ok(()))) {
                        return None;
                    }
                }
            }
        }
    }

    /// Spawns a connection task that ends at the latest at the hard stop.
    pub fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        let Some(reg) = self.drain.reserve_task() else {
            return;
        };
        let id = reg.id();
        let handle = self.tracker.spawn(async move {
            let _reg = reg;
            f.await
        });
        self.drain.set_abort(id, handle.abort_handle());
    }
}

/// Everything the proxy needs from the agent.
pub struct ProxyBuilder {
    settings: ProxySettings,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    identity: Arc<dyn IdentityProvider>,
    original_dst: Arc<dyn OriginalDst>,
}

/// A running proxy.
pub struct Proxy {
    shared: Arc<Shared>,
    outbound_addr: SocketAddr,
    second_outbound_addr: Option<SocketAddr>,
    inbound_addr: SocketAddr,
    watcher: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// `snapshots` carries the configuration; `identity` is the certs identity
    /// manager; `original_dst` finds where a captured connection was going.
    pub fn builder(
        settings: ProxySettings,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        identity: Arc<dyn IdentityProvider>,
        original_dst: Arc<dyn OriginalDst>,
    ) -> ProxyBuilder {
        ProxyBuilder {
            settings,
            snapshots,
            identity,
            original_dst,
        }
    }

    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound_addr
    }

    /// The second capture listener's address (the other address family),
    /// when the settings asked for one.
    pub fn second_outbound_addr(&self) -> Option<SocketAddr> {
        self.second_outbound_addr
    }

    pub fn inbound_addr(&self) -> SocketAddr {
        self.inbound_addr
    }

    /// The snapshot in force: the one new connections and requests use. It
    /// follows the agent's channel within one compile step.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.state().snapshot.clone()
    }

    /// The live connection table, for `sluice tls`.
    pub fn connections(&self) -> Vec<ConnectionInfo> {
        self.shared.table.list()
    }

    /// The table itself (cheap to clone), for an admin server.
    pub fn connection_table(&self) -> ConnTable {
        self.shared.table.clone()
    }

    /// Tunnel connections currently open to peer proxies.
    pub fn tunnel_connections(&self) -> usize {
        self.shared.pool.connections()
    }

    /// Stops accepting, lets requests and connections in flight finish for
    /// the drain timeout, then cuts what is left.
    pub async fn shutdown(&self) {
        let s = &self.shared.clone();
        s.shutdown.cancel();
        s.drain.begin();
        s.tracker.close();
        if tokio::time::timeout(s.settings.drain_timeout(), s.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = s.tracker.len(),
                "drain timeout over; closing the remaining connections"
            );
            s.drain.stop();
            s.tracker.wait().await;
        }
        self.watcher.abort();
    }
}

impl Drop for Proxy {
    /// A proxy dropped without [`Proxy::shutdown`] stops at once.
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.shared.drain.begin();
        self.shared.drain.stop();
        self.watcher.abort();
    }
}

impl ProxyBuilder {
    /// Binds both listeners and starts serving. Metrics are registered into
    /// `registry` (the agent serves it on its admin port).
    pub async fn start(self, registry: &mut Registry) -> Result<Proxy, ProxyError> {
        let outbound = TcpListener::bind(self.settings.outbound_addr)
            .await
            .map_err(|source| ProxyError::Bind {
                which: "outbound",
                addr: self.settings.outbound_addr,
                source,
            })?;
        // Port 0 for the second: the first's (the kernel redirects both
        // families to one port).
        let first_port = outbound.local_addr().map_or(0, |a| a.port());
        let second = match self.settings.second_outbound_addr {
            Some(mut addr) => {
                if addr.port() == 0 {
                    addr.set_port(first_port);
                }
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ProxyError::Bind {
                            which: "second outbound",
                            addr,
                            source,
                        })?,
                )
            }
            None => None,
        };
        let inbound = TcpListener::bind(self.settings.inbound_addr)
            .await
            .map_err(|source| ProxyError::Bind {
                which: "inbound",
                addr: self.settings.inbound_addr,
                source,
            })?;
        let outbound_addr = outbound
            .local_addr()
            .expect("bound listener has an address");
        let second_outbound_addr = second
            .as_ref()
            .map(|l| l.local_addr().expect("bound listener has an address"));
        let inbound_addr = inbound.local_addr().expect("bound listener has an address");
        tracing::info!(settings = %serde_json::to_string(&self.settings).unwrap_or_default(), %outbound_addr, ?second_outbound_addr, %inbound_addr, "proxy starting");

        let metrics = Metrics::new(registry);
        let table = ConnTable::default();
        let mut snapshots = self.snapshots;
        let balancer = Balancer::default();
        let first = compile(snapshots.borrow_and_update().clone(), &balancer);
        let (state_tx, state_rx) = watch::channel(Arc::new(first));
        let shared = Arc::new(Shared {
            pool: TunnelPool::new(
                self.settings.clone(),
                self.identity.clone(),
                metrics.clone(),
                table.clone(),
            ),
            clients: WorkloadClients::new(&self.settings),
            buffer_budget: Arc::new(tokio::sync::Semaphore::new(
                (self.settings.max_buffered_total_bytes / crate::replay::BUDGET_UNIT)
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            mirror_slots: Arc::new(tokio::sync::Semaphore::new(
                self.settings
                    .max_mirrors_in_flight
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            handshakes: Default::default(),
            peer_connections: Default::default(),
            settings: self.settings,
            state: state_rx,
            metrics,
            table,
            balancer,
            identity: self.identity,
            original_dst: self.original_dst,
            shutdown: CancellationToken::new(),
            drain: Arc::default(),
            tracker: TaskTracker::new(),
            waiting_for_source: Default::default(),
        });
        // New snapshots apply to new connections and requests at once; what
        // is in flight keeps the state it started with.
        let weak = Arc::downgrade(&shared);
        let watcher = tokio::spawn(async move {
            while snapshots.changed().await.is_ok() {
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                let state = compile(snapshots.borrow_and_update().clone(), &shared.balancer);
                let keep: std::collections::HashSet<SocketAddr> = state.endpoint_addrs().collect();
                shared.balancer.retain(|a| keep.contains(a));
                let _ = state_tx.send(Arc::new(state));
            }
        });
        let (s1, s2) = (shared.clone(), shared.clone());
        shared.tracker.spawn(crate::outbound::run(s1, outbound));
        if let Some(l) = second {
            shared
                .tracker
                .spawn(crate::outbound::run(shared.clone(), l));
        }
        shared.tracker.spawn(crate::inbound::run(s2, inbound));
        Ok(Proxy {
            shared,
            outbound_addr,
            second_outbound_addr,
            inbound_addr,
            watcher,
        })
    }
}

fn compile(snapshot: Arc<Snapshot>, balancer: &Balancer) -> State {
    let (state, errors) = State::build_with(snapshot, balancer);
    for e in errors {
        tracing::error!("route left out of the configuration: {e}");
    }
    state
}
