//! The tunnel target: `ip:port` in a CONNECT authority or the `sluice-target`
//! header. Only literal addresses are accepted: the inbound proxy never
//! resolves names on behalf of a peer.

use std::net::{IpAddr, SocketAddr};

/// Longest accepted target (`[v6 address]:65535` fits in 47).
pub const MAX_TARGET_LEN: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("tunnel target is {0} bytes long; at most {MAX_TARGET_LEN} are accepted")]
    TooLong(usize),
    #[error("tunnel target {0:?} is not an ip:port (a literal address, IPv6 in brackets)")]
    Malformed(String),
    #[error("tunnel target {0} has port 0")]
    PortZero(SocketAddr),
    #[error("tunnel target {0} is not a unicast address")]
    NotUnicast(SocketAddr),
}

pub fn parse_target(s: &str) -> Result<SocketAddr, TargetError> {
    if s.len() > MAX_TARGET_LEN {
        return Err(TargetError::TooLong(s.len()));
    }
    let addr: SocketAddr = s.parse().map_err(|_| TargetError::Malformed(s.into()))?;
    // `SocketAddr` parsing accepts IPv6 scope ids; a peer has no business
    // naming our interfaces.
    if let SocketAddr::V6(v6) = addr
        && (v6.scope_id() != 0 || v6.flowinfo() != 0)
    {
        return Err(TargetError::Malformed(s.into()));
    }
    if addr.port() == 0 {
        return Err(TargetError::PortZero(addr));
    }
    let ip = addr.ip();
    if ip.is_unspecified() || ip.is_multicast() || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
    {
        return Err(TargetError::NotUnicast(addr));
    }
    Ok(addr)
}

/// The fuzz harness, also run over seed inputs by the unit tests: never
/// panics, and an accepted target prints back to something that parses to the
/// same address.
pub fn fuzz_parse_target(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(addr) = parse_target(s) {
        assert_eq!(parse_target(&addr.to_string()), Ok(addr), "{s:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_literal_addresses() {
        assert_eq!(
            parse_target("10.0.0.5:8080"),
            Ok("10.0.0.5:8080".parse().unwrap())
        );
        assert_eq!(
            parse_target("[fd00::5]:443"),
            Ok("[fd00::5]:443".parse().unwrap())
        );
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "cart.shop:80",
            "10.0.0.5",
            "10.0.0.5:",
            "10.0.0.5:99999",
            "fd00::5:80",
            " 10.0.0.5:80",
            "[fe80::1%2]:80",
        ] {
            assert!(
                matches!(parse_target(bad), Err(TargetError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_target("10.0.0.5:0"),
            Err(TargetError::PortZero(_))
        ));
        assert!(matches!(
            parse_target("0.0.0.0:80"),
            Err(TargetError::NotUnicast(_))
        ));
        assert!(matches!(
            parse_target("224.0.0.1:80"),
            Err(TargetError::NotUnicast(_))
        ));
        assert!(matches!(
            parse_target(&"1".repeat(100)),
            Err(TargetError::TooLong(100))
        ));
    }

    #[test]
    fn fuzz_harness_over_seeds() {
        for seed in [
            &b"10.0.0.5:8080"[..],
            b"[::1]:1",
            b"\xff\xfe",
            b"[::ffff:1.2.3.4]:80",
            b"1.2.3.4:65535",
            b"",
        ] {
            fuzz_parse_target(seed);
        }
    }

    #[test]
    fn fuzz_harness_over_the_seed_corpus() {
        for seed in crate::fuzz_seeds("connect_target") {
            fuzz_parse_target(&seed);
        }
    }
}
