//! The keys the API server signs service-account tokens with, published at
//! `/openid/v1/jwks`: with them the CA refuses a forged token itself, so a
//! flood of made-up tokens never reaches the TokenReview API (whose slots
//! the agents need). Accepting a token still takes a TokenReview: only the
//! API server knows whether its pod still exists.
//!
//! Failing safe: where the keys cannot be had (no permission for the
//! discovery endpoint, an old API server, a key type this code does not
//! know), tokens go to the TokenReview as before.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use base64::Engine as _;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;

pub const JWKS_PATH: &str = "/openid/v1/jwks";
/// The keys are fetched again at most this often (a token naming a key not
/// seen yet asks for them), so made-up key ids cannot flood the API server.
/// Between two fetches such a token is answered "retry" (unavailable), not
/// refused: after the API server rotates its signing key, agents' first
/// tokens under the new key get through once the CA has read it.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// After the keys could not be had, tokens go unchecked (to the
/// TokenReview) this long before the CA asks again.
pub const RETRY_UNAVAILABLE: Duration = Duration::from_secs(300);

/// A public key of the API server's, as the JWKS gives it.
#[derive(Clone, Debug, PartialEq)]
pub enum VerifyKey {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// SEC1 uncompressed point (0x04 || x || y) on P-256.
    EcP256(Vec<u8>),
    /// Published in a form this code does not check (P-384, P-521, an
    /// unreadable key): tokens naming it go to the TokenReview, which
    /// decides; they are no forgery for that.
    Unsupported,
}

/// What the keys say of a token.
#[derive(Debug, PartialEq)]
pub enum Check {
    /// Signed by one of the API server's keys.
    Signed,
    /// Not signed by any of them: refuse without a TokenReview.
    Forged(String),
    /// No verdict (the keys are not available, or an algorithm this code
    /// does not check): the TokenReview decides.
    Unknown,
    /// The token names a key id missing from keys read before it arrived,
    /// and they may not be read again yet ([`REFRESH_EVERY`]): neither
    /// refused (the key may be new) nor reviewed (made-up key ids must not
    /// take review slots). The caller is told to retry.
    NotYet(String),
}

#[derive(Deserialize)]
struct Jwks {
    #[serde(default)]
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    #[serde(default)]
    kty: String,
    #[serde(default)]
    kid: String,
    #[serde(default)]
    crv: String,
    #[serde(default)]
    n: String,
    #[serde(default)]
    e: String,
    #[serde(default)]
    x: String,
    #[serde(default)]
    y: String,
}

fn b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

/// The keys of a JWKS document, by key id (keys of other types kept as
/// [`VerifyKey::Unsupported`]). An error when it is not a JWKS at all.
pub fn parse(body: &[u8]) -> Result<HashMap<String, VerifyKey>, String> {
    let jwks: Jwks =
        serde_json::from_slice(body).map_err(|e| format!("the JWKS is not a key set: {e}"))?;
    let mut keys = HashMap::new();
    for k in jwks.keys {
        let key = match (k.kty.as_str(), k.crv.as_str()) {
            ("RSA", _) => match (b64(&k.n), b64(&k.e)) {
                (Some(n), Some(e)) if !n.is_empty() && !e.is_empty() => VerifyKey::Rsa { n, e },
                _ => VerifyKey::Unsupported,
            },
            ("EC", "P-256") => match (b64(&k.x), b64(&k.y)) {
                (Some(x), Some(y)) if x.len() == 32 && y.len() == 32 => {
                    let mut point = vec![4u8];
                    point.extend_from_slice(&x);
                    point.extend_from_slice(&y);
                    VerifyKey::EcP256(point)
                }
                _ => VerifyKey::Unsupported,
            },
            _ => VerifyKey::Unsupported,
        };
        keys.insert(k.kid, key);
    }
    Ok(keys)
}

#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    alg: String,
    #[serde(default)]
    kid: String,
}

/// A token's parts: (algorithm, key id, signed bytes, signature).
fn split(token: &str) -> Option<(String, String, &[u8], Vec<u8>)> {
    let (signed, sig) = token.rsplit_once('.')?;
    let (header, _) = signed.split_once('.')?;
    let h: Header = serde_json::from_slice(&b64(header)?).ok()?;
    Some((h.alg, h.kid, signed.as_bytes(), b64(sig)?))
}

/// Checks `token` against `keys`; `keys` must be the API server's current
/// set (an unknown key id is then a forgery).
pub fn check(token: &str, keys: &HashMap<String, VerifyKey>) -> Check {
    let Some((alg, kid, signed, sig)) = split(token) else {
        return Check::Forged("not a signed JWT".into());
    };
    let verify = |key: &VerifyKey| match (alg.as_str(), key) {
        ("RS256", VerifyKey::Rsa { n, e }) => Some(
            RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, &sig)
                .is_ok(),
        ),
        ("ES256", VerifyKey::EcP256(point)) => Some(
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(signed, &sig)
                .is_ok(),
        ),
        // RS256 or ES256 against a key of another kind: not its signature.
        ("RS256" | "ES256", _) => Some(false),
        // The API server signs RS256 with an RSA key and ES256 with a P-256
        // one: any other algorithm naming such a key (`none`, HS256, PS256)
        // is not its token, and must not take a TokenReview slot.
        (_, VerifyKey::Rsa { .. } | VerifyKey::EcP256(_)) => Some(false),
        _ => None,
    };
    let candidates: Vec<&VerifyKey> = if kid.is_empty() {
        keys.values().collect()
    } else {
        keys.get(&kid).into_iter().collect()
    };
    if candidates.is_empty() {
        return Check::Forged(format!(
            "the token names signing key {kid:?}, which the API server does not publish"
        ));
    }
    let mut unknown = false;
    for key in candidates {
        match verify(key) {
            Some(true) => return Check::Signed,
            Some(false) => {}
            None => unknown = true,
        }
    }
    if unknown {
        return Check::Unknown;
    }
    Check::Forged("the token's signature is not the API server's".into())
}

/// The keys as last fetched, and when.
#[derive(Debug, Default)]
pub struct KeyCache {
    /// `None`: not fetched yet, or no fetch has succeeded.
    pub keys: Option<std::sync::Arc<HashMap<String, VerifyKey>>>,
    /// When the last fetch began (successful or not).
    pub fetched: Option<Instant>,
    /// When the fetch that gave `keys` began.
    pub keys_from: Option<Instant>,
    /// Whether the last fetch failed.
    pub last_failed: bool,
}

/// When keys were read, and what a token under a key id they lack is told.
#[derive(Clone, Copy, Debug)]
pub struct Read {
    /// When the fetch that gave them began.
    pub from: Instant,
    /// The fetch after it failed: a missing key id proves nothing, and the
    /// TokenReview decides.
    pub last_failed: bool,
    /// When the keys may be read again.
    pub retry_in: Duration,
}

impl KeyCache {
    /// Whether to fetch now, for a token naming `kid`.
    pub fn wants_fetch(&self, kid_known: bool, now: Instant) -> bool {
        match (self.fetched, &self.keys) {
            (None, _) => true,
            (Some(at), None) => now.duration_since(at) >= RETRY_UNAVAILABLE,
            (Some(at), Some(_)) => !kid_known && now.duration_since(at) >= REFRESH_EVERY,
        }
    }
}

/// The key id a token names, if it says.
pub fn kid_of(token: &str) -> Option<String> {
    split(token).map(|(_, kid, _, _)| kid)
}

/// Checks `token`, arrived at `arrived`, against `keys` as `read`: a key id
/// they lack is a forgery only if they were read after the token arrived;
/// read before, the key may be newer than them, and the answer is
/// [`Check::NotYet`] with when to retry; if they could not be read again,
/// [`Check::Unknown`] (the TokenReview decides).
pub fn check_at(
    token: &str,
    keys: &HashMap<String, VerifyKey>,
    read: Read,
    arrived: Instant,
) -> Check {
    if let Some(kid) = kid_of(token)
        && !kid.is_empty()
        && !keys.contains_key(&kid)
    {
        if read.last_failed {
            return Check::Unknown;
        }
        if read.from < arrived {
            return Check::NotYet(format!(
                "the token names signing key {kid:?}, not among the API server's keys as read {} \
                 s ago; they are read again in {} s: retry then",
                arrived.saturating_duration_since(read.from).as_secs(),
                read.retry_in.as_secs().max(1)
            ));
        }
    }
    check(token, keys)
}

#[cfg(test)]
mod tests {
    use ring::{
        rand::SystemRandom,
        signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _},
    };

    use super::*;

    fn enc(v: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    /// A P-256 key, its JWKS entry under `kid`, and a signer.
    fn es256(kid: &str) -> (EcdsaKeyPair, serde_json::Value) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let p = pair.public_key().as_ref();
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": enc(&p[1..33]), "y": enc(&p[33..65]),
        });
        (pair, jwk)
    }

    fn token(pair: &EcdsaKeyPair, kid: &str) -> String {
        let header = enc(format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#).as_bytes());
        let payload = enc(br#"{"aud":["sluice-ca"],"sub":"system:serviceaccount:s:a"}"#);
        let signed = format!("{header}.{payload}");
        let sig = pair.sign(&SystemRandom::new(), signed.as_bytes()).unwrap();
        format!("{signed}.{}", enc(sig.as_ref()))
    }

    #[test]
    fn signed_forged_and_unknown_tokens() {
        let (pair, jwk) = es256("k1");
        let (other, _) = es256("k1");
        let keys = parse(serde_json::json!({"keys": [jwk]}).to_string().as_bytes()).unwrap();
        assert_eq!(check(&token(&pair, "k1"), &keys), Check::Signed);
        // Same key id, another key: forged.
        assert!(matches!(
            check(&token(&other, "k1"), &keys),
            Check::Forged(_)
        ));
        // A key id the API server does not publish.
        assert!(matches!(
            check(&token(&pair, "k2"), &keys),
            Check::Forged(_)
        ));
        // A signature flipped in its last byte.
        let mut t = token(&pair, "k1");
        let (signed, sig) = t.rsplit_once('.').unwrap();
        let mut sig = b64(sig).unwrap();
        *sig.last_mut().unwrap() ^= 1;
        t = format!("{signed}.{}", enc(&sig));
        assert!(matches!(check(&t, &keys), Check::Forged(_)));
        // Junk.
        for junk in ["", "a.b", "a.b.c", "x.y.z.w"] {
            assert!(matches!(check(junk, &keys), Check::Forged(_)), "{junk}");
        }
        // Another algorithm naming a key the CA checks: the API server does
        // not sign so (a forged token must not reach the TokenReview).
        for alg in ["PS256", "none", "HS256"] {
            for kid in [r#","kid":"k1""#, ""] {
                let header = enc(format!(r#"{{"alg":"{alg}"{kid}}}"#).as_bytes());
                assert!(
                    matches!(
                        check(&format!("{header}.e30.c2ln"), &keys),
                        Check::Forged(_)
                    ),
                    "{alg} {kid}"
                );
            }
        }
    }

    #[test]
    fn key_sets_keep_every_key_id_and_unchecked_keys_leave_tokens_to_the_review() {
        let (_, ec) = es256("ec");
        let keys = parse(
            serde_json::json!({"keys": [
                ec,
                {"kty": "RSA", "kid": "rsa", "n": enc(&[0xc1; 256]), "e": "AQAB"},
                {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
                {"kty": "oct", "kid": "secret", "k": "AA"},
            ]})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let mut kids: Vec<_> = keys.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["ec", "p384", "rsa", "secret"]);
        assert_eq!(keys["p384"], VerifyKey::Unsupported);
        assert_eq!(keys["secret"], VerifyKey::Unsupported);
        // A token of a key the CA cannot check goes to the TokenReview; one
        // naming a key the API server does not publish is a forgery, as is
        // one whose algorithm the CA checks and the key cannot have made.
        let header = enc(br#"{"alg":"ES384","kid":"p384"}"#);
        assert_eq!(check(&format!("{header}.e30.c2ln"), &keys), Check::Unknown);
        let header = enc(br#"{"alg":"ES256","kid":"p384"}"#);
        assert!(matches!(
            check(&format!("{header}.e30.c2ln"), &keys),
            Check::Forged(_)
        ));
        let header = enc(br#"{"alg":"ES384","kid":"gone"}"#);
        assert!(matches!(
            check(&format!("{header}.e30.c2ln"), &keys),
            Check::Forged(_)
        ));
        assert!(parse(b"not json").is_err());
    }

    /// A key id the keys lack: a forgery only if they were read after the
    /// token arrived; read before, "retry"; not read again (the last fetch
    /// failed), the TokenReview decides. A known key id is checked as ever.
    #[test]
    fn a_missing_key_id_is_judged_by_when_the_keys_were_read() {
        let (pair, jwk) = es256("k1");
        let keys = parse(serde_json::json!({"keys": [jwk]}).to_string().as_bytes()).unwrap();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        let read = |from, last_failed| Read {
            from,
            last_failed,
            retry_in: Duration::from_secs(3),
        };
        let new_key = token(&pair, "k2");
        match check_at(&new_key, &keys, read(t0, false), t1) {
            Check::NotYet(why) => {
                assert!(why.contains("\"k2\"") && why.contains("in 3 s"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            check_at(&new_key, &keys, read(t1, false), t0),
            Check::Forged(_)
        ));
        assert_eq!(
            check_at(&new_key, &keys, read(t0, true), t1),
            Check::Unknown
        );
        for last_failed in [false, true] {
            assert_eq!(
                check_at(&token(&pair, "k1"), &keys, read(t0, last_failed), t1),
                Check::Signed
            );
        }
    }

    #[test]
    fn fetches_are_bounded() {
        let now = Instant::now();
        let mut c = KeyCache::default();
        assert!(c.wants_fetch(false, now));
        c.fetched = Some(now);
        c.keys = Some(std::sync::Arc::new(HashMap::new()));
        assert!(!c.wants_fetch(false, now + Duration::from_secs(1)));
        assert!(c.wants_fetch(false, now + REFRESH_EVERY));
        assert!(!c.wants_fetch(true, now + REFRESH_EVERY));
        c.keys = None;
        assert!(!c.wants_fetch(false, now + REFRESH_EVERY));
        assert!(c.wants_fetch(false, now + RETRY_UNAVAILABLE));
    }
}
