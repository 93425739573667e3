//! The live connection table served by the agent to `sluice tls`: one entry
//! per open connection, removed when the connection closes.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::config::{ObjectRef, SpiffeId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnKind {
    /// A captured connection relayed as opaque TCP.
    OutboundTcp,
    /// A captured connection carrying HTTP; requests are routed one by one.
    OutboundHttp,
    /// A tunnel connection this proxy opened to a peer proxy.
    TunnelOut,
    /// A tunnel connection a peer proxy opened to this one.
    TunnelIn,
    /// A tunnelled TCP stream delivered to a local workload.
    InboundTcp,
}

/// TLS facts of a secured connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TlsInfo {
    pub version: String,
    pub cipher_suite: String,
    /// Expiry of the peer's certificate, Unix seconds.
    pub peer_cert_not_after: Option<u64>,
}

/// What is known about a connection when it opens.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConnMeta {
    pub source_addr: Option<SocketAddr>,
    pub source_workload: Option<ObjectRef>,
    pub source_identity: Option<SpiffeId>,
    pub destination_addr: Option<SocketAddr>,
    /// Service or workload `namespace/name`.
    pub destination: Option<ObjectRef>,
    pub destination_identity: Option<SpiffeId>,
    pub tls: Option<TlsInfo>,
}

/// One row of the table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConnectionInfo {
    pub id: u64,
    pub kind: ConnKind,
    #[serde(flatten)]
    pub meta: ConnMeta,
    pub secured: bool,
    /// Not secured yet, but on its way: the TLS handshake of a tunnel
    /// connection, or the tunnel stream of a captured TCP connection to a
    /// meshed destination, is still being set up.
    pub pending: bool,
    /// A captured HTTP connection's requests so far: sent through the
    /// tunnel, and sent in plaintext (copies mirrored in plaintext included;
    /// those mirrored through the tunnel are not the caller's).
    pub requests: Option<RequestCounts>,
    /// A captured HTTP connection whose requests reached more than one
    /// identity over mTLS (`destination_identity` is then empty).
    pub several_identities: bool,
    /// A captured HTTP connection whose requests' tunnel connections
    /// differed in TLS version or cipher suite, none in plaintext (`tls` is
    /// then empty).
    pub mixed_tls: bool,
    /// Unix seconds.
    pub opened_at: u64,
    /// Towards the destination.
    pub bytes_sent: u64,
    /// From the destination.
    pub bytes_received: u64,
}

/// A row's facts under its lock.
#[derive(Debug)]
struct RowMeta {
    meta: ConnMeta,
    /// The identity a captured HTTP connection's first request through the
    /// tunnel reached, and whether a later one reached another.
    first_reached: Option<SpiffeId>,
    several: bool,
}

/// See [`ConnectionInfo::requests`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestCounts {
    pub mtls: u64,
    pub plaintext: u64,
}

#[derive(Debug)]
struct Row {
    kind: ConnKind,
    meta: Mutex<RowMeta>,
    opened_at: u64,
    sent: AtomicU64,
    received: AtomicU64,
    /// Requests of a captured HTTP connection sent through the tunnel, and
    /// sent in plaintext (to a destination outside the mesh).
    mtls_requests: AtomicU64,
    plaintext_requests: AtomicU64,
    /// Its requests' tunnel connections differed in TLS version or cipher
    /// suite, or one went in plaintext: the row shows no TLS facts.
    tls_mixed: AtomicBool,
}

/// Shared table; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct ConnTable {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next: AtomicU64,
    rows: Mutex<BTreeMap<u64, Arc<Row>>>,
}

/// Keeps a row in the table; the row goes when this is dropped.
#[derive(Debug)]
pub struct ConnHandle {
    id: u64,
    row: Arc<Row>,
    table: Arc<Inner>,
}

impl ConnHandle {
    pub fn add_sent(&self, n: u64) {
        self.row.sent.fetch_add(n, Ordering::Relaxed);
    }
    pub fn add_received(&self, n: u64) {
        self.row.received.fetch_add(n, Ordering::Relaxed);
    }
    pub fn sent(&self) -> u64 {
        self.row.sent.load(Ordering::Relaxed)
    }
    pub fn received(&self) -> u64 {
        self.row.received.load(Ordering::Relaxed)
    }
    /// A reference to the row for what the connection's requests learn,
    /// which does not keep it in the table: the row goes when the
    /// connection ends, even while a mirrored copy is still on its way.
    pub fn reference(&self) -> RowRef {
        RowRef(self.row.clone())
    }

    /// Fills in what was learnt after opening (the TLS facts, say).
    pub fn update(&self, f: impl FnOnce(&mut ConnMeta)) {
        f(&mut self.row.meta.lock().unwrap_or_else(|e| e.into_inner()).meta);
    }
}

/// See [`ConnHandle::reference`].
#[derive(Debug)]
pub struct RowRef(Arc<Row>);

impl RowRef {
    /// One request of a captured HTTP connection went out: through the
    /// tunnel to `identity`, or in plaintext (`None`; mirrored copies sent
    /// in plaintext count too, the data went there). Routes can send a
    /// connection's requests to several backends, so the row is secured
    /// while none went in plaintext, and names the destination identity
    /// only while all reached the same one over mTLS.
    pub fn request_sent(&self, identity: Option<&SpiffeId>) {
        let row = &self.0;
        let Some(id) = identity else {
            row.plaintext_requests.fetch_add(1, Ordering::Relaxed);
            let mut m = row.meta.lock().unwrap_or_else(|e| e.into_inner());
            // Not every request reached that identity any more.
            m.meta.destination_identity = None;
            if !row.tls_mixed.swap(true, Ordering::Relaxed) {
                m.meta.tls = None;
            }
            return;
        };
        row.mtls_requests.fetch_add(1, Ordering::Relaxed);
        let mut m = row.meta.lock().unwrap_or_else(|e| e.into_inner());
        match &m.first_reached {
            None => m.first_reached = Some(id.clone()),
            Some(first) if first != id => m.several = true,
            // The same again, as usual: nothing changes.
            Some(_) if m.meta.destination_identity.as_ref() == Some(id) => return,
            Some(_) => {}
        }
        let one = !m.several && row.plaintext_requests.load(Ordering::Relaxed) == 0;
        m.meta.destination_identity = one.then(|| id.clone());
    }
}

impl RowRef {
    /// A request of a captured HTTP connection went through a tunnel
    /// connection with `tls`: the row shows the TLS facts while all its
    /// requests' were alike (and none went in plaintext), with the soonest
    /// peer certificate expiry among them.
    pub fn tunnel_tls(&self, tls: &TlsInfo) {
        let row = &self.0;
        let mut guard = row.meta.lock().unwrap_or_else(|e| e.into_inner());
        let m = &mut guard.meta;
        // Under the lock: a plaintext request sets the flag, then clears.
        if row.tls_mixed.load(Ordering::Relaxed) {
            return;
        }
        match &mut m.tls {
            None => m.tls = Some(tls.clone()),
            Some(t) if t.version == tls.version && t.cipher_suite == tls.cipher_suite => {
                t.peer_cert_not_after = match (t.peer_cert_not_after, tls.peer_cert_not_after) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            Some(_) => {
                m.tls = None;
                row.tls_mixed.store(true, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.table
            .rows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl ConnTable {
    pub fn open(&self, kind: ConnKind, meta: ConnMeta) -> ConnHandle {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed) + 1;
        let row = Arc::new(Row {
            kind,
            meta: Mutex::new(RowMeta {
                meta,
                first_reached: None,
                several: false,
            }),
            opened_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            mtls_requests: AtomicU64::new(0),
            plaintext_requests: AtomicU64::new(0),
            tls_mixed: AtomicBool::new(false),
        });
        self.inner
            .rows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, row.clone());
        ConnHandle {
            id,
            row,
            table: self.inner.clone(),
        }
    }

    /// The open connections, oldest first.
    pub fn list(&self) -> Vec<ConnectionInfo> {
        let rows = self.inner.rows.lock().unwrap_or_else(|e| e.into_inner());
        rows.iter()
            .map(|(id, r)| {
                let (meta, several) = {
                    let m = r.meta.lock().unwrap_or_else(|e| e.into_inner());
                    (m.meta.clone(), m.several)
                };
                let http = r.kind == ConnKind::OutboundHttp;
                let requests = RequestCounts {
                    mtls: r.mtls_requests.load(Ordering::Relaxed),
                    plaintext: r.plaintext_requests.load(Ordering::Relaxed),
                };
                let several_identities = http && several;
                ConnectionInfo {
                    id: *id,
                    kind: r.kind,
                    // A captured HTTP connection's requests ride tunnels of
                    // their own: it is secured while none of them went in
                    // plaintext, and before its first request when its
                    // destination (its identity set only then) is reached
                    // through the tunnel. Other rows carry the TLS facts of
                    // their own hop.
                    secured: meta.tls.is_some()
                        || (http
                            && requests.plaintext == 0
                            && (requests.mtls > 0 || meta.destination_identity.is_some())),
                    // A tunnel connection has its TLS facts once its
                    // handshake is done; a captured TCP connection to a
                    // meshed destination once its tunnel stream is open.
                    pending: meta.tls.is_none()
                        && match r.kind {
                            ConnKind::TunnelIn | ConnKind::TunnelOut => true,
                            ConnKind::OutboundTcp => meta.destination_identity.is_some(),
                            ConnKind::OutboundHttp | ConnKind::InboundTcp => false,
                        },
                    requests: http.then_some(requests),
                    several_identities,
                    mixed_tls: http
                        && requests.plaintext == 0
                        && r.tls_mixed.load(Ordering::Relaxed),
                    meta,
                    opened_at: r.opened_at,
                    bytes_sent: r.sent.load(Ordering::Relaxed),
                    bytes_received: r.received.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.inner
            .rows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_live_as_long_as_their_handle() {
        let t = ConnTable::default();
        let h = t.open(ConnKind::OutboundTcp, ConnMeta::default());
        h.add_sent(10);
        h.add_received(3);
        h.update(|m| {
            m.tls = Some(TlsInfo {
                version: "TLSv1_3".into(),
                cipher_suite: "TLS13_AES_128_GCM_SHA256".into(),
                peer_cert_not_after: Some(1),
            })
        });
        let rows = t.list();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].bytes_sent, rows[0].bytes_received, rows[0].secured),
            (10, 3, true)
        );
        let json = serde_json::to_value(&rows[0]).unwrap();
        assert_eq!(json["kind"], "outbound-tcp");
        drop(h);
        assert!(t.is_empty());
    }

    /// The row names a destination identity only while every request
    /// reached it over mTLS: a request in plaintext (a route to a Service
    /// outside the mesh) clears the one the row opened with, for good.
    #[test]
    fn an_http_row_names_an_identity_only_while_every_request_reached_it_over_mtls() {
        let t = ConnTable::default();
        let cart: SpiffeId = "spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap();
        let opened = |t: &ConnTable| {
            t.open(
                ConnKind::OutboundHttp,
                ConnMeta {
                    destination_identity: Some(cart.clone()),
                    ..Default::default()
                },
            )
        };
        let identity = |t: &ConnTable| t.list()[0].meta.destination_identity.clone();
        let h = opened(&t);
        let r = h.reference();
        r.request_sent(Some(&cart));
        assert_eq!(identity(&t), Some(cart.clone()));
        r.request_sent(None);
        assert_eq!(identity(&t), None);
        assert!(!t.list()[0].secured);
        r.request_sent(Some(&cart));
        assert_eq!(identity(&t), None, "a plaintext request went elsewhere");
        drop((r, h));
        // Plaintext first, then the tunnel: still not one identity.
        let h = opened(&t);
        let r = h.reference();
        r.request_sent(None);
        r.request_sent(Some(&cart));
        assert_eq!(identity(&t), None);
    }

    /// A row says why it has no identity or TLS facts: several reached,
    /// tunnels that differed, or a handshake still under way.
    #[test]
    fn rows_tell_several_mixed_and_pending_from_none() {
        let t = ConnTable::default();
        let id = |sa: &str| -> SpiffeId {
            format!("spiffe://cluster.local/ns/shop/sa/{sa}")
                .parse()
                .unwrap()
        };
        let h = t.open(ConnKind::OutboundHttp, ConnMeta::default());
        let r = h.reference();
        r.request_sent(Some(&id("cart")));
        r.request_sent(Some(&id("cart")));
        let row = || t.list()[0].clone();
        assert!(!row().several_identities);
        r.request_sent(Some(&id("db")));
        // Back to the first one: still several.
        r.request_sent(Some(&id("cart")));
        let x = row();
        assert_eq!(x.meta.destination_identity, None);
        assert!(x.several_identities && x.secured);
        let tls = |cipher: &str| TlsInfo {
            version: "TLSv1.3".into(),
            cipher_suite: cipher.into(),
            peer_cert_not_after: None,
        };
        r.tunnel_tls(&tls("A"));
        assert!(!row().mixed_tls);
        r.tunnel_tls(&tls("B"));
        assert!(row().mixed_tls);
        r.request_sent(None);
        let x = row();
        assert_eq!(
            x.requests,
            Some(RequestCounts {
                mtls: 4,
                plaintext: 1
            })
        );
        // Some went in plaintext: no TLS facts to mix.
        assert!(!x.secured && !x.mixed_tls && x.several_identities);
        drop((r, h));

        let pending = |kind, meta| {
            let h = t.open(kind, meta);
            let p = t.list()[0].pending;
            h.update(|m| m.tls = Some(tls("A")));
            let after = t.list()[0].clone();
            drop(h);
            (p, after.pending, after.secured)
        };
        let to_db = ConnMeta {
            destination_identity: Some(id("db")),
            ..Default::default()
        };
        assert_eq!(
            pending(ConnKind::TunnelIn, ConnMeta::default()),
            (true, false, true)
        );
        assert_eq!(
            pending(ConnKind::TunnelOut, to_db.clone()),
            (true, false, true)
        );
        assert_eq!(pending(ConnKind::OutboundTcp, to_db), (true, false, true));
        // Outside the mesh: nothing to wait for.
        let h = t.open(ConnKind::OutboundTcp, ConnMeta::default());
        assert!(!t.list()[0].pending && !t.list()[0].secured);
        assert_eq!(t.list()[0].requests, None);
        drop(h);
    }

    #[test]
    fn an_http_row_shows_tls_facts_its_requests_shared() {
        let t = ConnTable::default();
        let h = t.open(ConnKind::OutboundHttp, ConnMeta::default());
        let r = h.reference();
        let tls = |cipher: &str, expiry| TlsInfo {
            version: "TLSv1.3".into(),
            cipher_suite: cipher.into(),
            peer_cert_not_after: Some(expiry),
        };
        let facts = || t.list()[0].meta.tls.clone();
        r.tunnel_tls(&tls("A", 200));
        assert_eq!(facts(), Some(tls("A", 200)));
        // Another peer node: the soonest expiry.
        r.tunnel_tls(&tls("A", 100));
        r.tunnel_tls(&tls("A", 300));
        assert_eq!(facts(), Some(tls("A", 100)));
        // Another cipher suite: no single answer, for good.
        r.tunnel_tls(&tls("B", 100));
        assert_eq!(facts(), None);
        r.tunnel_tls(&tls("A", 100));
        assert_eq!(facts(), None);
    }
}
