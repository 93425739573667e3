//! Plaintext HTTP clients towards workloads: local workloads on the inbound
//! side, and non-meshed endpoints on the outbound side.

use std::net::SocketAddr;

use http::{HeaderValue, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};

use crate::{body::Body, config::ProxySettings, sniff::Protocol};

/// Pooled HTTP/1.1 and HTTP/2 (prior knowledge) clients.
#[derive(Clone)]
pub struct WorkloadClients {
    h1: Client<HttpConnector, Body>,
    h2: Client<HttpConnector, Body>,
}

impl WorkloadClients {
    pub fn new(settings: &ProxySettings) -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(settings.connect_timeout()));
        conn.enforce_http(true);
        let h1 = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http1_max_buf_size((settings.max_header_bytes as usize).max(8192))
            .build(conn.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .http2_only(true)
            .http2_max_header_list_size(settings.max_header_bytes)
            .build(conn);
        Self { h1, h2 }
    }

    /// Sends `req` to the workload at `addr`, speaking `proto`. The request's
    /// authority (or Host header) is kept as the Host the workload sees.
    pub async fn send(
        &self,
        addr: SocketAddr,
        proto: Protocol,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let authority = req.uri().authority().map(|a| a.to_string());
        if req.headers().get(http::header::HOST).is_none()
            && let Some(a) = &authority
            && let Ok(v) = HeaderValue::from_str(a)
        {
            req.headers_mut().insert(http::header::HOST, v);
        }
        *req.uri_mut() = Uri::builder()
            .scheme("http")
            .authority(addr.to_string())
            .path_and_query(pq)
            .build()
            .expect("a socket address and a path make a URI");
        match proto {
            Protocol::Http2 => {
                *req.version_mut() = Version::HTTP_2;
                req.headers_mut().remove(http::header::HOST);
                self.h2.request(req).await
            }
            _ => {
                *req.version_mut() = Version::HTTP_11;
                self.h1.request(req).await
            }
        }
    }
}
