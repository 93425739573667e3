//! Finding the host side of a pod's veth, where the STRICT guard attaches:
//! the interface of the most specific non-default route to the pod's IP, as
//! CNIs that route each pod (Calico, kindnet, ptp, Cilium with endpoint
//! routes) install it; not one whose route covers other pods of the node
//! too (Cilium's `cilium_host`, an overlay or gateway port), which is no
//! pod's own.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Finds the host interface of a pod.
pub trait InterfaceResolver: Send + Sync {
    /// The interface of pod `ip`; an error if it has none of its own: the
    /// route to it also covers `others` (the node's other pods), as a
    /// prefix routed to Cilium's `cilium_host` or a gateway port does.
    fn interface(&self, ip: IpAddr, others: &[IpAddr]) -> Result<String, String>;
}

/// Routes from `/proc/net/route` and `/proc/net/ipv6_route`.
#[derive(Clone, Debug, Default)]
pub struct RouteTable;

/// The interface of the longest non-default IPv4 route covering `ip`, from a
/// `/proc/net/route` text (addresses in host byte order hex).
pub fn v4_route(table: &str, ip: Ipv4Addr) -> Option<String> {
    v4_route_covering(table, ip, &[]).map(|(dev, _)| dev)
}

/// [`v4_route`], and whether the route covers any of `others`.
pub fn v4_route_covering(table: &str, ip: Ipv4Addr, others: &[IpAddr]) -> Option<(String, bool)> {
    let ip = u32::from_ne_bytes(ip.octets());
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dest = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            (mask != 0 && ip & mask == dest).then(|| (mask, f[0].to_string()))
        })
        .max_by_key(|(mask, _)| mask.count_ones())
        .map(|(mask, dev)| {
            let shared = others.iter().any(|o| match o {
                IpAddr::V4(o) => u32::from_ne_bytes(o.octets()) & mask == ip & mask,
                IpAddr::V6(_) => false,
            });
            (dev, shared)
        })
}

/// As [`v4_route`], from `/proc/net/ipv6_route` (destination, prefix length in hex).
pub fn v6_route(table: &str, ip: Ipv6Addr) -> Option<String> {
    v6_route_covering(table, ip, &[]).map(|(dev, _)| dev)
}

/// [`v6_route`], and whether the route covers any of `others`.
pub fn v6_route_covering(table: &str, ip: Ipv6Addr, others: &[IpAddr]) -> Option<(String, bool)> {
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
            (ip & mask == dest & mask).then(|| (len, mask, dev.to_string()))
        })
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, mask, dev)| {
            let shared = others.iter().any(|o| match o {
                IpAddr::V6(o) => u128::from(*o) & mask == ip & mask,
                IpAddr::V4(_) => false,
            });
            (dev, shared)
        })
}

impl InterfaceResolver for RouteTable {
    fn interface(&self, ip: IpAddr, others: &[IpAddr]) -> Result<String, String> {
        let (dev, shared) = match ip {
            IpAddr::V4(v4) => v4_route_covering(
                &std::fs::read_to_string("/proc/net/route").unwrap_or_default(),
                v4,
                others,
            ),
            IpAddr::V6(v6) => v6_route_covering(
                &std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default(),
                v6,
                others,
            ),
        }
        .ok_or_else(|| format!("no route to pod IP {ip} on this node"))?;
        if shared {
            return Err(format!(
                "pod IP {ip} is reached through {dev} by a route that covers other pods of this \
                 node too: no interface of its own to guard (the STRICT guard needs a routed \
                 veth per pod; with Cilium, enable endpoint routes), the proxy enforces STRICT"
            ));
        }
        if std::path::Path::new("/sys/class/net")
            .join(&dev)
            .join("bridge")
            .exists()
        {
            return Err(format!(
                "pod IP {ip} is behind bridge {dev}: the STRICT guard needs a routed veth per pod"
            ));
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
            v4_route(t, "10.244.1.7".parse().unwrap()).as_deref(),
            Some("cali1234")
        );
        assert_eq!(
            v4_route(t, "10.244.9.9".parse().unwrap()).as_deref(),
            Some("tunl0")
        );
        assert_eq!(
            v4_route(t, "192.0.2.1".parse().unwrap()),
            None,
            "the default route is not a pod route"
        );
        // A route for a prefix other pods of the node are in too: shared.
        let other: IpAddr = "10.244.3.3".parse().unwrap();
        assert_eq!(
            v4_route_covering(t, "10.244.9.9".parse().unwrap(), &[other]),
            Some(("tunl0".into(), true))
        );
        assert_eq!(
            v4_route_covering(t, "10.244.1.7".parse().unwrap(), &[other]),
            Some(("cali1234".into(), false))
        );
    }

    #[test]
    fn v6_routes() {
        let t = "fd000000000000000000000000000007 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001 lxc42\n\
                 00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n";
        assert_eq!(
            v6_route(t, "fd00::7".parse().unwrap()).as_deref(),
            Some("lxc42")
        );
        assert_eq!(v6_route(t, "fd00::8".parse().unwrap()), None);
        assert_eq!(
            v6_route_covering(t, "fd00::7".parse().unwrap(), &["fd00::8".parse().unwrap()]),
            Some(("lxc42".into(), false))
        );
    }
}
