//! Who is asking the CA service, and what they may have. An [`Authenticator`]
//! turns a bearer credential into a [`Caller`] (a node); an [`Authoriser`]
//! decides whether that node may obtain an identity. The node rule: only
//! identities of workloads scheduled on the caller's node.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use ring::digest;

use super::authority::BoxFuture;
use crate::{
    spiffe::SpiffeId,
    storage::{self, StorageError},
};

/// An authenticated caller of the CA service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The node the caller runs on.
    pub node: String,
    /// Who the credential belongs to (a service account, or `bootstrap:<node>`).
    pub subject: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("not authenticated: {reason}")]
    Unauthenticated { reason: String },
    #[error("not allowed: {reason}")]
    Forbidden { reason: String },
    /// The authenticator's backend (the Kubernetes API) did not answer.
    #[error("cannot check the credential now: {reason}")]
    Unavailable { reason: String },
}

pub trait Authenticator: Send + Sync + fmt::Debug {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>>;
}

pub trait Authoriser: Send + Sync + fmt::Debug {
    fn authorise(&self, caller: &Caller, identity: &SpiffeId) -> Result<(), AuthError>;
}

/// Which workload identities run on which node; the agent implements it from
/// its pod model.
pub trait NodeWorkloads: Send + Sync + fmt::Debug {
    fn runs_on(&self, node: &str, identity: &SpiffeId) -> bool;
    /// Whether the answers are complete: an index still being filled (the
    /// cluster's pods not listed yet) would refuse what it has not seen.
    fn ready(&self) -> bool {
        true
    }
}

/// Allows a node exactly the identities of the workloads scheduled on it.
#[derive(Debug, Clone)]
pub struct NodeAuthoriser {
    workloads: Arc<dyn NodeWorkloads>,
}

impl NodeAuthoriser {
    pub fn new(workloads: Arc<dyn NodeWorkloads>) -> Self {
        Self { workloads }
    }
}

impl Authoriser for NodeAuthoriser {
    fn authorise(&self, caller: &Caller, identity: &SpiffeId) -> Result<(), AuthError> {
        if !self.workloads.ready() {
            // 503, which agents retry, rather than a refusal they would
            // report as one.
            return Err(AuthError::Unavailable {
                reason: "the CA's list of the cluster's pods is not current (the CA is starting, \
                         or its pods watch is failing): it cannot tell which node runs which pod"
                    .into(),
            });
        }
        if self.workloads.runs_on(&caller.node, identity) {
            Ok(())
        } else {
            Err(AuthError::Forbidden {
                reason: format!(
                    "no workload with identity {identity} is scheduled on node {:?}",
                    caller.node
                ),
            })
        }
    }
}

/// A [`NodeWorkloads`] kept in memory and updated by its owner (standalone
/// mode, tests).
#[derive(Debug, Default)]
pub struct StaticNodeWorkloads {
    nodes: RwLock<HashMap<String, HashSet<SpiffeId>>>,
}

impl StaticNodeWorkloads {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the identities of `node`.
    pub fn set(&self, node: &str, identities: impl IntoIterator<Item = SpiffeId>) {
        self.nodes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.into(), identities.into_iter().collect());
    }
}

impl NodeWorkloads for StaticNodeWorkloads {
    fn runs_on(&self, node: &str, identity: &SpiffeId) -> bool {
        self.nodes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .is_some_and(|ids| ids.contains(identity))
    }
}

/// A bearer credential a client sends. Debug output is redacted.
#[derive(Clone)]
pub enum Credential {
    Token(String),
    /// Read at each request: projected service-account tokens rotate.
    File(PathBuf),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Token(_) => f.write_str("Credential::Token([redacted])"),
            Credential::File(p) => write!(f, "Credential::File({})", p.display()),
        }
    }
}

impl Credential {
    pub fn read(&self) -> Result<String, StorageError> {
        match self {
            Credential::Token(t) => Ok(t.clone()),
            Credential::File(p) => Ok(storage::read(p)?.trim().to_string()),
        }
    }
}

/// Tokens handed to nodes out of band, for multi-node clusters without
/// Kubernetes: one secret per node. Only SHA-256 digests are kept, so the
/// lookup does not compare secrets byte by byte and Debug shows no token.
#[derive(Clone)]
pub struct BootstrapTokens {
    by_digest: HashMap<[u8; 32], String>,
}

impl fmt::Debug for BootstrapTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut nodes: Vec<_> = self.by_digest.values().collect();
        nodes.sort();
        f.debug_struct("BootstrapTokens")
            .field("nodes", &nodes)
            .finish()
    }
}

/// Shortest token accepted: 128 bits in hex.
pub const MIN_BOOTSTRAP_TOKEN_LEN: usize = 32;

fn token_digest(token: &str) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, token.as_bytes()).as_ref());
    out
}

impl BootstrapTokens {
    /// `(node, token)` pairs. Tokens must be at least
    /// [`MIN_BOOTSTRAP_TOKEN_LEN`] characters and distinct.
    pub fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, String> {
        let mut by_digest = HashMap::new();
        for (node, token) in pairs {
            if node.is_empty() {
                return Err("bootstrap token with an empty node name".into());
            }
            if token.len() < MIN_BOOTSTRAP_TOKEN_LEN {
                return Err(format!(
                    "bootstrap token of node {node:?} is {} characters; use at least {MIN_BOOTSTRAP_TOKEN_LEN} random ones",
                    token.len()
                ));
            }
            if by_digest
                .insert(token_digest(token), node.to_string())
                .is_some()
            {
                return Err(format!(
                    "bootstrap token of node {node:?} is also another node's"
                ));
            }
        }
        Ok(Self { by_digest })
    }

    /// A file of `<node> <token>` lines (`#` starts a comment).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = storage::read(path).map_err(|e| e.to_string())?;
        let mut pairs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(node), Some(token), None) => pairs.push((node, token)),
                _ => {
                    return Err(format!(
                        "{}:{}: expected `<node> <token>`",
                        path.display(),
                        i + 1
                    ));
                }
            }
        }
        Self::new(pairs).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A fresh random token (hex, 256 bits).
    pub fn generate_token() -> String {
        crate::x509::hex(&rand::random::<[u8; 32]>())
    }
}

impl Authenticator for BootstrapTokens {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async move {
            match self.by_digest.get(&token_digest(token)) {
                Some(node) => Ok(Caller {
                    node: node.clone(),
                    subject: format!("bootstrap:{node}"),
                }),
                None => Err(AuthError::Unauthenticated {
                    reason: "unknown bootstrap token".into(),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bootstrap_tokens_name_the_node_and_never_show_the_secret() {
        let t1 = BootstrapTokens::generate_token();
        let t2 = BootstrapTokens::generate_token();
        assert_ne!(t1, t2);
        let tokens =
            BootstrapTokens::new([("node-a", t1.as_str()), ("node-b", t2.as_str())]).unwrap();
        assert_eq!(tokens.authenticate(&t2).await.unwrap().node, "node-b");
        assert!(matches!(
            tokens.authenticate("nope").await,
            Err(AuthError::Unauthenticated { .. })
        ));
        let dbg = format!("{tokens:?} {:?}", Credential::Token(t1.clone()));
        assert!(!dbg.contains(&t1) && !dbg.contains(&t2), "{dbg}");
        assert!(BootstrapTokens::new([("n", "short")]).is_err());
        assert!(BootstrapTokens::new([("a", t1.as_str()), ("b", t1.as_str())]).is_err());
    }

    #[test]
    fn bootstrap_token_file() {
        let p = std::env::temp_dir().join(format!("tokens-{}", rand::random::<u64>()));
        let t = BootstrapTokens::generate_token();
        std::fs::write(&p, format!("# nodes\nnode-a {t}\n\n")).unwrap();
        let tokens = BootstrapTokens::from_file(&p).unwrap();
        assert!(format!("{tokens:?}").contains("node-a"));
        std::fs::write(&p, "node-a\n").unwrap();
        let err = BootstrapTokens::from_file(&p).unwrap_err();
        assert!(err.contains(":1: expected"), "{err}");
        std::fs::remove_file(&p).unwrap();
    }
}
