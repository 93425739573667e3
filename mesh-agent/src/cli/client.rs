//! A small HTTP/1.1 client for the agent's admin API.

use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use serde::de::DeserializeOwned;

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--admin {0:?} is not an http://host:port URL")]
    BadUrl(String),
    #[error(
        "cannot reach the Sluice agent at {url} ({reason}).\n\
         Is mesh-agent running on this node? Start it (`mesh-agent run --help`), or point \
         --admin (or SLUICE_ADMIN) at its admin address."
    )]
    Unreachable { url: String, reason: String },
    #[error(
        "the agent at {url} is still starting: {phase}\n\
         Ask again once it is up (`curl {url}/readyz` says what it waits for; its log says more)."
    )]
    Starting { url: String, phase: String },
    #[error(
        "the agent at {url} answered {path} with {status}: {body}\n\
         Is that the Sluice agent's admin address? Check --admin (or SLUICE_ADMIN; default \
         http://127.0.0.1:15020)."
    )]
    Status {
        url: String,
        path: String,
        status: u16,
        body: String,
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
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
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

    /// GETs `path`; returns the status and body.
    pub async fn get_raw(&self, path: &str) -> Result<(u16, Bytes), Error> {
        let fut = async {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|e| self.unreachable(e))?;
            let io = hyper_util::rt::TokioIo::new(stream);
            let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
                .await
                .map_err(|e| self.unreachable(e))?;
            tokio::spawn(conn);
            let req = http::Request::get(path)
                .header(http::header::HOST, &self.authority)
                .body(Empty::new())
                .expect("a valid request");
            let resp = send
                .send_request(req)
                .await
                .map_err(|e| self.unreachable(e))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| self.unreachable(e))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| self.unreachable(format!("no answer within {:?}", self.timeout)))?
    }

    /// GETs a JSON document.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        let (status, body) = self.get_raw(path).await?;
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
}
