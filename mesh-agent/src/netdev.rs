//! Finding the host side of a pod's veth, where the STRICT guard attaches:
//! the interface of the host route (/32, /128) to the pod's IP, as CNIs
//! that route each pod (Calico, kindnet, ptp, Cilium with endpoint routes)
//! install it; not one of a route for a whole prefix (Cilium's
//! `cilium_host`, an overlay or gateway port), which is no pod's own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Finds the host interface of a pod.
pub trait InterfaceResolver: Send + Sync {
    /// The interface of pod `ip`; an error if it has none of its own (the
    /// route to it is for a whole prefix, as one to Cilium's `cilium_host`
    /// or a gateway port is).
    fn interface(&self, ip: IpAddr) -> Result<String, NoInterface>;
}

/// Why a pod has no interface to guard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoInterface {
    /// The node's network reaches it through an interface that is not its
    /// own (a route for a whole prefix, a bridge): a limit of the network,
    /// not a failure; plaintext to the pod is then not refused.
    NotItsOwn(String),
    /// No route to it (yet: the pod is starting).
    NoRoute(String),
}

impl std::fmt::Display for NoInterface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoInterface::NotItsOwn(why) | NoInterface::NoRoute(why) => f.write_str(why),
        }
    }
}

/// Routes from `/proc/net/route` and `/proc/net/ipv6_route`.
#[derive(Clone, Debug, Default)]
pub struct RouteTable;

/// The interface of the longest non-default IPv4 route covering `ip`, from a
/// `/proc/net/route` text (addresses in host byte order hex), and whether
/// it is a host route (/32).
pub fn v4_route(table: &str, ip: Ipv4Addr) -> Option<(String, bool)> {
    let ip = u32::from_ne_bytes(ip.octets());
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            (mask != 0 && ip & mask == dest).then(|| (mask.count_ones(), f[0].to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(len, dev)| (dev, len == 32))
}

/// As [`v4_route`], from `/proc/net/ipv6_route` (destination, prefix length
/// in hex); a host route is a /128.
pub fn v6_route(table: &str, ip: Ipv6Addr) -> Option<(String, bool)> {
    let ip = u128::from(ip);
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u128::from_str_radix(f.first()?, 16).ok()?;
            let len = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let dev = f.get(9)?;
            if len == 0 || *dev == "lo" {
                return None;
            }
            let mask = if len >= 128 {
                u128::MAX
            } else {
                !(u128::MAX >> len)
            };
            (ip & mask == dest & mask).then(|| (len, dev.to_string()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(len, dev)| (dev, len >= 128))
}

impl InterfaceResolver for RouteTable {
    fn interface(&self, ip: IpAddr) -> Result<String, NoInterface> {
        let (dev, host) = match ip {
            IpAddr::V4(v4) => v4_route(
                &std::fs::read_to_string("/proc/net/route").unwrap_or_default(),
                v4,
            ),
            IpAddr::V6(v6) => v6_route(
                &std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default(),
                v6,
            ),
        }
        .ok_or_else(|| NoInterface::NoRoute(format!("no route to pod IP {ip} on this node")))?;
        if !host {
            return Err(NoInterface::NotItsOwn(format!(
                "pod IP {ip} is reached through {dev} by a route for a whole prefix, not a host \
                 route of its own: no interface of its own to guard (the STRICT guard needs a \
                 routed veth per pod; with Cilium, enable endpoint routes), the proxy enforces \
                 STRICT"
            )));
        }
        if std::path::Path::new("/sys/class/net")
            .join(&dev)
            .join("bridge")
            .exists()
        {
            return Err(NoInterface::NotItsOwn(format!(
                "pod IP {ip} is behind bridge {dev}: the STRICT guard needs a routed veth per pod"
            )));
        }
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_specific_v4_route_wins() {
        // 10.244.1.7/32 via cali1234, 10.244.0.0/16 via tunl0, default via eth0.
        let t = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
                 eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                 tunl0\t0000F40A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n\
                 cali1234\t0701F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        assert_eq!(
            v4_route(t, "10.244.1.7".parse().unwrap()),
            Some(("cali1234".into(), true))
        );
        // A route for a whole prefix (an overlay, Cilium's cilium_host): no
        // interface of the pod's own.
        assert_eq!(
            v4_route(t, "10.244.9.9".parse().unwrap()),
            Some(("tunl0".into(), false))
        );
        assert_eq!(
            v4_route(t, "192.0.2.1".parse().unwrap()),
            None,
            "the default route is not a pod route"
        );
    }

    #[test]
    fn v6_routes() {
        let t = "fd000000000000000000000000000007 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 lxc42\n\
                 fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 cilium_host\n\
                 00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n";
        assert_eq!(
            v6_route(t, "fd00::7".parse().unwrap()),
            Some(("lxc42".into(), true))
        );
        assert_eq!(
            v6_route(t, "fd00::8".parse().unwrap()),
            Some(("cilium_host".into(), false))
        );
        assert_eq!(v6_route(t, "2001:db8::1".parse().unwrap()), None);
    }
}
