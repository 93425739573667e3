//! The node's identities: one key and certificate per local workload identity,
//! obtained from a CA (in-process or remote), renewed at half-life with
//! jitter, retried with backoff while the CA is down (the still-valid
//! certificate keeps being served), and dropped when no longer needed. It
//! hands rustls client and server configs whose resolvers and verifiers read
//! the live certificates and trust bundle on every handshake.

mod resolver;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use rustls::{ClientConfig, ServerConfig, client::Resumption, sign::CertifiedKey};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::{sync::Notify, task::JoinSet};

use self::resolver::{ClientResolver, LiveCert, LiveSet, ServerResolver, SharedLiveSet};
use crate::{
    bundle::{self, SharedTrustBundle, TrustBundle},
    ca::{self, CaError, CertificateAuthority, SignRequest},
    clock::SharedClock,
    spiffe::SpiffeId,
    status::{BundleStatus, CertState, CertificateStatus, IdentityStatus},
    verify::{self, SpiffeClientVerifier, SpiffeServerVerifier, Usage},
    x509::CertInfo,
};

/// The ALPN protocol of the tunnel between node proxies.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, Clone)]
pub struct IdentityOptions {
    /// Renew when this fraction of the lifetime has passed (0.5: half-life).
    pub renew_at: f64,
    /// Renew up to this fraction of the lifetime earlier, at random, so that
    /// certificates issued together do not all renew together.
    pub jitter: f64,
    /// A certificate counts as expiring in this last fraction of its life.
    pub expiring_fraction: f64,
    /// First retry delay after a failed request; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// How often the trust bundle is fetched from the CA.
    pub bundle_refresh: Duration,
    /// After the active root changes, reissues are spread over this window.
    pub rotation_spread: Duration,
    /// Longest sleep of [`IdentityManager::run`], so a jump of the wall clock
    /// (suspend, NTP step) is noticed.
    pub max_idle: Duration,
    /// Concurrent certificate requests to the CA, across every round at
    /// once (the background loop's and those callers run), so that a node
    /// stays under the CA's connections per address
    /// ([`crate::ca::service::MAX_CONNECTIONS_PER_PEER`]).
    pub concurrency: usize,
}

impl Default for IdentityOptions {
    fn default() -> Self {
        Self {
            renew_at: 0.5,
            jitter: 0.1,
            expiring_fraction: 0.25,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            bundle_refresh: Duration::from_secs(300),
            rotation_spread: Duration::from_secs(60),
            max_idle: Duration::from_secs(30),
            concurrency: 16,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "this node holds no certificate for {identity}; add the identity first (or wait for its issuance)"
    )]
    NotHeld { identity: SpiffeId },
    #[error("{identity} is not in this node's trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        identity: SpiffeId,
        trust_domain: String,
    },
    #[error("obtaining a certificate for {identity}: {source}")]
    Ca {
        identity: SpiffeId,
        source: Box<CaError>,
    },
    #[error("fetching the trust bundle: {0}")]
    Bundle(Box<CaError>),
    #[error("the CA returned an unusable certificate for {identity}: {reason}")]
    BadIssued { identity: SpiffeId, reason: String },
    #[error("the CA's trust bundle is for {got:?}, this node is in {expected:?}")]
    BundleTrustDomain { expected: String, got: String },
    #[error(
        "the certificate for {identity} expired at {not_after} and could not be renewed ({last_error}); \
         peers refuse it: check that the CA is reachable and serving"
    )]
    Expired {
        identity: SpiffeId,
        not_after: time::OffsetDateTime,
        last_error: String,
    },
}

/// The outcome of one renewal round.
#[derive(Debug, Default)]
pub struct RotationReport {
    /// Identities that got a new certificate (first one or renewal).
    pub issued: Vec<SpiffeId>,
    /// Identities whose request failed; each stays scheduled for a retry.
    pub failed: Vec<(SpiffeId, IdentityError)>,
}

struct Slot {
    next_attempt: SystemTime,
    failures: u32,
    last_error: Option<String>,
    in_flight: bool,
}

impl Slot {
    fn new(now: SystemTime) -> Self {
        Self {
            next_attempt: now,
            failures: 0,
            last_error: None,
            in_flight: false,
        }
    }
}

/// Identities of a rotation still in flight; dropped, it clears their flag.
struct InFlight {
    inner: Arc<Inner>,
    ids: std::collections::HashSet<SpiffeId>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let mut slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
        for id in &self.ids {
            if let Some(s) = slots.get_mut(id) {
                s.in_flight = false;
            }
        }
    }
}

struct Inner {
    ca: Arc<dyn CertificateAuthority>,
    clock: SharedClock,
    opts: IdentityOptions,
    trust_domain: String,
    bundle: SharedTrustBundle,
    live: SharedLiveSet,
    slots: Mutex<HashMap<SpiffeId, Slot>>,
    wake: Notify,
    server_config: Arc<ServerConfig>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// Tickets of requests that bring a bundle back (issuances, refreshes),
    /// in the order they were sent, and the last one whose bundle was
    /// applied: a reply to an older request never replaces the bundle a
    /// newer one brought (two issuances straddling a root rotation).
    bundle_tickets: std::sync::atomic::AtomicU64,
    bundle_applied: Mutex<u64>,
    /// `opts.concurrency` places for certificate requests in flight.
    issuing: tokio::sync::Semaphore,
}

/// The node's workload identities. Cheap to clone (shared state).
#[derive(Clone)]
pub struct IdentityManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for IdentityManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityManager")
            .field("trust_domain", &self.inner.trust_domain)
            .field("identities", &self.identities())
            .finish_non_exhaustive()
    }
}

/// The TLS server name a client sends to reach `identity` (see [`SpiffeId::sni`]).
pub fn server_name(identity: &SpiffeId) -> ServerName<'static> {
    ServerName::try_from(identity.sni()).expect("SpiffeId::sni is a valid DNS name")
}

fn random_fraction() -> f64 {
    rand::random::<f64>()
}

impl IdentityManager {
    /// Starts with `bundle` as the trusted roots (the agent fetches it from
    /// the CA, or uses [`IdentityManager::connect`]).
    pub fn new(
        ca: Arc<dyn CertificateAuthority>,
        bundle: TrustBundle,
        clock: SharedClock,
        opts: IdentityOptions,
    ) -> Self {
        let trust_domain = bundle.trust_domain().to_string();
        let bundle = bundle::shared(bundle);
        let live: SharedLiveSet = Arc::new(ArcSwap::from_pointee(LiveSet::default()));
        let provider = crate::provider();
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
                bundle.clone(),
                clock.clone(),
            )))
            .with_cert_resolver(Arc::new(ServerResolver { live: live.clone() }));
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        // No resumption: every connection is verified against the current
        // bundle (a retired root must stop working), and tunnels are long-lived.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Self {
            inner: Arc::new(Inner {
                ca,
                clock,
                issuing: tokio::sync::Semaphore::new(opts.concurrency.max(1)),
                opts,
                trust_domain,
                bundle,
                live,
                slots: Mutex::new(HashMap::new()),
                wake: Notify::new(),
                server_config: Arc::new(server),
                provider,
                bundle_tickets: std::sync::atomic::AtomicU64::new(0),
                bundle_applied: Mutex::new(0),
            }),
        }
    }

    /// Fetches the trust bundle from `ca`, then [`IdentityManager::new`].
    pub async fn connect(
        ca: Arc<dyn CertificateAuthority>,
        clock: SharedClock,
        opts: IdentityOptions,
    ) -> Result<Self, IdentityError> {
        let bundle = ca
            .trust_bundle()
            .await
            .map_err(|e| IdentityError::Bundle(Box::new(e)))?;
        Ok(Self::new(ca, bundle, clock, opts))
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<SpiffeId, Slot>> {
        self.inner.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }

    /// The bundle the verifiers use (shared; replaced on refresh).
    pub fn trust_bundle(&self) -> SharedTrustBundle {
        self.inner.bundle.clone()
    }

    /// The identities this node wants, whether or not they have a certificate yet.
    pub fn identities(&self) -> Vec<SpiffeId> {
        let mut ids: Vec<_> = self.slots().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Whether `identity` has a certificate to present.
    pub fn has_certificate(&self, identity: &SpiffeId) -> bool {
        self.inner.live.load().by_id.contains_key(identity)
    }

    /// Whether `identity` is wanted and its first certificate on its way
    /// (a new pod's, or every pod's just after the node's agent started):
    /// not held, and no attempt for it has failed (a CA down or refusing is
    /// no reason to wait).
    pub fn awaiting(&self, identity: &SpiffeId) -> bool {
        !self.has_certificate(identity)
            && self
                .slots()
                .get(identity)
                .is_some_and(|s| s.failures == 0 && s.last_error.is_none())
    }

    /// The local identity a client asked for with `sni` (on the server
    /// side: `ServerConnection::server_name()`), if this node holds it.
    pub fn identity_for_sni(&self, sni: &str) -> Option<SpiffeId> {
        self.inner.live.load().by_sni.get(sni).cloned()
    }

    fn check_domain(&self, id: &SpiffeId) -> Result<(), IdentityError> {
        if id.trust_domain() != self.inner.trust_domain {
            return Err(IdentityError::ForeignTrustDomain {
                identity: id.clone(),
                trust_domain: self.inner.trust_domain.clone(),
            });
        }
        Ok(())
    }

    /// Makes the node hold exactly `wanted`: identities no longer wanted are
    /// dropped at once, new ones are issued now. A failed issuance stays
    /// scheduled for retry and is listed in the report.
    pub async fn set_identities(
        &self,
        wanted: impl IntoIterator<Item = SpiffeId>,
    ) -> Result<RotationReport, IdentityError> {
        self.want(wanted)?;
        Ok(self.rotate_due().await)
    }

    /// [`IdentityManager::set_identities`] without the issuance: the
    /// identities no longer wanted are dropped at once, the new ones are
    /// due (for the background loop, woken, or a [`IdentityManager::rotate_due`]
    /// of the caller's). Applied in the order of the calls, whatever their
    /// rounds take.
    pub fn want(&self, wanted: impl IntoIterator<Item = SpiffeId>) -> Result<(), IdentityError> {
        let wanted: HashSet<SpiffeId> = wanted.into_iter().collect();
        for id in &wanted {
            self.check_domain(id)?;
        }
        let now = self.inner.clock.now();
        let removed: Vec<SpiffeId> = {
            let mut slots = self.slots();
            let removed: Vec<_> = slots
                .keys()
                .filter(|k| !wanted.contains(*k))
                .cloned()
                .collect();
            for id in &removed {
                slots.remove(id);
            }
            for id in wanted {
                slots.entry(id).or_insert_with(|| Slot::new(now));
            }
            removed
        };
        self.drop_live(&removed);
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Adds one identity and obtains its certificate now. On failure the
    /// identity stays, scheduled for retry.
    pub async fn add(&self, identity: SpiffeId) -> Result<(), IdentityError> {
        self.check_domain(&identity)?;
        let now = self.inner.clock.now();
        let held = self.has_certificate(&identity);
        {
            let mut slots = self.slots();
            let slot = slots
                .entry(identity.clone())
                .or_insert_with(|| Slot::new(now));
            // Asked for explicitly: try now even if a retry was scheduled.
            if !held {
                slot.next_attempt = now;
            }
        }
        self.inner.wake.notify_one();
        let report = self.rotate_due().await;
        if let Some((_, e)) = report.failed.into_iter().find(|(id, _)| id == &identity) {
            return Err(e);
        }
        if self.has_certificate(&identity) {
            Ok(())
        } else {
            Err(IdentityError::NotHeld { identity })
        }
    }

    /// Drops an identity and its key. Returns whether it was held.
    pub fn remove(&self, identity: &SpiffeId) -> bool {
        let was = self.slots().remove(identity).is_some();
        self.drop_live(std::slice::from_ref(identity));
        was
    }

    fn drop_live(&self, ids: &[SpiffeId]) {
        if ids.is_empty() {
            return;
        }
        self.inner.live.rcu(|cur| {
            let mut next = LiveSet {
                by_id: cur.by_id.clone(),
                by_sni: cur.by_sni.clone(),
            };
            for id in ids {
                next.by_id.remove(id);
                next.by_sni.remove(&id.sni());
            }
            next
        });
    }

    /// Schedules an immediate renewal of `identity` (for example after a
    /// suspected key compromise).
    pub fn renew_now(&self, identity: &SpiffeId) -> bool {
        let now = self.inner.clock.now();
        match self.slots().get_mut(identity) {
            Some(s) => {
                s.next_attempt = now;
                self.inner.wake.notify_one();
                true
            }
            None => false,
        }
    }

    /// Obtains certificates for every identity whose renewal (or retry) time
    /// has come at the clock's current time.
    pub async fn rotate_due(&self) -> RotationReport {
        let now = self.inner.clock.now();
        let due: Vec<SpiffeId> = {
            let mut slots = self.slots();
            slots
                .iter_mut()
                .filter(|(_, s)| !s.in_flight && s.next_attempt <= now)
                .map(|(id, s)| {
                    s.in_flight = true;
                    id.clone()
                })
                .collect()
        };
        // Whatever ends this rotation early (a panicking issuance task, the
        // caller dropping this future) must not leave a slot marked in
        // flight: it would never be renewed again.
        let mut pending = InFlight {
            inner: self.inner.clone(),
            ids: due.iter().cloned().collect(),
        };
        let mut report = RotationReport::default();
        let mut tasks = JoinSet::new();
        let mut queue = due.into_iter();
        loop {
            while tasks.len() < self.inner.opts.concurrency.max(1) {
                let Some(id) = queue.next() else { break };
                let inner = self.inner.clone();
                tasks.spawn(async move {
                    let r = issue(&inner, &id).await;
                    (id, r)
                });
            }
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            let (id, result) = match joined {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "certificate issuance task failed");
                    continue;
                }
            };
            let now = self.inner.clock.now();
            pending.ids.remove(&id);
            let mut slots = self.slots();
            let Some(slot) = slots.get_mut(&id) else {
                continue; // dropped while in flight
            };
            slot.in_flight = false;
            match result {
                Ok(cert) => {
                    slot.failures = 0;
                    slot.last_error = None;
                    slot.next_attempt = self.renewal_time(&cert.info, now);
                    // Issued under a root no longer active (the bundle
                    // changed while it was in flight, and passed it by):
                    // reissued soon, as the others were.
                    let active = self.inner.bundle.load().active_root();
                    if cert.root.is_some_and(|r| r != active) {
                        let at = now + self.inner.opts.rotation_spread.mul_f64(random_fraction());
                        slot.next_attempt = slot.next_attempt.min(at);
                    }
                    tracing::info!(identity = %id, serial = %cert.info.serial, not_after = %cert.info.not_after, "certificate issued");
                    report.issued.push(id.clone());
                    // In force at once: a round cut short (its caller gave
                    // up on it) keeps what it already obtained, whose slot
                    // now waits for the next renewal time.
                    let cert = Arc::new(cert);
                    self.inner.live.rcu(|cur| {
                        let mut next = LiveSet {
                            by_id: cur.by_id.clone(),
                            by_sni: cur.by_sni.clone(),
                        };
                        next.by_sni.insert(id.sni(), id.clone());
                        next.by_id.insert(id.clone(), cert.clone());
                        next
                    });
                }
                Err(e) => {
                    slot.failures += 1;
                    let shift = slot.failures.saturating_sub(1).min(16);
                    let backoff = self
                        .inner
                        .opts
                        .retry_initial
                        .saturating_mul(1 << shift)
                        .min(self.inner.opts.retry_max)
                        .mul_f64(0.9 + 0.2 * random_fraction());
                    slot.next_attempt = now + backoff;
                    let msg = e.to_string();
                    let expired = self
                        .inner
                        .live
                        .load()
                        .by_id
                        .get(&id)
                        .is_some_and(|c| time::OffsetDateTime::from(now) > c.info.not_after);
                    if expired {
                        tracing::error!(identity = %id, error = %msg, retry_in = ?backoff, "certificate request failed and the current certificate has expired: tunnels for this identity fail until the CA answers");
                    } else {
                        tracing::warn!(identity = %id, error = %msg, retry_in = ?backoff, "certificate request failed; still serving the current certificate");
                    }
                    slot.last_error = Some(msg);
                    report.failed.push((id, e));
                }
            }
        }
        // The background loop slept past slots that were in flight here (a
        // round the agent's feed ran): it must see their retry times, ~1 s
        // off, rather than sleep on to its longest wait.
        if !report.failed.is_empty() {
            self.inner.wake.notify_one();
        }
        report
    }

    fn renewal_time(&self, info: &CertInfo, now: SystemTime) -> SystemTime {
        let nb = SystemTime::from(info.not_before);
        let lifetime = (info.not_after - info.not_before)
            .try_into()
            .unwrap_or(Duration::ZERO);
        let o = &self.inner.opts;
        let early = lifetime.mul_f64(o.jitter * random_fraction());
        let at = (nb + lifetime.mul_f64(o.renew_at))
            .checked_sub(early)
            .unwrap_or(nb);
        if at > now {
            return at;
        }
        // Due as soon as issued: this node's clock runs ahead of the CA's
        // (by more than the part of the lifetime before renewal). Renewing
        // at once would get the same and spin; halfway to what is left of
        // it, at least `retry_max` on, instead.
        let left = SystemTime::from(info.not_after)
            .duration_since(now)
            .unwrap_or(Duration::ZERO);
        tracing::warn!(
            not_before = %info.not_before,
            not_after = %info.not_after,
            "a certificate the CA just issued is already due for renewal by this node's clock: \
             is the node's clock ahead of the CA's? (check NTP)"
        );
        now + (left / 2).max(o.retry_max.min(lifetime / 2).max(Duration::from_secs(1)))
    }

    /// Fetches the CA's trust bundle and applies it. Returns whether it changed.
    pub async fn refresh_trust_bundle(&self) -> Result<bool, IdentityError> {
        let ticket = bundle_ticket(&self.inner);
        let bundle = self
            .inner
            .ca
            .trust_bundle()
            .await
            .map_err(|e| IdentityError::Bundle(Box::new(e)))?;
        apply_bundle(&self.inner, bundle, ticket)
    }

    /// Renews and refreshes forever: at each certificate's renewal time, and
    /// the bundle every `bundle_refresh`. Wakes early on identity changes.
    pub async fn run(&self) {
        let mut next_bundle = self.inner.clock.now();
        // A failed refresh is tried again soon (backing off up to
        // `retry_max`), not a whole `bundle_refresh` later: a root prepared
        // for rotation must reach this node before it is activated.
        let mut bundle_retry = self.inner.opts.retry_initial;
        loop {
            let now = self.inner.clock.now();
            if now >= next_bundle {
                match self.refresh_trust_bundle().await {
                    Ok(_) => {
                        bundle_retry = self.inner.opts.retry_initial;
                        next_bundle = now + self.inner.opts.bundle_refresh;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?bundle_retry, "trust bundle refresh failed; keeping the current bundle");
                        next_bundle = now + bundle_retry.min(self.inner.opts.bundle_refresh);
                        bundle_retry = (bundle_retry * 2).min(self.inner.opts.retry_max);
                    }
                }
            }
            let report = self.rotate_due().await;
            if !report.issued.is_empty() || !report.failed.is_empty() {
                tracing::debug!(
                    issued = report.issued.len(),
                    failed = report.failed.len(),
                    "renewal round"
                );
            }
            let now = self.inner.clock.now();
            let next_slot = self
                .slots()
                .values()
                .filter(|s| !s.in_flight)
                .map(|s| s.next_attempt)
                .min();
            let until = next_slot.map_or(next_bundle, |t| t.min(next_bundle));
            let wait = until
                .duration_since(now)
                .unwrap_or(Duration::ZERO)
                .clamp(Duration::from_millis(10), self.inner.opts.max_idle);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.inner.wake.notified() => {}
            }
        }
    }

    /// Spawns [`IdentityManager::run`] on the current tokio runtime.
    pub fn spawn(&self) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move { me.run().await })
    }

    /// The inbound (port 15008) config: presents the certificate of the local
    /// identity named by the client's SNI, requires and verifies a client
    /// certificate, TLS 1.3 only, ALPN `h2`. Built once; it follows renewals
    /// and bundle changes.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.inner.server_config.clone()
    }

    /// The outbound config for a tunnel from local identity `source` to a
    /// server that must prove `expected_server`. Connect with
    /// [`server_name`]`(expected_server)` as the server name.
    pub fn client_config(
        &self,
        source: &SpiffeId,
        expected_server: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        let Some(held) = self.inner.live.load().by_id.get(source).cloned() else {
            return Err(IdentityError::NotHeld {
                identity: source.clone(),
            });
        };
        // A certificate renewal could not replace in time: every peer would
        // refuse it with a bare "certificate expired" alert; say why here.
        if time::OffsetDateTime::from(self.inner.clock.now()) > held.info.not_after {
            let last_error = self
                .slots()
                .get(source)
                .and_then(|s| s.last_error.clone())
                .unwrap_or_else(|| "no renewal attempt has finished".into());
            return Err(IdentityError::Expired {
                identity: source.clone(),
                not_after: held.info.not_after,
                last_error,
            });
        }
        self.check_domain(expected_server)?;
        let mut cfg = ClientConfig::builder_with_provider(self.inner.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                self.inner.bundle.clone(),
                self.inner.clock.clone(),
                expected_server.clone(),
            )))
            .with_client_cert_resolver(Arc::new(ClientResolver {
                live: self.inner.live.clone(),
                source: source.clone(),
            }));
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
        cfg.resumption = Resumption::disabled();
        Ok(Arc::new(cfg))
    }

    /// Per identity: the current certificate and its state, the next renewal
    /// and the last error.
    pub fn status(&self) -> Vec<IdentityStatus> {
        let now = self.inner.clock.now();
        let live = self.inner.live.load();
        let slots = self.slots();
        let mut out: Vec<IdentityStatus> = slots
            .iter()
            .map(|(id, slot)| {
                let certificate = live.by_id.get(id).map(|c| {
                    let lifetime: Duration = (c.info.not_after - c.info.not_before)
                        .try_into()
                        .unwrap_or(Duration::ZERO);
                    CertificateStatus {
                        serial: c.info.serial.clone(),
                        not_before: c.info.not_before,
                        not_after: c.info.not_after,
                        issuer: c.info.issuer.clone(),
                        root: c.root,
                        state: CertState::at(
                            now,
                            c.info.not_before,
                            c.info.not_after,
                            lifetime.mul_f64(self.inner.opts.expiring_fraction),
                        ),
                    }
                });
                IdentityStatus {
                    identity: id.clone(),
                    certificate,
                    next_renewal: Some(time::OffsetDateTime::from(slot.next_attempt)),
                    last_error: slot.last_error.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    pub fn bundle_status(&self) -> BundleStatus {
        self.inner.bundle.load().status(self.inner.clock.now())
    }
}

/// A ticket for a request about to be sent that will bring a bundle back.
fn bundle_ticket(inner: &Inner) -> u64 {
    inner
        .bundle_tickets
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        + 1
}

/// Applies the bundle a request with `ticket` brought back, unless a request
/// sent later already brought one.
fn apply_bundle(inner: &Inner, bundle: TrustBundle, ticket: u64) -> Result<bool, IdentityError> {
    if bundle.trust_domain() != inner.trust_domain {
        return Err(IdentityError::BundleTrustDomain {
            expected: inner.trust_domain.clone(),
            got: bundle.trust_domain().into(),
        });
    }
    let mut applied = inner
        .bundle_applied
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if ticket < *applied {
        // An older view of the CA's roots than the one in force.
        return Ok(false);
    }
    *applied = ticket;
    if **inner.bundle.load() == bundle {
        return Ok(false);
    }
    let active = bundle.active_root();
    tracing::info!(roots = ?bundle.fingerprints(), %active, "trust bundle changed");
    inner.bundle.store(Arc::new(bundle));
    // Leaves under a root that is no longer active are reissued soon, spread
    // out so a whole node does not hit the CA at once.
    let now = inner.clock.now();
    let live = inner.live.load();
    let mut slots = inner.slots.lock().unwrap_or_else(|e| e.into_inner());
    for (id, slot) in slots.iter_mut() {
        let stale = live.by_id.get(id).is_some_and(|c| c.root != Some(active));
        if stale && !slot.in_flight {
            let at = now + inner.opts.rotation_spread.mul_f64(random_fraction());
            slot.next_attempt = slot.next_attempt.min(at);
        }
    }
    drop(slots);
    inner.wake.notify_one();
    Ok(true)
}

/// Key generation, CSR, CA round trip and a check of what came back.
async fn issue(inner: &Inner, id: &SpiffeId) -> Result<LiveCert, IdentityError> {
    // Never closed.
    let _place = inner.issuing.acquire().await;
    let ca_err = |source| IdentityError::Ca {
        identity: id.clone(),
        source: Box::new(source),
    };
    let key = ca::generate_workload_key().map_err(ca_err)?;
    let csr_der = ca::csr_for(id, &key).map_err(ca_err)?;
    let ticket = bundle_ticket(inner);
    let issued = inner
        .ca
        .sign(SignRequest {
            identity: id.clone(),
            csr_der,
        })
        .await
        .map_err(ca_err)?;
    // A newer bundle (a root rotation) arrives with the certificate.
    apply_bundle(inner, issued.trust_bundle.clone(), ticket)?;
    let bad = |reason: String| IdentityError::BadIssued {
        identity: id.clone(),
        reason,
    };
    let Some(leaf) = issued.chain.first() else {
        return Err(bad("empty chain".into()));
    };
    let bundle = inner.bundle.load();
    let peer = verify::verify_chain(
        &bundle,
        leaf,
        &issued.chain[1..],
        inner.clock.now(),
        Usage::Server,
    )
    .map_err(|e| bad(e.to_string()))?;
    if &peer.identity != id {
        return Err(bad(format!("it is for {}", peer.identity)));
    }
    {
        use rcgen::PublicKeyData as _;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(leaf).map_err(|e| bad(e.to_string()))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(bad(
                "it certifies another key than the one in the CSR".into()
            ));
        }
    }
    let signing_key = inner
        .provider
        .key_provider
        .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
        .map_err(|e| bad(format!("loading the key into rustls: {e}")))?;
    Ok(LiveCert {
        key: Arc::new(CertifiedKey::new(issued.chain, signing_key)),
        info: peer.leaf,
        root: peer.root,
    })
}
