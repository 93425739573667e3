//! Where the configuration comes from: a Kubernetes API server ([`kube`]) or
//! a directory of manifests ([`files`]). Both send [`crate::reconcile::Input`]s.

pub mod files;
pub mod kube;

/// A source given on the command line: `kube` or `files:<dir>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    Kube,
    Files(std::path::PathBuf),
}

impl std::str::FromStr for SourceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "kube" {
            return Ok(Self::Kube);
        }
        match s.strip_prefix("files:") {
            Some(dir) if !dir.is_empty() => Ok(Self::Files(dir.into())),
            _ => Err(format!(
                "unknown source {s:?}: use `kube` (in a cluster) or `files:<dir>` (standalone)"
            )),
        }
    }
}

impl std::fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceSpec::Kube => f.write_str("kube"),
            SourceSpec::Files(d) => write!(f, "files:{}", d.display()),
        }
    }
}
