//! The certificate authority: a root (ECDSA P-256, generated or loaded from
//! PEM), an optional intermediate, and the signing of workload CSRs.
//!
//! - `authority`: the [`CertificateAuthority`] trait the node side uses.
//! - `service` / `client`: the CA over HTTPS for clusters.
//! - `auth`, `tokenreview`: who may ask for which identity.

pub mod auth;
pub mod authority;
pub mod client;
pub mod jwks;
pub mod service;
pub mod tokenreview;

use std::{
    fs,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

pub use authority::{BoxFuture, CaError, CertificateAuthority, Issued, SignRequest};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{
    bundle::TrustBundle,
    clock::{SharedClock, to_offset},
    spiffe::{self, SpiffeId},
    status::BundleStatus,
    storage::{self, PrivateKeyPem},
    x509::{CertInfo, Fingerprint},
};

/// How the CA issues.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CaOptions {
    pub trust_domain: String,
    /// Lifetime of workload certificates.
    #[serde(with = "humantime_secs")]
    pub leaf_lifetime: Duration,
    /// How far `not_before` is set in the past, for nodes whose clocks lag.
    #[serde(with = "humantime_secs")]
    pub backdate: Duration,
    /// Lifetime of a generated root.
    #[serde(with = "humantime_secs")]
    pub root_lifetime: Duration,
    /// Sign workloads with a generated intermediate instead of the root.
    pub intermediate: bool,
    #[serde(with = "humantime_secs")]
    pub intermediate_lifetime: Duration,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            trust_domain: spiffe::DEFAULT_TRUST_DOMAIN.into(),
            leaf_lifetime: Duration::from_secs(24 * 3600),
            backdate: Duration::from_secs(5 * 60),
            root_lifetime: Duration::from_secs(10 * 365 * 24 * 3600),
            intermediate: false,
            intermediate_lifetime: Duration::from_secs(365 * 24 * 3600),
        }
    }
}

/// Durations as whole seconds in config files.
mod humantime_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

/// PEM material to load a CA from (for example a Kubernetes Secret).
#[derive(Debug, Clone, Default)]
pub struct CaPem {
    pub root_cert: String,
    /// Needed unless an intermediate signs.
    pub root_key: Option<PrivateKeyPem>,
    /// `(certificate, key)` of an intermediate signed by the root.
    pub intermediate: Option<(String, PrivateKeyPem)>,
    /// Further trusted roots (an old root during a rotation).
    pub extra_roots: Option<String>,
}

const ROOT_CERT_FILE: &str = "root-cert.pem";
const ROOT_KEY_FILE: &str = "root-key.pem";
const NEXT_ROOT_CERT_FILE: &str = "next-root-cert.pem";
const NEXT_ROOT_KEY_FILE: &str = "next-root-key.pem";
const BUNDLE_FILE: &str = "trust-bundle.pem";
/// Held (flock) while a root is loaded or created.
const LOCK_FILE: &str = ".lock";

struct RootEntry {
    der: CertificateDer<'static>,
    info: CertInfo,
    /// The latest not-after of a leaf issued under this root: until then,
    /// retiring it can break a peer.
    leaves_valid_until: Option<OffsetDateTime>,
}

/// A root distributed in the bundle but not signing yet.
struct PendingRoot {
    root: RootEntry,
    key: KeyPair,
}

struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// Certificates between the leaf and the root (the intermediate, if any).
    chain: Vec<CertificateDer<'static>>,
    not_after: OffsetDateTime,
    /// The root's key when the CA made the intermediate itself, to make the
    /// next one before this one runs out (an intermediate loaded from PEM is
    /// renewed by whoever made it).
    renew_with: Option<PrivateKeyPem>,
}

struct CaState {
    /// `roots[0]` is the active root, the one `signer` chains to.
    roots: Vec<RootEntry>,
    pending: Option<PendingRoot>,
    signer: Signer,
    bundle: TrustBundle,
    issued: u64,
}

impl CaState {
    fn new(
        roots: Vec<RootEntry>,
        pending: Option<PendingRoot>,
        signer: Signer,
        td: &str,
    ) -> Result<Self, CaError> {
        let bundle = Self::bundle_of(&roots, pending.as_ref(), td)?;
        Ok(Self {
            roots,
            pending,
            signer,
            bundle,
            issued: 0,
        })
    }

    /// Active root first, then the older ones, then a pending one.
    fn bundle_of(
        roots: &[RootEntry],
        pending: Option<&PendingRoot>,
        td: &str,
    ) -> Result<TrustBundle, CaError> {
        let ders = roots
            .iter()
            .chain(pending.map(|p| &p.root))
            .map(|r| r.der.clone());
        Ok(TrustBundle::new(td, ders)?)
    }

    fn rebuild_bundle(&mut self, td: &str) -> Result<(), CaError> {
        self.bundle = Self::bundle_of(&self.roots, self.pending.as_ref(), td)?;
        Ok(())
    }
}

/// An in-process certificate authority. Signing is synchronous and cheap
/// (about a millisecond); [`CertificateAuthority`] wraps it for the agent.
///
/// Root rotation has three steps so no handshake fails on the way:
/// [`Ca::prepare_root_rotation`] adds a new root to the bundle only; once
/// every node has fetched that bundle, [`Ca::activate_root`] makes new leaves
/// chain to it (nodes reissue when they see the active root change); once
/// every leaf is reissued, [`Ca::retire_root`] removes the old root.
pub struct Ca {
    opts: CaOptions,
    clock: SharedClock,
    state: Mutex<CaState>,
    dir: Option<PathBuf>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.lock();
        f.debug_struct("Ca")
            .field("trust_domain", &self.opts.trust_domain)
            .field("active_root", &st.bundle.active_root())
            .field("roots", &st.roots.len())
            .field(
                "pending_root",
                &st.pending.as_ref().map(|p| p.root.info.fingerprint),
            )
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// What `sluice status` shows about the CA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaStatus {
    pub trust_domain: String,
    pub signer: String,
    pub leaf_lifetime_secs: u64,
    pub issued: u64,
    /// A root in the bundle that does not sign yet (rotation step one).
    pub pending_root: Option<Fingerprint>,
    pub bundle: BundleStatus,
}

fn random_serial() -> SerialNumber {
    // 128 random bits; rcgen encodes it as a positive DER INTEGER.
    SerialNumber::from_slice(&rand::random::<[u8; 16]>())
}

fn ca_params(
    cn: String,
    td: &str,
    nb: OffsetDateTime,
    na: OffsetDateTime,
    path_len: Option<u8>,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, format!("sluice {td}"));
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.serial_number = Some(random_serial());
    p.not_before = nb;
    p.not_after = na;
    p.use_authority_key_identifier_extension = true;
    p
}

fn new_key() -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(CaError::internal("generating a P-256 key"))
}

fn info(der: &CertificateDer<'_>, what: &str) -> Result<CertInfo, CaError> {
    CertInfo::parse(der).map_err(|e| CaError::Config {
        reason: format!("{what}: {e}"),
    })
}

fn load_key(what: &str, pem: &PrivateKeyPem) -> Result<KeyPair, CaError> {
    KeyPair::from_pem(pem.expose()).map_err(|e| CaError::Config {
        reason: format!("{what}: not a usable PKCS#8 private key: {e}"),
    })
}

/// The key must belong to the certificate, or every signature would be useless.
/// The CA directory must not be writable by everyone, nor a root key in it
/// readable or writable by everyone (nor anything but a plain file):
/// whoever can write there can plant a root of their own (a matching key
/// and certificate), and a readable key is a stolen root. Group access is
/// the operator's choice (a volume with an fsGroup has it). Checked, not
/// repaired: something changed them, and an operator should look.
fn check_private_dir(dir: &Path) -> Result<(), CaError> {
    let io_error = |path: &Path, source| storage::StorageError::Io {
        path: path.into(),
        action: "reading the CA directory's permissions",
        source,
    };
    let d = fs::metadata(dir).map_err(|e| io_error(dir, e))?;
    if d.mode() & 0o002 != 0 {
        return Err(CaError::Config {
            reason: format!(
                "the CA directory {} is writable by everyone (mode {:o}): anyone who can write \
                 there can plant a root; chmod 700 it",
                dir.display(),
                d.mode() & 0o7777
            ),
        });
    }
    let key = dir.join(ROOT_KEY_FILE);
    match fs::symlink_metadata(&key) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(&key, e).into()),
        Ok(k) if !k.is_file() || k.mode() & 0o007 != 0 => Err(CaError::Config {
            reason: format!(
                "the root key {} must be a plain file that not everyone can read or write (it \
                 is mode {:o}{}); chmod 600 it",
                key.display(),
                k.mode() & 0o7777,
                if k.is_file() { "" } else { ", not a file" }
            ),
        }),
        Ok(_) => Ok(()),
    }
}

/// Completes a root activation that stopped part way (the root key and
/// certificate are replaced one after the other, in either order by
/// whoever wrote them): when `root-key.pem` or `root-cert.pem` already holds
/// the prepared root's, the prepared key and certificate both take their
/// place; only once both are the prepared root's do the `next-root-*` files
/// go (they may hold the only copy of the new key). Nothing to do otherwise.
fn finish_interrupted_activation(dir: &Path) -> Result<(), CaError> {
    let next_cert_path = dir.join(NEXT_ROOT_CERT_FILE);
    if !next_cert_path.exists() {
        return Ok(());
    }
    let (cert_path, key_path) = (dir.join(ROOT_CERT_FILE), dir.join(ROOT_KEY_FILE));
    let next_pem = storage::read(&next_cert_path)?;
    let next = storage::certs_from_pem("next root", &next_pem)?.swap_remove(0);
    let key_pem = PrivateKeyPem::new(storage::read(&key_path)?);
    let mut key_is_next =
        check_key_matches("next root", &next, &load_key("root key", &key_pem)?).is_ok();
    let mut cert_is_next =
        storage::certs_from_pem("root", &storage::read(&cert_path)?)?.swap_remove(0) == next;
    if cert_is_next && !key_is_next {
        // The certificate went first: the key follows from its copy.
        let next_key_path = dir.join(NEXT_ROOT_KEY_FILE);
        if let Ok(pem) = storage::read(&next_key_path) {
            let pem = PrivateKeyPem::new(pem);
            if check_key_matches("next root", &next, &load_key("next root key", &pem)?).is_ok() {
                tracing::warn!("finishing a root activation that was interrupted");
                storage::write_private(&key_path, pem.expose().as_bytes())?;
                key_is_next = true;
            }
        }
    }
    if key_is_next && !cert_is_next {
        tracing::warn!("finishing a root activation that was interrupted");
        storage::write_public(&cert_path, next_pem.as_bytes())?;
        cert_is_next = true;
    }
    if cert_is_next && key_is_next {
        for f in [NEXT_ROOT_KEY_FILE, NEXT_ROOT_CERT_FILE] {
            let _ = fs::remove_file(dir.join(f));
        }
    }
    Ok(())
}

fn check_key_matches(what: &str, cert: &CertificateDer<'_>, key: &KeyPair) -> Result<(), CaError> {
    use rcgen::PublicKeyData as _;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| CaError::Config {
        reason: format!("{what}: {e}"),
    })?;
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(CaError::Config {
            reason: format!("{what}: the private key does not belong to the certificate"),
        });
    }
    if !parsed.is_ca() {
        return Err(CaError::Config {
            reason: format!(
                "{what}: the certificate is not a CA certificate (basicConstraints cA)"
            ),
        });
    }
    Ok(())
}

/// Checks that `issuer`'s key signed `cert`: a certificate that only names
/// the right issuer (another CA of the same name, an intermediate of an
/// earlier root) would make leaves no peer can verify.
fn check_signed_by(
    what: &str,
    cert: &CertificateDer<'_>,
    issuer: &CertificateDer<'_>,
) -> Result<(), CaError> {
    fn parse<'a>(
        what: &str,
        der: &'a CertificateDer<'_>,
    ) -> Result<x509_parser::certificate::X509Certificate<'a>, CaError> {
        x509_parser::parse_x509_certificate(der)
            .map(|(_, c)| c)
            .map_err(|e| CaError::Config {
                reason: format!("{what}: {e}"),
            })
    }
    let (cert, issuer) = (parse(what, cert)?, parse(what, issuer)?);
    cert.verify_signature(Some(issuer.public_key()))
        .map_err(|e| CaError::Config {
            reason: format!(
                "{what} names the root {:?} as its issuer, but the root's key did not sign it \
                 ({e}): give the intermediate this root issued, or the root that issued it",
                issuer.subject().to_string()
            ),
        })
}

fn root_entry(der: CertificateDer<'static>, what: &str) -> Result<RootEntry, CaError> {
    Ok(RootEntry {
        info: info(&der, what)?,
        der,
        leaves_valid_until: None,
    })
}

/// Whether the CSR's subject key itself is an uncompressed P-256 point (the
/// signature algorithm alone does not say which curve the key is on).
fn is_p256_key(csr_der: &[u8]) -> bool {
    use x509_parser::{
        certification_request::X509CertificationRequest,
        oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY},
        prelude::FromDer,
    };
    let Ok((_, csr)) = X509CertificationRequest::from_der(csr_der) else {
        return false;
    };
    let spki = &csr.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    spki.algorithm.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && curve.as_ref() == Some(&OID_EC_P256)
        && spki.subject_public_key.data.len() == 65
        && spki.subject_public_key.data.first() == Some(&4)
}

impl Ca {
    /// A CA with a freshly generated root (and intermediate if configured).
    pub fn generate(opts: CaOptions, clock: SharedClock) -> Result<Self, CaError> {
        check_opts(&opts)?;
        let (root, key) = Self::generate_root(&opts, &clock)?;
        let signer = Self::signer_for(&opts, &clock, &root, key)?;
        let state = CaState::new(vec![root], None, signer, &opts.trust_domain)?;
        Ok(Self {
            state: Mutex::new(state),
            opts,
            clock,
            dir: None,
        })
    }

    fn generate_root(
        opts: &CaOptions,
        clock: &SharedClock,
    ) -> Result<(RootEntry, KeyPair), CaError> {
        let now = to_offset(clock.now());
        let key = new_key()?;
        // A distinct name per root keeps path building unambiguous while two
        // roots are trusted.
        let params = ca_params(
            format!(
                "Sluice root CA {}",
                crate::x509::hex(&rand::random::<[u8; 4]>())
            ),
            &opts.trust_domain,
            now - opts.backdate,
            now + opts.root_lifetime,
            None,
        );
        let cert = params
            .self_signed(&key)
            .map_err(CaError::internal("self-signing the root"))?;
        Ok((root_entry(cert.der().clone(), "generated root")?, key))
    }

    /// The signer under `root`: the root itself, or a fresh intermediate.
    fn signer_for(
        opts: &CaOptions,
        clock: &SharedClock,
        root: &RootEntry,
        key: KeyPair,
    ) -> Result<Signer, CaError> {
        let root_issuer =
            Issuer::from_ca_cert_der(&root.der, key).map_err(|e| CaError::Config {
                reason: format!("root certificate: {e}"),
            })?;
        if !opts.intermediate {
            return Ok(Signer {
                issuer: root_issuer,
                chain: Vec::new(),
                not_after: root.info.not_after,
                renew_with: None,
            });
        }
        let root_key = PrivateKeyPem::new(root_issuer.key().serialize_pem());
        let now = to_offset(clock.now());
        let na = (now + opts.intermediate_lifetime).min(root.info.not_after);
        let key = new_key()?;
        let params = ca_params(
            format!(
                "Sluice intermediate CA {}",
                crate::x509::hex(&rand::random::<[u8; 4]>())
            ),
            &opts.trust_domain,
            now - opts.backdate,
            na,
            Some(0),
        );
        let cert = params
            .signed_by(&key, &root_issuer)
            .map_err(CaError::internal("signing the intermediate"))?;
        Ok(Signer {
            chain: vec![cert.der().clone()],
            issuer: Issuer::new(params, key),
            not_after: na,
            renew_with: Some(root_key),
        })
    }

    /// A CA from PEM material (a root and optionally an intermediate).
    pub fn from_pem(opts: CaOptions, clock: SharedClock, pem: CaPem) -> Result<Self, CaError> {
        Self::from_pem_with_pending(opts, clock, pem, None)
    }

    fn from_pem_with_pending(
        opts: CaOptions,
        clock: SharedClock,
        pem: CaPem,
        pending: Option<PendingRoot>,
    ) -> Result<Self, CaError> {
        check_opts(&opts)?;
        let root_der = storage::certs_from_pem("root certificate", &pem.root_cert)?.swap_remove(0);
        let root = root_entry(root_der, "root certificate")?;
        let signer = match (&pem.intermediate, &pem.root_key) {
            (Some((cert_pem, key_pem)), _) => {
                let chain = storage::certs_from_pem("intermediate certificate", cert_pem)?;
                let key = load_key("intermediate key", key_pem)?;
                check_key_matches("intermediate", &chain[0], &key)?;
                let int_info = info(&chain[0], "intermediate certificate")?;
                if int_info.issuer != root.info.subject {
                    return Err(CaError::Config {
                        reason: format!(
                            "intermediate was issued by {:?}, not by the root {:?}",
                            int_info.issuer, root.info.subject
                        ),
                    });
                }
                check_signed_by("intermediate", &chain[0], &root.der)?;
                let issuer =
                    Issuer::from_ca_cert_der(&chain[0], key).map_err(|e| CaError::Config {
                        reason: format!("intermediate certificate: {e}"),
                    })?;
                Signer {
                    issuer,
                    chain,
                    not_after: int_info.not_after,
                    renew_with: None,
                }
            }
            (None, Some(key_pem)) => {
                let key = load_key("root key", key_pem)?;
                check_key_matches("root", &root.der, &key)?;
                Self::signer_for(&opts, &clock, &root, key)?
            }
            (None, None) => {
                return Err(CaError::Config {
                    reason: "a root key or an intermediate certificate and key is needed to sign"
                        .into(),
                });
            }
        };
        // As for the extra roots below: leaves it signed before a restart
        // are not recorded, so they are assumed valid a leaf lifetime on
        // (retiring it once a new root is active then waits, or needs
        // `force`).
        let mut root = root;
        root.leaves_valid_until = Some(to_offset(clock.now()) + opts.leaf_lifetime);
        let mut roots = vec![root];
        if let Some(extra) = &pem.extra_roots {
            for der in storage::certs_from_pem("extra trusted roots", extra)? {
                let mut entry = root_entry(der, "extra trusted root")?;
                // Whether it signed leaves before a restart is not recorded:
                // assume it did, so an early retire needs `force`.
                entry.leaves_valid_until = Some(to_offset(clock.now()) + opts.leaf_lifetime);
                let known = roots.iter().chain(pending.as_ref().map(|p| &p.root));
                if known
                    .into_iter()
                    .all(|r| r.info.fingerprint != entry.info.fingerprint)
                {
                    roots.push(entry);
                }
            }
        }
        let state = CaState::new(roots, pending, signer, &opts.trust_domain)?;
        Ok(Self {
            state: Mutex::new(state),
            opts,
            clock,
            dir: None,
        })
    }

    /// The standalone CA: loads the root from `dir` (`root-cert.pem`,
    /// `root-key.pem`, `trust-bundle.pem`, and `next-root-*.pem` during a
    /// rotation) or creates it there. The directory is created with mode 0700
    /// and keys are written with mode 0600.
    pub fn open_or_create(
        dir: &Path,
        opts: CaOptions,
        clock: SharedClock,
    ) -> Result<Self, CaError> {
        check_opts(&opts)?;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| storage::StorageError::Io {
                path: dir.into(),
                action: "creating the CA directory",
                source,
            })?;
        // Agents of several nodes on one machine may share the directory and
        // start together: one creates the root, the others then load it
        // (without the lock, two could each write a key and a certificate,
        // leaving a pair that does not match).
        check_private_dir(dir)?;
        let lock = storage::lock_exclusive(&dir.join(LOCK_FILE))?;
        let cert_path = dir.join(ROOT_CERT_FILE);
        let mut ca = if cert_path.exists() {
            let bundle_path = dir.join(BUNDLE_FILE);
            let next_cert = dir.join(NEXT_ROOT_CERT_FILE);
            finish_interrupted_activation(dir)?;
            let pending = if next_cert.exists() {
                let der = storage::certs_from_pem("next root", &storage::read(&next_cert)?)?
                    .swap_remove(0);
                let key = load_key(
                    "next root key",
                    &PrivateKeyPem::new(storage::read(&dir.join(NEXT_ROOT_KEY_FILE))?),
                )?;
                check_key_matches("next root", &der, &key)?;
                Some(PendingRoot {
                    root: root_entry(der, "next root")?,
                    key,
                })
            } else {
                None
            };
            Self::from_pem_with_pending(
                opts,
                clock,
                CaPem {
                    root_cert: storage::read(&cert_path)?,
                    root_key: Some(PrivateKeyPem::new(storage::read(&dir.join(ROOT_KEY_FILE))?)),
                    intermediate: None,
                    extra_roots: if bundle_path.exists() {
                        Some(storage::read(&bundle_path)?)
                    } else {
                        None
                    },
                },
                pending,
            )?
        } else if dir.join(ROOT_KEY_FILE).exists() && dir.join(BUNDLE_FILE).exists() {
            // A restore that missed a file, a certificate deleted: a new root
            // would overwrite the key every leaf and peer trusts. (Without
            // the bundle, written last, the first start stopped part way:
            // nothing was ever signed with that key, and it is replaced.)
            return Err(CaError::Config {
                reason: format!(
                    "{} has a root key but no {ROOT_CERT_FILE}: restore the certificate, or remove \
                     {ROOT_KEY_FILE} to create a new root (every node must then trust it, and \
                     every workload certificate is reissued)",
                    dir.display()
                ),
            });
        } else {
            let (root, key) = Self::generate_root(&opts, &clock)?;
            storage::write_private(&dir.join(ROOT_KEY_FILE), key.serialize_pem().as_bytes())?;
            storage::write_public(
                &cert_path,
                storage::certs_to_pem(std::slice::from_ref(&root.der)).as_bytes(),
            )?;
            let signer = Self::signer_for(&opts, &clock, &root, key)?;
            let state = CaState::new(vec![root], None, signer, &opts.trust_domain)?;
            storage::write_public(&dir.join(BUNDLE_FILE), state.bundle.to_pem().as_bytes())?;
            Self {
                state: Mutex::new(state),
                opts,
                clock,
                dir: None,
            }
        };
        ca.dir = Some(dir.to_path_buf());
        drop(lock);
        Ok(ca)
    }

    fn lock(&self) -> MutexGuard<'_, CaState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn options(&self) -> &CaOptions {
        &self.opts
    }

    pub fn trust_domain(&self) -> &str {
        &self.opts.trust_domain
    }

    pub fn bundle(&self) -> TrustBundle {
        self.lock().bundle.clone()
    }

    /// Signs `csr_der` for `authorised`. The CSR's signature must verify, its
    /// key must be ECDSA P-256, and its only SAN must be `authorised`'s URI;
    /// everything else in the certificate is the CA's choice.
    pub fn sign_csr(&self, csr_der: &[u8], authorised: &SpiffeId) -> Result<Issued, CaError> {
        if authorised.trust_domain() != self.opts.trust_domain {
            return Err(CaError::ForeignTrustDomain {
                identity: authorised.clone(),
                trust_domain: self.opts.trust_domain.clone(),
            });
        }
        let invalid = |reason: String| CaError::InvalidCsr {
            identity: authorised.to_string(),
            reason,
        };
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| invalid(format!("cannot use the CSR: {e}")))?;
        if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 || !is_p256_key(csr_der) {
            return Err(invalid("the key must be ECDSA P-256".into()));
        }
        let requested: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if requested.len() != 1 || requested[0] != authorised.as_str() {
            return Err(CaError::IdentityMismatch {
                authorised: authorised.clone(),
                requested,
            });
        }

        let now = to_offset(self.clock.now());
        let mut st = self.lock();
        self.renew_intermediate_if_due(&mut st, now);
        let mut p = CertificateParams::default();
        // Empty subject: the identity is the URI SAN (rcgen marks it critical).
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(
            authorised
                .as_str()
                .try_into()
                .map_err(|e| invalid(format!("identity is not IA5: {e}")))?,
        )];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.serial_number = Some(random_serial());
        p.not_before = now - self.opts.backdate;
        p.not_after = (now + self.opts.leaf_lifetime).min(st.signer.not_after);
        p.use_authority_key_identifier_extension = true;
        if p.not_after <= now {
            return Err(CaError::Config {
                reason: format!(
                    "the signing CA certificate expired at {}; rotate the root",
                    st.signer.not_after
                ),
            });
        }
        // A leaf cut this short by the signer's own expiry would be due for
        // renewal at once, and every node would ask again every second:
        // refused, so that nodes back off and say why.
        let least = self.opts.leaf_lifetime.min(Duration::from_secs(1200)) / 2;
        if p.not_after - now < least {
            return Err(CaError::Config {
                reason: format!(
                    "the signing CA certificate expires at {}, too soon to issue a workload \
                     certificate that lasts {least:?}; rotate the root (`mesh-agent ca rotate`)",
                    st.signer.not_after
                ),
            });
        }
        let cert = p
            .signed_by(&csr.public_key, &st.signer.issuer)
            .map_err(CaError::internal("signing a workload certificate"))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(st.signer.chain.iter().cloned());
        let active = &mut st.roots[0];
        active.leaves_valid_until = Some(
            active
                .leaves_valid_until
                .map_or(p.not_after, |t| t.max(p.not_after)),
        );
        st.issued += 1;
        Ok(Issued {
            chain,
            trust_bundle: st.bundle.clone(),
        })
    }

    /// A server certificate for the CA service itself (DNS names and IPs as
    /// SANs), chained to the active root.
    pub fn issue_serving_certificate(
        &self,
        dns_names: &[&str],
        ips: &[IpAddr],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = new_key()?;
        let now = to_offset(self.clock.now());
        let mut st = self.lock();
        self.renew_intermediate_if_due(&mut st, now);
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            dns_names.first().copied().unwrap_or("sluice-ca"),
        );
        p.distinguished_name = dn;
        for n in dns_names {
            p.subject_alt_names
                .push(SanType::DnsName((*n).try_into().map_err(|e| {
                    CaError::Config {
                        reason: format!("DNS name {n:?}: {e}"),
                    }
                })?));
        }
        p.subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.serial_number = Some(random_serial());
        p.not_before = now - self.opts.backdate;
        p.not_after = (now + Duration::from_secs(90 * 24 * 3600)).min(st.signer.not_after);
        p.use_authority_key_identifier_extension = true;
        // Served expired, every agent's handshake would fail with no word
        // of why on the CA's side.
        if p.not_after <= now {
            return Err(CaError::Config {
                reason: format!(
                    "the signing CA certificate expired at {}, so the CA service has no valid \
                     certificate to serve; rotate the root (`mesh-agent ca rotate --prepare`)",
                    st.signer.not_after
                ),
            });
        }
        let cert = p
            .signed_by(&key, &st.signer.issuer)
            .map_err(CaError::internal("signing the serving certificate"))?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(st.signer.chain.iter().cloned());
        Ok((chain, PrivatePkcs8KeyDer::from(key.serialize_der()).into()))
    }

    /// Makes a new intermediate under the active root once the one signing
    /// has less than a third of its lifetime (or two workload certificate
    /// lifetimes) left: leaves are cut to the signer's expiry, so without
    /// this a CA that runs for longer than `intermediate_lifetime` first
    /// issues shorter and shorter certificates, then none. Skipped when the
    /// root's own expiry would cap the new one as short (rotate the root
    /// then); a failure keeps the current intermediate and is logged.
    fn renew_intermediate_if_due(&self, st: &mut CaState, now: OffsetDateTime) {
        let Some(root_key) = &st.signer.renew_with else {
            return;
        };
        let lifetime = self.opts.intermediate_lifetime;
        let due_within = (lifetime / 3).max(self.opts.leaf_lifetime * 2);
        let root = &st.roots[0];
        let fresh_until = (now + lifetime).min(root.info.not_after);
        if st.signer.not_after - now >= due_within
            || fresh_until <= st.signer.not_after + Duration::from_secs(60)
        {
            return;
        }
        let renewed = load_key("root key", root_key)
            .and_then(|key| Self::signer_for(&self.opts, &self.clock, root, key));
        match renewed {
            Ok(signer) => {
                tracing::info!(
                    old_expiry = %st.signer.not_after,
                    new_expiry = %signer.not_after,
                    "intermediate CA renewed under the active root"
                );
                st.signer = signer;
            }
            Err(e) => tracing::warn!(
                expiry = %st.signer.not_after,
                "could not renew the intermediate CA, still signing with the current one: {e}"
            ),
        }
    }

    fn persist_bundle(&self, st: &CaState) -> Result<(), CaError> {
        if let Some(dir) = &self.dir {
            storage::write_public(&dir.join(BUNDLE_FILE), st.bundle.to_pem().as_bytes())?;
        }
        Ok(())
    }

    /// Rotation step one: a new root joins the trust bundle without signing.
    /// Returns its fingerprint.
    pub fn prepare_root_rotation(&self) -> Result<Fingerprint, CaError> {
        let mut st = self.lock();
        if let Some(p) = &st.pending {
            return Err(CaError::Rotation {
                reason: format!(
                    "root {} is already prepared; activate it first (`mesh-agent ca rotate \
                     --activate`)",
                    p.root.info.fingerprint
                ),
            });
        }
        let (root, key) = Self::generate_root(&self.opts, &self.clock)?;
        let fp = root.info.fingerprint;
        if let Some(dir) = &self.dir {
            storage::write_private(
                &dir.join(NEXT_ROOT_KEY_FILE),
                key.serialize_pem().as_bytes(),
            )?;
            storage::write_public(
                &dir.join(NEXT_ROOT_CERT_FILE),
                storage::certs_to_pem(std::slice::from_ref(&root.der)).as_bytes(),
            )?;
        }
        st.pending = Some(PendingRoot { root, key });
        st.rebuild_bundle(&self.opts.trust_domain)?;
        self.persist_bundle(&st)?;
        tracing::info!(root = %fp, "root rotation prepared: new root trusted, not yet signing");
        Ok(fp)
    }

    /// Rotation step two: the prepared root signs from now on. Call it once
    /// every node has fetched the bundle with the new root.
    pub fn activate_root(&self, fingerprint: &Fingerprint) -> Result<(), CaError> {
        let mut st = self.lock();
        match &st.pending {
            Some(p) if &p.root.info.fingerprint == fingerprint => {}
            _ => {
                return Err(CaError::Rotation {
                    reason: format!(
                        "{fingerprint} is not the prepared root; prepare a rotation first \
                         (`mesh-agent ca rotate --prepare`)"
                    ),
                });
            }
        }
        // The signer first (from a copy of the key), then the files, and
        // only then does the prepared root leave `pending`: a step that
        // fails leaves the rotation where it was, to be activated again.
        let pending = st.pending.as_ref().expect("checked above");
        let key_pem = pending.key.serialize_pem();
        let signer = Self::signer_for(
            &self.opts,
            &self.clock,
            &pending.root,
            load_key("prepared root key", &PrivateKeyPem::new(key_pem.clone()))?,
        )?;
        if let Some(dir) = &self.dir {
            storage::write_private(&dir.join(ROOT_KEY_FILE), key_pem.as_bytes())?;
            storage::write_public(
                &dir.join(ROOT_CERT_FILE),
                storage::certs_to_pem(std::slice::from_ref(&pending.root.der)).as_bytes(),
            )?;
            for f in [NEXT_ROOT_KEY_FILE, NEXT_ROOT_CERT_FILE] {
                let _ = fs::remove_file(dir.join(f));
            }
        }
        let pending = st.pending.take().expect("checked above");
        st.roots.insert(0, pending.root);
        st.signer = signer;
        st.rebuild_bundle(&self.opts.trust_domain)?;
        self.persist_bundle(&st)?;
        tracing::info!(root = %fingerprint, "root activated: new certificates chain to it");
        Ok(())
    }

    /// Rotation step three: removes a root that no longer signs. Refused
    /// while leaves issued under it may still be valid, unless `force` (when
    /// every node has reissued, as `sluice status` shows).
    pub fn retire_root(&self, fingerprint: &Fingerprint, force: bool) -> Result<(), CaError> {
        let now = to_offset(self.clock.now());
        let mut st = self.lock();
        let Some(pos) = st
            .roots
            .iter()
            .position(|r| &r.info.fingerprint == fingerprint)
        else {
            return Err(CaError::Retire {
                fingerprint: *fingerprint,
                reason: "it is not a signing or former root of this CA".into(),
            });
        };
        if pos == 0 {
            return Err(CaError::Retire {
                fingerprint: *fingerprint,
                reason: "it is the active root; prepare and activate a new one first".into(),
            });
        }
        if let Some(until) = st.roots[pos].leaves_valid_until
            && until > now
            && !force
        {
            return Err(CaError::Retire {
                fingerprint: *fingerprint,
                reason: format!(
                    "certificates issued under it stay valid until {until}; wait until then, or force \
                     it once every node has reissued"
                ),
            });
        }
        st.roots.remove(pos);
        st.rebuild_bundle(&self.opts.trust_domain)?;
        self.persist_bundle(&st)?;
        tracing::info!(root = %fingerprint, "root retired from the trust bundle");
        Ok(())
    }

    pub fn status(&self) -> CaStatus {
        let st = self.lock();
        let signer = match st.signer.chain.first() {
            Some(int) => CertInfo::parse(int).map(|i| i.subject).unwrap_or_default(),
            None => st.roots[0].info.subject.clone(),
        };
        CaStatus {
            trust_domain: self.opts.trust_domain.clone(),
            signer,
            leaf_lifetime_secs: self.opts.leaf_lifetime.as_secs(),
            issued: st.issued,
            pending_root: st.pending.as_ref().map(|p| p.root.info.fingerprint),
            bundle: st.bundle.status(self.clock.now()),
        }
    }
}

fn check_opts(opts: &CaOptions) -> Result<(), CaError> {
    spiffe::validate_trust_domain(&opts.trust_domain).map_err(|e| CaError::Config {
        reason: format!("trust domain: {e}"),
    })?;
    if opts.leaf_lifetime.is_zero() || opts.leaf_lifetime > opts.root_lifetime {
        return Err(CaError::Config {
            reason: format!(
                "leaf lifetime {:?} must be positive and shorter than the root lifetime {:?}",
                opts.leaf_lifetime, opts.root_lifetime
            ),
        });
    }
    // A generated intermediate is replaced once two leaf lifetimes (or a
    // third of its own) are left: one shorter than three leaf lifetimes
    // would be replaced on nearly every issuance.
    if opts.intermediate && opts.intermediate_lifetime < opts.leaf_lifetime * 3 {
        return Err(CaError::Config {
            reason: format!(
                "intermediate lifetime {:?} must be at least three workload certificate \
                 lifetimes ({:?})",
                opts.intermediate_lifetime,
                opts.leaf_lifetime * 3
            ),
        });
    }
    // Certificates start `backdate` early (clock skew between nodes) and are
    // renewed at half their life: a lifetime under twice the backdate would
    // be due for renewal as soon as it is issued, every second.
    if opts.leaf_lifetime <= opts.backdate * 2 {
        return Err(CaError::Config {
            reason: format!(
                "workload certificate lifetime {:?} (--workload-cert-ttl) must be more than \
                 twice the backdate of {:?}, or certificates would be renewed continuously",
                opts.leaf_lifetime, opts.backdate
            ),
        });
    }
    Ok(())
}

impl CertificateAuthority for Ca {
    fn sign(&self, request: SignRequest) -> BoxFuture<'_, Result<Issued, CaError>> {
        Box::pin(async move { self.sign_csr(&request.csr_der, &request.identity) })
    }

    fn trust_bundle(&self) -> BoxFuture<'_, Result<TrustBundle, CaError>> {
        Box::pin(async move { Ok(self.bundle()) })
    }
}

impl CertificateAuthority for Arc<Ca> {
    fn sign(&self, request: SignRequest) -> BoxFuture<'_, Result<Issued, CaError>> {
        (**self).sign(request)
    }

    fn trust_bundle(&self) -> BoxFuture<'_, Result<TrustBundle, CaError>> {
        (**self).trust_bundle()
    }
}

/// Builds a CSR for `identity` with `key` (the node side of issuance).
pub fn csr_for(identity: &SpiffeId, key: &KeyPair) -> Result<Vec<u8>, CaError> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(identity.as_str().try_into().map_err(|e| {
        CaError::InvalidCsr {
            identity: identity.to_string(),
            reason: format!("identity is not IA5: {e}"),
        }
    })?)];
    let csr = p
        .serialize_request(key)
        .map_err(CaError::internal("building a CSR"))?;
    Ok(csr.der().to_vec())
}

/// A fresh ECDSA P-256 key for a workload.
pub fn generate_workload_key() -> Result<KeyPair, CaError> {
    new_key()
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn only_a_p256_subject_key_passes() {
        let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let p256 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert!(is_p256_key(&csr_for(&id, &p256).unwrap()));
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(!is_p256_key(&csr_for(&id, &p384).unwrap()));
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert!(!is_p256_key(&csr_for(&id, &ed).unwrap()));
        assert!(!is_p256_key(b"not a CSR"));
    }
}
