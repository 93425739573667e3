//! PEM encoding and the files Sluice keeps: private keys are written
//! atomically (temporary file, fsync, rename) with mode 0600, and their
//! contents never reach a log.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use rustls_pki_types::CertificateDer;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error("{what}: not valid PEM: {reason}")]
    Pem { what: String, reason: String },
    #[error("{what}: expected a PEM block {expected}, found {found:?}")]
    PemTag {
        what: String,
        expected: &'static str,
        found: Vec<String>,
    },
}

/// A PKCS#8 private key in PEM form. Its Debug output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyPem(String);

impl PrivateKeyPem {
    pub fn new(pem: String) -> Self {
        Self(pem)
    }

    /// The PEM text; handle with care (never log it).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyPem([redacted])")
    }
}

/// Concatenated `CERTIFICATE` blocks.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    let blocks: Vec<pem::Pem> = certs
        .iter()
        .map(|c| pem::Pem::new("CERTIFICATE", c.as_ref()))
        .collect();
    pem::encode_many(&blocks)
}

/// All `CERTIFICATE` blocks of a PEM text (at least one). `what` names the
/// source in errors.
pub fn certs_from_pem(
    what: &str,
    text: &str,
) -> Result<Vec<CertificateDer<'static>>, StorageError> {
    let blocks = pem::parse_many(text).map_err(|e| StorageError::Pem {
        what: what.into(),
        reason: e.to_string(),
    })?;
    let certs: Vec<_> = blocks
        .iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.contents().to_vec()))
        .collect();
    if certs.is_empty() {
        return Err(StorageError::PemTag {
            what: what.into(),
            expected: "CERTIFICATE",
            found: blocks.iter().map(|b| b.tag().to_string()).collect(),
        });
    }
    Ok(certs)
}

/// Reads a file, naming it in the error.
pub fn read(path: &Path) -> Result<String, StorageError> {
    fs::read_to_string(path).map_err(|source| StorageError::Io {
        path: path.into(),
        action: "reading",
        source,
    })
}

/// Takes the exclusive lock (flock) of the lock file `path`, created with
/// mode 0600 and never followed through a link someone planted there (the
/// CA may run as root); held until the file is dropped.
pub fn lock_exclusive(path: &Path) -> Result<fs::File, StorageError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(path)
        .and_then(|f| f.lock().map(|()| f))
        .map_err(|source| StorageError::Io {
            path: path.into(),
            action: "locking",
            source,
        })
}

/// Writes `contents` to `path` atomically with mode 0600: readers see the old
/// file or the new one, never a partial or world-readable key.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), StorageError> {
    write_atomic(path, contents, 0o600)
}

/// Like [`write_private`], mode 0644 (certificates).
pub fn write_public(path: &Path, contents: &[u8]) -> Result<(), StorageError> {
    write_atomic(path, contents, 0o644)
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), StorageError> {
    let io_err = |action: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| StorageError::Io {
            path: p,
            action,
            source,
        }
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| StorageError::Io {
        path: path.into(),
        action: "writing",
        source: io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:08x}",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        // create_new + mode: the file never exists with wider permissions.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        f.write_all(contents).map_err(io_err("writing", &tmp))?;
        f.sync_all().map_err(io_err("syncing", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
        // Make the rename itself durable.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn private_files_are_0600_and_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("certs-storage-{}", rand::random::<u64>()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("key.pem");
        write_private(&p, b"first").unwrap();
        write_private(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("key.pem")]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_debug_is_redacted() {
        let k = PrivateKeyPem::new("-----BEGIN PRIVATE KEY-----\nSECRET\n".into());
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("SECRET"), "{dbg}");
    }

    #[test]
    fn pem_errors_name_the_source() {
        let e = certs_from_pem(
            "bundle.pem",
            "-----BEGIN FOO-----\nAAAA\n-----END FOO-----\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("bundle.pem") && e.contains("FOO"), "{e}");
    }
}
