//! A small HTTP/1.1 client for the agent's admin API.

use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use serde::de::DeserializeOwned;

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--admin (or SLUICE_ADMIN) {0:?} is not an http://host:port URL (such as http://127.0.0.1:15020)"
    )]
    BadUrl(String),
    #[error(
        "cannot reach the Sluice agent at {url} ({reason}).\n\
         Is mesh-agent running on this node? Start it (`mesh-agent run --help`), or point \
         --admin (or SLUICE_ADMIN) at its admin address."
    )]
    Unreachable { url: String, reason: String },
    #[error(
        "the agent at {url} took the connection but {reason}.\n\
         It is running; it may be busy (it serves a limited number of admin connections at \
         once) or stopping: ask again, and see its log if this goes on."
    )]
    Broken { url: String, reason: String },
    #[error(
        "the agent at {url} is still starting: {phase}\n\
         Ask again once it is up (`curl {url}/readyz` says what it waits for; its log says more)."
    )]
    Starting { url: String, phase: String },
    #[error("the agent at {url} answered {path} with {status}: {body}\n{hint}")]
    Status {
        url: String,
        path: String,
        status: u16,
        body: String,
        hint: &'static str,
    },
    #[error(
        "the agent at {url} sent an unexpected {path} document ({source}): either --admin (or \
         SLUICE_ADMIN) points at something other than the Sluice agent's admin address, or the \
         CLI and agent are different versions"
    )]
    Decode {
        url: String,
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The agent's admin API at one URL.
#[derive(Clone, Debug)]
pub struct Client {
    url: String,
    authority: String,
    timeout: Duration,
}

impl Client {
    pub fn new(url: &str) -> Result<Self, Error> {
        let authority = url
            .strip_prefix("http://")
            .map(|r| r.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| Error::BadUrl(url.into()))?;
        // A port, when there is one, must be one (`:99999` is a typo, not a
        // host name to append `:80` to); an IPv6 literal's colons are in
        // its brackets.
        let port = match authority.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((_, "")) => None,
                Some((_, rest)) => Some(rest.strip_prefix(':').unwrap_or(rest)),
                None => return Err(Error::BadUrl(url.into())),
            },
            None => authority.rsplit_once(':').map(|(_, p)| p),
        };
        let authority = match port {
            Some(p) if p.parse::<u16>().is_ok() => authority.to_string(),
            Some(_) => return Err(Error::BadUrl(url.into())),
            None => format!("{authority}:80"),
        };
        Ok(Self {
            url: url.trim_end_matches('/').into(),
            authority,
            timeout: Duration::from_secs(5),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn unreachable(&self, reason: impl ToString) -> Error {
        Error::Unreachable {
            url: self.url.clone(),
            reason: reason.to_string(),
        }
    }

    /// A failure after the connection was made: something listens there.
    fn broken(&self, reason: impl std::fmt::Display) -> Error {
        Error::Broken {
            url: self.url.clone(),
            reason: reason.to_string(),
        }
    }

    /// GETs `path`; returns the status and body.
    pub async fn get_raw(&self, path: &str) -> Result<(u16, Bytes), Error> {
        self.get_with_stale(path).await.map(|(s, b, _)| (s, b))
    }

    /// As [`Client::get_raw`], with the agent's [`crate::admin::STALE`]
    /// header: the parts of it that have stopped.
    async fn get_with_stale(&self, path: &str) -> Result<(u16, Bytes, Option<String>), Error> {
        // Whether the connection was made: a timeout after it is the
        // agent's silence, not an absent agent.
        let connected = std::sync::atomic::AtomicBool::new(false);
        let fut = async {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|e| self.unreachable(e))?;
            connected.store(true, std::sync::atomic::Ordering::Relaxed);
            let io = hyper_util::rt::TokioIo::new(stream);
            let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
                .await
                .map_err(|e| self.broken(format_args!("the exchange failed: {e}")))?;
            tokio::spawn(conn);
            let req = http::Request::get(path)
                .header(http::header::HOST, &self.authority)
                .body(Empty::new())
                .expect("a valid request");
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| self.broken(format_args!("gave no answer: {e}")))?;
            let status = resp.status().as_u16();
            let stale = resp
                .headers()
                .get(crate::admin::STALE)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| self.broken(format_args!("its answer was cut: {e}")))?
                .to_bytes();
            Ok((status, body, stale))
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) if connected.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(self.broken(format_args!("sent no answer within {:?}", self.timeout)))
            }
            Err(_) => Err(self.unreachable(format!("no connection within {:?}", self.timeout))),
        }
    }

    /// GETs a JSON document. One the agent says may be out of date (a part
    /// of it has stopped) is still shown, under a warning on stderr.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let (status, body, stale) = self.get_with_stale(path).await?;
        if let Some(parts) = stale {
            eprintln!(
                "sluice: warning: {} of the agent at {} stopped: what follows is its last view \
                 and may be out of date (`sluice check` fails; the agent's log says why, and \
                 its liveness probe restarts it)",
                crate::cli::table::one_line(&parts),
                self.url
            );
        }
        let text = String::from_utf8_lossy(&body);
        if status == 503
            && let Some(phase) = text.trim().strip_prefix(crate::admin::STARTING)
        {
            return Err(Error::Starting {
                url: self.url.clone(),
                phase: phase.trim().chars().take(300).collect(),
            });
        }
        if status != 200 {
            return Err(Error::Status {
                url: self.url.clone(),
                path: path.into(),
                status,
                hint: status_hint(status),
                // A whole HTML page would bury the hint.
                body: String::from_utf8_lossy(&body)
                    .trim()
                    .chars()
                    .take(200)
                    .collect(),
            });
        }
        serde_json::from_slice(&body).map_err(|source| Error::Decode {
            url: self.url.clone(),
            path: path.into(),
            source,
        })
    }
}

/// What to do about an answer other than 200: the agent's own refusals
/// say why in their body; anything else suggests another server.
fn status_hint(status: u16) -> &'static str {
    match status {
        403 => "(The agent's answer says what to do.)",
        500..=599 => "The agent failed to answer; its log says why.",
        _ => {
            "Is that the Sluice agent's admin address? Check --admin (or SLUICE_ADMIN; default \
             http://127.0.0.1:15020)."
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            Client::new("http://127.0.0.1:15020").unwrap().authority,
            "127.0.0.1:15020"
        );
        assert_eq!(Client::new("http://agent/").unwrap().authority, "agent:80");
        assert!(Client::new("https://x:1").is_err());
        assert!(Client::new("http://x:1/v1").is_err());
        // A port that is none is a typo to name, not a host to add `:80` to.
        assert!(matches!(
            Client::new("http://127.0.0.1:99999"),
            Err(Error::BadUrl(_))
        ));
        assert_eq!(
            Client::new("http://[::1]:15020").unwrap().authority,
            "[::1]:15020"
        );
        assert_eq!(Client::new("http://[::1]").unwrap().authority, "[::1]:80");
    }

    #[tokio::test]
    async fn an_absent_agent_is_reported_with_its_address_and_what_to_do() {
        // A port nobody listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let e = c
            .get::<serde_json::Value>("/v1/status")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("http://127.0.0.1:{port}")), "{e}");
        assert!(e.contains("Is mesh-agent running"), "{e}");
        assert!(e.contains("SLUICE_ADMIN"), "{e}");
    }

    /// Something listens but the exchange fails (the agent closed at its
    /// connection limit, or went silent): not "start the agent".
    #[tokio::test]
    async fn an_agent_that_closes_or_goes_silent_is_not_called_absent() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            // The first connection closed at once, the second held silent.
            let (first, _) = listener.accept().await.unwrap();
            drop(first);
            let (second, _) = listener.accept().await.unwrap();
            held.push(second);
            std::future::pending::<()>().await
        });
        let mut c = Client::new(&format!("http://{addr}")).unwrap();
        c.timeout = Duration::from_millis(300);
        for want in ["gave no answer", "sent no answer within"] {
            let e = c
                .get::<serde_json::Value>("/v1/status")
                .await
                .unwrap_err()
                .to_string();
            assert!(!e.contains("Is mesh-agent running"), "{e}");
            assert!(e.contains("took the connection") && e.contains(want), "{e}");
        }
        silent.abort();
    }

    #[test]
    fn a_refusal_is_not_taken_for_another_server() {
        let e = Error::Status {
            url: "http://10.0.0.1:15020".into(),
            path: "/v1/status".into(),
            status: 403,
            body: "the admin API's /v1/ documents answer on the node's loopback only".into(),
            hint: status_hint(403),
        }
        .to_string();
        assert!(!e.contains("Is that the Sluice agent"), "{e}");
        assert!(status_hint(404).contains("Is that the Sluice agent"));
        assert!(status_hint(500).contains("its log"));
    }
}
