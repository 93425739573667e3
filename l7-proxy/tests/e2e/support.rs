//! Two proxies ("nodes") on loopback addresses, a CA from `certs`, and real
//! HTTP/1.1, HTTP/2, gRPC and TCP servers behind them.
//!
//! Addresses: every test process gets its own `127.<k>.0.0/16` (k from the
//! process id) so that tests running side by side never share an address.
//! Node A (callers) is `127.k.1.1`, its pods `127.k.1.x`; node B (servers) is
//! `127.k.2.1`, its pods `127.k.2.x`; service VIPs are `127.96.<k>.x`.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use certs::{Ca, CaOptions, IdentityManager, IdentityOptions, SpiffeId, SystemClock};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use l7_proxy::{
    MapOriginalDst, Proxy, ProxySettings, Snapshot,
    config::{Endpoint, LocalWorkload, MtlsMode, ObjectRef, Service, ServicePort},
};
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};

pub const TD: &str = "cluster.local";

pub fn id(ns: &str, sa: &str) -> SpiffeId {
    format!("spiffe://{TD}/ns/{ns}/sa/{sa}").parse().unwrap()
}

fn k() -> u8 {
    (std::process::id() % 250) as u8 + 2
}

pub fn node_a_ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, k(), 1, 1))
}
pub fn node_b_ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, k(), 2, 1))
}
/// A pod on node A.
pub fn pod_a(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, k(), 1, n))
}
/// A pod on node B.
pub fn pod_b(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, k(), 2, n))
}
pub fn vip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 96, k(), n))
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Settings with short timeouts, listening on `ip`, ephemeral ports.
pub fn settings(ip: IpAddr) -> ProxySettings {
    ProxySettings {
        outbound_addr: SocketAddr::new(ip, 0),
        inbound_addr: SocketAddr::new(ip, 0),
        sniff_timeout_ms: 200,
        header_read_timeout_ms: 1_000,
        connect_timeout_ms: 2_000,
        tls_handshake_timeout_ms: 2_000,
        drain_timeout_ms: 5_000,
        ..ProxySettings::default()
    }
}

pub struct Node {
    pub proxy: Option<Proxy>,
    pub registry: Registry,
    pub identities: IdentityManager,
    snapshots: watch::Sender<Arc<Snapshot>>,
}

impl Node {
    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().expect("proxy running")
    }

    /// Adds `w` (another address of one of this node's pods, say) to the
    /// snapshot in force here, and waits until the proxy has it.
    pub async fn add_local(&self, w: LocalWorkload) {
        let mut snap = (*self.proxy().snapshot()).clone();
        snap.local_workloads.push(w);
        let snap = Arc::new(snap);
        self.snapshots.send_replace(snap.clone());
        eventually("the proxy applied the snapshot", || {
            Arc::ptr_eq(&self.proxy().snapshot(), &snap)
        })
        .await;
    }

    /// Takes the local workload at `ip` out of the snapshot in force here
    /// (its pod left the mesh), and waits until the proxy has it so.
    pub async fn remove_local(&self, ip: IpAddr) {
        let mut snap = (*self.proxy().snapshot()).clone();
        snap.local_workloads.retain(|w| w.ip != ip);
        let snap = Arc::new(snap);
        self.snapshots.send_replace(snap.clone());
        eventually("the proxy applied the snapshot", || {
            Arc::ptr_eq(&self.proxy().snapshot(), &snap)
        })
        .await;
    }

    pub fn metrics(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).unwrap();
        s
    }

    /// The value of the metric line that contains every one of `parts`.
    pub fn metric(&self, name: &str, parts: &[&str]) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(name) && parts.iter().all(|p| l.contains(p)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// A workload the tests place on a node.
#[derive(Clone, Debug)]
pub struct Pod {
    pub ip: IpAddr,
    pub name: &'static str,
    pub namespace: &'static str,
    pub sa: &'static str,
    pub mode: MtlsMode,
}

impl Pod {
    pub fn identity(&self) -> SpiffeId {
        id(self.namespace, self.sa)
    }
    pub fn local(&self) -> LocalWorkload {
        LocalWorkload {
            ip: self.ip,
            id: ObjectRef::new(self.namespace, self.name),
            service_account: self.sa.into(),
            identity: self.identity(),
            mtls_mode: self.mode,
            selected_by: Vec::new(),
        }
    }
}

/// The standard cast: callers on node A, servers on node B.
pub fn web() -> Pod {
    Pod {
        ip: pod_a(10),
        name: "web-1",
        namespace: "shop",
        sa: "web",
        mode: MtlsMode::Strict,
    }
}
pub fn bot() -> Pod {
    Pod {
        ip: pod_a(11),
        name: "bot-1",
        namespace: "other",
        sa: "bot",
        mode: MtlsMode::Strict,
    }
}
pub fn cart(n: u8) -> Pod {
    Pod {
        ip: pod_b(20 + n),
        name: "cart",
        namespace: "shop",
        sa: "cart",
        mode: MtlsMode::Strict,
    }
}
pub fn mirror_pod() -> Pod {
    Pod {
        ip: pod_b(30),
        name: "mirror-1",
        namespace: "shop",
        sa: "mirror",
        mode: MtlsMode::Strict,
    }
}

pub struct Mesh {
    pub ca: Arc<Ca>,
    pub a: Node,
    pub b: Node,
    pub odst: Arc<MapOriginalDst>,
    pub pods_a: Vec<Pod>,
    pub pods_b: Vec<Pod>,
}

async fn start_node(
    ca: &Arc<Ca>,
    ip: IpAddr,
    pods: &[Pod],
    odst: Arc<MapOriginalDst>,
    tweak: &dyn Fn(&mut ProxySettings),
) -> Node {
    let identities = IdentityManager::new(
        ca.clone(),
        ca.bundle(),
        Arc::new(SystemClock),
        IdentityOptions::default(),
    );
    let mut ids: Vec<SpiffeId> = pods.iter().map(Pod::identity).collect();
    ids.sort();
    ids.dedup();
    let report = identities
        .set_identities(ids)
        .await
        .expect("identities issued");
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let mut registry = Registry::default();
    let mut settings = settings(ip);
    tweak(&mut settings);
    let proxy = Proxy::builder(settings, rx, Arc::new(identities.clone()), odst)
        .start(&mut registry)
        .await
        .expect("proxy starts");
    Node {
        proxy: Some(proxy),
        registry,
        identities,
        snapshots: tx,
    }
}

impl Mesh {
    pub async fn new(pods_a: Vec<Pod>, pods_b: Vec<Pod>) -> Mesh {
        Mesh::with_settings(pods_a, pods_b, &|_| {}).await
    }

    /// A mesh whose proxies' settings `tweak` adjusts.
    pub async fn with_settings(
        pods_a: Vec<Pod>,
        pods_b: Vec<Pod>,
        tweak: &dyn Fn(&mut ProxySettings),
    ) -> Mesh {
        init_tracing();
        let ca = Arc::new(Ca::generate(CaOptions::default(), Arc::new(SystemClock)).expect("CA"));
        let odst = Arc::new(MapOriginalDst::default());
        let a = start_node(&ca, node_a_ip(), &pods_a, odst.clone(), tweak).await;
        let b = start_node(&ca, node_b_ip(), &pods_b, odst.clone(), tweak).await;
        Mesh {
            ca,
            a,
            b,
            odst,
            pods_a,
            pods_b,
        }
    }

    /// Replaces node B's proxy with a new one on the same addresses, as an
    /// upgrade of the node's agent does: the old one drains (its tunnel
    /// connections get GOAWAY and keep their open streams) while the new
    /// one takes new connections. Returns the old one's drain.
    pub async fn restart_b(&mut self) -> tokio::task::JoinHandle<()> {
        let old = self.b.proxy.take().expect("proxy running");
        let mut settings = settings(node_b_ip());
        settings.inbound_addr = old.inbound_addr();
        settings.outbound_addr = old.outbound_addr();
        let draining = tokio::spawn(async move { old.shutdown().await });
        // The old listeners close at once; the new ones bind the same ports.
        let mut registry = Registry::default();
        let started = loop {
            let attempt = Proxy::builder(
                settings.clone(),
                self.b.snapshots.subscribe(),
                Arc::new(self.b.identities.clone()),
                self.odst.clone(),
            )
            .start(&mut registry)
            .await;
            match attempt {
                Ok(p) => break p,
                Err(e) if draining.is_finished() => panic!("restarting node B: {e}"),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        self.b.proxy = Some(started);
        self.b.registry = registry;
        draining
    }

    /// The standard mesh: web and bot on A, three carts and a mirror on B.
    pub async fn standard() -> Mesh {
        Mesh::new(
            vec![web(), bot()],
            vec![cart(0), cart(1), cart(2), mirror_pod()],
        )
        .await
    }

    pub fn node_b_proxy(&self) -> SocketAddr {
        self.b.proxy().inbound_addr()
    }

    /// An endpoint for a pod of node B, reached through the tunnel.
    pub fn endpoint_b(&self, pod: &Pod) -> Endpoint {
        Endpoint {
            ip: pod.ip,
            ready: true,
            workload: Some(ObjectRef::new(pod.namespace, pod.name)),
            node_proxy: Some(self.node_b_proxy()),
            identity: Some(pod.identity()),
            ports: Default::default(),
            unready_ports: Vec::new(),
        }
    }

    /// A service of node-B pods, its VIP `vip(n)` on port 80.
    pub fn service(&self, name: &str, n: u8, target_port: u16, pods: &[Pod]) -> Service {
        Service {
            id: ObjectRef::new("shop", name),
            vips: vec![vip(n)],
            ports: vec![ServicePort {
                port: 80,
                target_port,
                app_protocol: None,
            }],
            endpoints: pods.iter().map(|p| self.endpoint_b(p)).collect(),
            affinity_timeout_s: None,
        }
    }

    /// Publishes `snap` to both nodes, each with its own local workloads
    /// (as `snap.local_workloads` gives one, by address, or else as
    /// [`Pod::local`] makes it), and waits until both proxies have it in
    /// force.
    pub async fn publish(&self, snap: &Snapshot) {
        let local = |pods: &[Pod]| -> Vec<LocalWorkload> {
            pods.iter()
                .map(|p| {
                    let given = snap.local_workloads.iter().find(|w| w.ip == p.ip);
                    given.cloned().unwrap_or_else(|| p.local())
                })
                .collect()
        };
        let mut sa = snap.clone();
        sa.local_workloads = local(&self.pods_a);
        let mut sb = snap.clone();
        sb.local_workloads = local(&self.pods_b);
        let (sa, sb) = (Arc::new(sa), Arc::new(sb));
        self.a.snapshots.send_replace(sa.clone());
        self.b.snapshots.send_replace(sb.clone());
        eventually("both proxies applied the snapshot", || {
            Arc::ptr_eq(&self.a.proxy().snapshot(), &sa)
                && Arc::ptr_eq(&self.b.proxy().snapshot(), &sb)
        })
        .await;
    }

    /// Publishes a service of `pods` whose port says `appProtocol: tcp`
    /// (opaque TCP, no sniffing), as [`Mesh::service`] makes it.
    pub async fn publish_tcp_service(&self, name: &str, n: u8, target_port: u16, pods: &[Pod]) {
        let mut svc = self.service(name, n, target_port, pods);
        svc.ports[0].app_protocol = Some("tcp".into());
        self.publish(&Snapshot {
            services: vec![svc],
            ..Default::default()
        })
        .await;
    }

    /// cart-0's echo server behind service `cart` (VIP 1), published.
    pub async fn serve_cart(&self) -> Vec<EchoServer> {
        let (srv, port) = crate::traffic::servers(&[cart(0)]).await;
        self.publish(&Snapshot {
            services: vec![self.service("cart", 1, port, &[cart(0)])],
            ..Default::default()
        })
        .await;
        srv
    }

    /// A connection from pod `from` to `to`, captured by node A's proxy.
    pub async fn connect(&self, from: IpAddr, to: SocketAddr) -> TcpStream {
        self.connect_with_recv_buffer(from, to, None).await
    }

    /// As [`Mesh::connect`], with `SO_RCVBUF` set before the handshake (a
    /// caller that can take only a few KB until it reads).
    pub async fn connect_with_recv_buffer(
        &self,
        from: IpAddr,
        to: SocketAddr,
        recv_buffer: Option<u32>,
    ) -> TcpStream {
        let sock = TcpSocket::new_v4().unwrap();
        if let Some(b) = recv_buffer {
            sock.set_recv_buffer_size(b).unwrap();
        }
        sock.bind(SocketAddr::new(from, 0)).unwrap();
        let local = sock.local_addr().unwrap();
        self.odst.insert(local, to);
        sock.connect(self.a.proxy().outbound_addr())
            .await
            .expect("capture listener accepts")
    }

    /// As [`Mesh::connect`] for a connection the proxy may reset at once
    /// (opaque TCP to a Service without endpoints): the reset can come
    /// before `connect` returns.
    pub async fn try_connect(&self, from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(from, 0)).unwrap();
        self.odst.insert(sock.local_addr().unwrap(), to);
        sock.connect(self.a.proxy().outbound_addr()).await
    }

    /// Node B's pod `pod` as the configuration lists a meshed workload:
    /// reached through node B's proxy with its identity.
    pub fn tunnelled(&self, pod: &Pod) -> l7_proxy::config::Workload {
        l7_proxy::config::Workload {
            ip: pod.ip,
            id: pod.local().id,
            node_proxy: Some(self.node_b_proxy()),
            identity: Some(pod.identity()),
        }
    }

    pub async fn http1(&self, from: IpAddr, to: SocketAddr) -> Client {
        let tcp = self.connect(from, to).await;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client::H1(send)
    }

    /// A bare HTTP/2 connection through node A's capture, for request bodies
    /// of any kind (streams, trailers).
    pub async fn http2_raw<B>(
        &self,
        from: IpAddr,
        to: SocketAddr,
    ) -> hyper::client::conn::http2::SendRequest<B>
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let tcp = self.connect(from, to).await;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        send
    }

    pub async fn http2(&self, from: IpAddr, to: SocketAddr) -> Client {
        Client::H2(self.http2_raw(from, to).await)
    }

    pub async fn shutdown(mut self) {
        if let Some(p) = self.a.proxy.take() {
            p.shutdown().await;
        }
        if let Some(p) = self.b.proxy.take() {
            p.shutdown().await;
        }
    }
}

pub enum Client {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    /// The JSON echo of the test servers.
    pub fn echo(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not an echo ({e}): {self:?}"))
    }
    pub fn server(&self) -> String {
        self.echo()["server"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Client {
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Reply, hyper::Error> {
        let resp = match self {
            Client::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Client::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
            trailers,
        })
    }

    pub async fn get(&mut self, path: &str) -> Reply {
        self.send(request("GET", path, &[], ""))
            .await
            .expect("response")
    }
}

pub fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://cart.shop{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.header("host", "cart.shop")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// An HTTP/1.1 + HTTP/2 (+ gRPC) server that echoes what it received as JSON.
/// Paths: `/status/N` answers N; `/flaky/N` answers 503 to its first N
/// requests; `/early/N` answers 503 to its first N requests at once, without
/// reading their bodies (a workload shedding load); `/slow/MS` waits MS
/// before answering.
pub struct EchoServer {
    pub name: String,
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl EchoServer {
    pub async fn start(name: &str, addr: SocketAddr) -> EchoServer {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let flaky = Arc::new(AtomicUsize::new(0));
        let (n, h, s) = (name.to_string(), hits.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (n, h, s, f) = (n.clone(), h.clone(), s.clone(), flaky.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        echo(n.clone(), h.clone(), s.clone(), f.clone(), req)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        EchoServer {
            name: name.into(),
            addr,
            hits,
            seen,
        }
    }

    /// Requests whose head arrived (their bodies may still be coming).
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Requests read whole and recorded in `seen`.
    pub fn recorded(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

type EchoBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn echo(
    name: String,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<serde_json::Value>>>,
    flaky: Arc<AtomicUsize>,
    req: Request<Incoming>,
) -> Result<Response<EchoBody>, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    if let Some(n) = parts.uri.path().strip_prefix("/early/")
        && flaky.fetch_add(1, Ordering::SeqCst) < n.parse().unwrap_or(0)
    {
        drop(body);
        let resp = Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header("x-server", &name)
            .body(BodyExt::boxed(Full::new(Bytes::new())))
            .unwrap();
        return Ok(resp);
    }
    let collected = body.collect().await.ok();
    let trailers: HashMap<String, String> = collected
        .as_ref()
        .and_then(|c| c.trailers())
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = collected.map(|c| c.to_bytes()).unwrap_or_default();
    let headers: HashMap<String, String> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let record = serde_json::json!({
        "server": name,
        "version": format!("{:?}", parts.version),
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "authority": parts.uri.authority().map(|a| a.to_string()).or_else(|| headers.get("host").cloned()),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
        "trailers": trailers,
    });
    seen.lock().unwrap().push(record.clone());
    let path = parts.uri.path().to_string();
    let mut status = StatusCode::OK;
    if let Some(n) = path.strip_prefix("/status/") {
        status = n
            .parse()
            .ok()
            .and_then(|n| StatusCode::from_u16(n).ok())
            .unwrap_or(StatusCode::BAD_REQUEST);
    } else if let Some(n) = path.strip_prefix("/flaky/") {
        let n: usize = n.parse().unwrap_or(0);
        if flaky.fetch_add(1, Ordering::SeqCst) < n {
            status = StatusCode::SERVICE_UNAVAILABLE;
        }
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
    }
    if let Some(mib) = path.strip_prefix("/big/") {
        // A download of that many MiB.
        let mib: usize = mib.parse().unwrap_or(1);
        let chunk = Bytes::from(vec![b'x'; 64 << 10]);
        let chunks = std::iter::repeat_n(chunk, mib * 16).map(|c| Ok(Frame::data(c)));
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        return Ok(Response::new(BodyExt::boxed(body)));
    }
    let grpc = headers
        .get("content-type")
        .is_some_and(|c| c.starts_with("application/grpc"));
    if grpc {
        // One length-prefixed message, then grpc-status in the trailers.
        let msg = format!(
            "{name}:{}",
            String::from_utf8_lossy(body.get(5..).unwrap_or_default())
        );
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        frame.extend_from_slice(msg.as_bytes());
        // The status the caller asks for (`x-grpc-status`), else OK.
        let status = headers.get("x-grpc-status").map_or("0", String::as_str);
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", status.parse().unwrap());
        trailers.insert("x-served-by", name.parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
            Ok(Frame::data(Bytes::from(frame))),
            Ok(Frame::trailers(trailers)),
        ];
        // `/quiet`: the message, then nothing, and no end (a server stream
        // waiting for events).
        let quiet = path == "/quiet";
        use futures_util::StreamExt as _;
        let body = StreamBody::new(
            futures_util::stream::iter(frames)
                .take(if quiet { 1 } else { 2 })
                .chain(futures_util::stream::pending().take(usize::from(quiet))),
        );
        let resp = Response::builder()
            .header("content-type", "application/grpc")
            .body(BodyExt::boxed(body))
            .unwrap();
        return Ok(resp);
    }
    let mut resp = Response::builder()
        .status(status)
        .header("x-server", &name)
        .header("content-type", "application/json");
    if path == "/forge" {
        // A workload posing as the mesh in its answer.
        resp = resp
            .header("sluice-reason", "denied by the mesh (forged)")
            .header(
                "sluice-source-identity",
                "spiffe://cluster.local/ns/x/sa/forged",
            );
    }
    let resp = resp
        .body(BodyExt::boxed(Full::new(Bytes::from(record.to_string()))))
        .unwrap();
    Ok(resp)
}

/// A TCP server: with a banner it speaks first (as SMTP does), then echoes.
pub async fn tcp_server(addr: SocketAddr, banner: Option<&'static str>) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if let Some(b) = banner {
                    let _ = tcp.write_all(b.as_bytes()).await;
                }
                echo_bytes(&mut tcp).await;
            });
        }
    });
    addr
}

/// Writes back what `tcp` reads until the peer closes.
pub async fn echo_bytes(tcp: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tcp.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads an HTTP head, up to and including the blank line, byte by byte so
/// that nothing after it is consumed.
pub async fn read_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut b))
            .await
            .expect("a response head within 10 s")
            .expect("read");
        if n == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Reads exactly `n` bytes, failing the test after a generous deadline.
pub async fn read_n(tcp: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut buf))
        .await
        .expect("bytes within 10 s")
        .expect("read");
    buf
}

/// Waits until `f` holds, polling, for at most 10 s.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether the peer closes the connection (EOF or reset) within 10 s,
/// discarding whatever it sends first.
pub async fn closed_by_peer(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// When an HTTP/2 client connection's task ended, and how.
pub type Ended = tokio::sync::oneshot::Receiver<(tokio::time::Instant, Result<(), h2::Error>)>;

/// An HTTP/2 connection (`h2`'s client) from web to `to` through node A's
/// capture, and what says when its connection task ends.
pub async fn watched_h2(mesh: &Mesh, to: SocketAddr) -> (h2::client::SendRequest<Bytes>, Ended) {
    let (h2, ended) = h2_watched_over(mesh.connect(web().ip, to).await).await;
    (h2.ready().await.unwrap(), ended)
}

/// An HTTP/2 client (`h2`'s) over `io`, its connection task spawned, and
/// what says when that task ends.
pub async fn h2_watched_over<T>(io: T) -> (h2::client::SendRequest<Bytes>, Ended)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (h2, conn) = h2::client::handshake(io).await.unwrap();
    let (ended_tx, ended) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let r = conn.await;
        let _ = ended_tx.send((tokio::time::Instant::now(), r));
    });
    (h2, ended)
}

/// Waits (10 s at most) for the proxy to close `h2`'s connection, and
/// checks that it did so cleanly after a GOAWAY; returns when it ended.
pub async fn closed_with_goaway(
    h2: h2::client::SendRequest<Bytes>,
    ended: Ended,
) -> tokio::time::Instant {
    let (at, result) = tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the idle connection was not closed")
        .unwrap();
    assert!(result.is_ok(), "a clean close, not an error: {result:?}");
    let closed = h2.ready().await.expect_err("the connection is closed");
    assert!(closed.is_go_away(), "closed without a GOAWAY: {closed}");
    at
}

/// An HTTP/2 connection from web through node A's capture, once the proxy
/// has said (in its first SETTINGS) that it takes extended CONNECT.
pub async fn websocket_client(mesh: &Mesh) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = mesh.connect(web().ip, SocketAddr::new(vip(1), 80)).await;
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let h2 = h2.ready().await.unwrap();
    eventually("the proxy allows extended CONNECT", || {
        h2.is_extended_connect_protocol_enabled()
    })
    .await;
    h2
}

/// A WebSocket over HTTP/2 (RFC 8441) to `path` of cart.shop.
pub fn websocket(path: &str) -> http::Request<()> {
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://cart.shop{path}"))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(h2::ext::Protocol::from_static("websocket"));
    req
}

/// Waits until each proxy has counted one request of web's as `cancelled`
/// (node A outbound, node B inbound), with the `extra` label parts on both.
pub async fn cancelled_on_both(mesh: &Mesh, extra: &[&str]) {
    let web_id = web().identity().to_string();
    let count = |proxy: &Node, direction: &str| {
        let mut parts = vec![direction, web_id.as_str(), "status_class=\"cancelled\""];
        parts.extend_from_slice(extra);
        proxy.metric("sluice_requests_total", &parts)
    };
    eventually("both proxies counted the request as cancelled", || {
        count(&mesh.a, "direction=\"Outbound\"") == 1.0
            && count(&mesh.b, "direction=\"Inbound\"") == 1.0
    })
    .await;
}

/// A unary gRPC call of `path` (`/package.Service/Method`) with one
/// one-byte message.
pub fn grpc_call(
    path: &str,
    headers: &[(&str, &str)],
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let mut b = http::Request::post(format!("http://cart.shop{path}"))
        .header("content-type", "application/grpc");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(http_body_util::Full::new(bytes::Bytes::from_static(
        b"\0\0\0\0\x01x",
    )))
    .unwrap()
}

/// Where [`capture_access_log`] writes.
pub struct Lines(Arc<std::sync::Mutex<Vec<u8>>>);

/// Collects the access-log lines written on this thread until the guard
/// drops (with a current-thread runtime, the proxies' tasks log here too).
pub fn capture_access_log() -> (
    Arc<std::sync::Mutex<Vec<u8>>>,
    tracing::subscriber::DefaultGuard,
) {
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
            "{}=info",
            l7_proxy::accesslog::TARGET
        )))
        .with_writer(move || Lines(sink.clone()))
        .finish();
    (log, tracing::subscriber::set_default(subscriber))
}

/// The captured text and its JSON records.
pub fn access_records(log: &std::sync::Mutex<Vec<u8>>) -> (String, Vec<serde_json::Value>) {
    let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    let records = text
        .lines()
        .filter_map(|l| serde_json::from_str(&l[l.find('{')?..]).ok())
        .collect();
    (text, records)
}

/// The record of `direction` (and `path`, if given) among `records`, the
/// captured `text` in the failure message.
pub fn record<'a>(
    records: &'a [serde_json::Value],
    text: &str,
    direction: &str,
    path: Option<&str>,
) -> &'a serde_json::Value {
    records
        .iter()
        .find(|r| r["direction"] == direction && path.is_none_or(|p| r["path"] == p))
        .unwrap_or_else(|| panic!("no {direction} record of {path:?} in {text}"))
}

impl std::io::Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Streams stalled at once on one connection in the tests that stall them:
/// more than the 32 whose windows a connection's window held before it was
/// the largest HTTP/2 allows.
pub const STALLED: usize = 40;

/// Sums `figure` over node A's connections of `kind` every 200 ms until it is
/// above `floor` and has not moved for three readings in a row: every buffer
/// on the way is full.
pub async fn until_stalled(
    mesh: &Mesh,
    kind: l7_proxy::conntable::ConnKind,
    floor: u64,
    figure: fn(&l7_proxy::conntable::ConnectionInfo) -> u64,
) -> u64 {
    let sum = || -> u64 {
        mesh.a
            .proxy()
            .connections()
            .iter()
            .filter(|r| r.kind == kind)
            .map(figure)
            .sum()
    };
    let (mut last, mut same) = (0, 0);
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = sum();
        same = if now == last { same + 1 } else { 0 };
        last = now;
        if now > floor && same >= 3 {
            return now;
        }
    }
    panic!("still moving or below {floor} bytes after 30 s: {last}");
}
