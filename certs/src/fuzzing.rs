//! Harnesses shared by the cargo-fuzz targets (certs/fuzz) and the unit test
//! that replays the seed corpus, so CI exercises the same code.

use crate::spiffe::SpiffeId;

/// Parses arbitrary bytes as a SPIFFE ID and checks the parser's promises:
/// no panic, an accepted ID prints back to its input, re-parses equal, has
/// consistent parts and a DNS-safe SNI name; a rejected one has a message.
pub fn spiffe_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<SpiffeId>() {
        Ok(id) => {
            assert_eq!(id.to_string(), text, "display must round-trip");
            let again: SpiffeId = id.to_string().parse().expect("printed ID re-parses");
            assert_eq!(again, id);
            let rebuilt = SpiffeId::new(id.trust_domain(), id.namespace(), id.service_account())
                .expect("parts of a valid ID rebuild it");
            assert_eq!(rebuilt, id);
            assert!(!id.namespace().is_empty() && !id.service_account().is_empty());
            rustls_pki_types::ServerName::try_from(id.sni()).expect("SNI is a DNS name");
            let json = serde_json::to_string(&id).expect("serialises");
            assert_eq!(
                serde_json::from_str::<SpiffeId>(&json).expect("deserialises"),
                id
            );
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
