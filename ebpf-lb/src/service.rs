//! The user-facing description of a service, and its translation to map types.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use ebpf_lb_common::{Endpoint, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, ServiceKey};

/// Transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// A service frontend: `VIP:port/protocol`, as a ClusterIP Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub vip: SocketAddr,
    pub protocol: Protocol,
}

impl Frontend {
    pub fn tcp(vip: SocketAddr) -> Self {
        Self {
            vip,
            protocol: Protocol::Tcp,
        }
    }

    pub fn udp(vip: SocketAddr) -> Self {
        Self {
            vip,
            protocol: Protocol::Udp,
        }
    }

    /// The `SERVICES` map key of this frontend.
    pub fn key(&self) -> ServiceKey {
        let ep = endpoint(self.vip);
        ServiceKey {
            addr: ep.addr,
            port: ep.port,
            proto: self.protocol.number(),
            family: ep.family,
        }
    }

    pub(crate) fn from_key(key: &ServiceKey) -> Option<Self> {
        let protocol = match key.proto {
            PROTO_TCP => Protocol::Tcp,
            PROTO_UDP => Protocol::Udp,
            _ => return None,
        };
        let vip = socket_addr(&Endpoint {
            addr: key.addr,
            port: key.port,
            family: key.family,
            _pad: 0,
        })?;
        Some(Self { vip, protocol })
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vip, self.protocol)
    }
}

/// Readiness of an endpoint, as an EndpointSlice's conditions report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendState {
    /// Ready: takes new connections.
    Ready,
    /// Not ready (failing its readiness probe): no new connections;
    /// existing TCP connections are left alone, connected UDP sockets are
    /// reset.
    NotReady,
    /// Terminating: no new connections; existing ones are left to finish.
    Terminating,
}

/// One endpoint of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Backend {
    pub addr: SocketAddr,
    pub state: BackendState,
}

impl Backend {
    pub fn ready(addr: SocketAddr) -> Self {
        Self {
            addr,
            state: BackendState::Ready,
        }
    }
}

/// Everything the load balancer needs to know about one service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub frontend: Frontend,
    pub backends: Vec<Backend>,
    /// Connections from enrolled workloads go to the node proxy instead.
    pub meshed: bool,
    /// `ClientIP` session affinity with this timeout (`None`: random per connection).
    pub affinity: Option<Duration>,
}

impl ServiceSpec {
    pub fn new(frontend: Frontend, backends: impl IntoIterator<Item = Backend>) -> Self {
        Self {
            frontend,
            backends: backends.into_iter().collect(),
            meshed: false,
            affinity: None,
        }
    }

    /// The ready backends, deduplicated, in order; checked against the frontend.
    pub(crate) fn ready_endpoints(&self) -> Result<Vec<Endpoint>, String> {
        let mut out: Vec<Endpoint> = Vec::with_capacity(self.backends.len());
        for b in &self.backends {
            // As the kernel will see them: an IPv4-mapped IPv6 address is IPv4.
            if b.addr.ip().to_canonical().is_ipv4()
                != self.frontend.vip.ip().to_canonical().is_ipv4()
            {
                return Err(format!(
                    "backend {} is not of the service's address family; a Service's endpoints \
                     must match its ClusterIP family",
                    b.addr
                ));
            }
            if b.addr.port() == 0 {
                return Err(format!("backend {} has port 0", b.addr));
            }
            if b.state != BackendState::Ready {
                continue;
            }
            let ep = endpoint(b.addr);
            if !out.contains(&ep) {
                out.push(ep);
            }
        }
        Ok(out)
    }

    /// Endpoints whose connections are left alone: every listed one for TCP
    /// (a pod failing its readiness probe for a moment keeps its
    /// established connections, as it does behind kube-proxy: readiness
    /// governs new connections only); ready or terminating for UDP, so that
    /// a connected UDP client (a resolver) pinned to a not-ready backend
    /// gets an error and moves on, as kube-proxy's conntrack flush does.
    pub(crate) fn alive_endpoints(&self) -> Vec<Endpoint> {
        let keep_not_ready = self.frontend.protocol == Protocol::Tcp;
        let mut out: Vec<Endpoint> = Vec::with_capacity(self.backends.len());
        for b in &self.backends {
            if keep_not_ready || b.state != BackendState::NotReady {
                let ep = endpoint(b.addr);
                if !out.contains(&ep) {
                    out.push(ep);
                }
            }
        }
        out
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        let vip = self.frontend.vip;
        if vip.port() == 0 {
            return Err("the service port is 0".into());
        }
        if vip.ip().is_unspecified() {
            return Err("the ClusterIP is unspecified (0.0.0.0 or ::)".into());
        }
        if let Some(t) = self.affinity
            && (t.as_secs() == 0 || t.as_secs() > u64::from(u32::MAX))
        {
            return Err(format!(
                "session affinity timeout {t:?} is out of range (1 s to {} s)",
                u32::MAX
            ));
        }
        Ok(())
    }
}

/// A socket address in the kernel's representation.
pub(crate) fn endpoint(addr: SocketAddr) -> Endpoint {
    let port = addr.port().to_be();
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => Endpoint {
            addr: [u32::from_ne_bytes(ip.octets()), 0, 0, 0],
            port,
            family: FAMILY_V4,
            _pad: 0,
        },
        IpAddr::V6(ip) => {
            let o = ip.octets();
            let mut addr = [0u32; 4];
            for (i, w) in addr.iter_mut().enumerate() {
                *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            }
            Endpoint {
                addr,
                port,
                family: FAMILY_V6,
                _pad: 0,
            }
        }
    }
}

/// The socket address an `Endpoint` stands for.
pub(crate) fn socket_addr(ep: &Endpoint) -> Option<SocketAddr> {
    let port = u16::from_be(ep.port);
    match ep.family {
        FAMILY_V4 => Some(SocketAddr::new(
            Ipv4Addr::from(ep.addr[0].to_ne_bytes()).into(),
            port,
        )),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (i, w) in ep.addr.iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(SocketAddr::new(Ipv6Addr::from(o).into(), port))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_round_trips_in_network_order() {
        let a: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        let ep = endpoint(a);
        // The kernel stores 10.1.2.3 as the bytes 0a 01 02 03 and the port big-endian.
        assert_eq!(ep.addr[0].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(ep.port.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(socket_addr(&ep), Some(a));

        let b: SocketAddr = "[fd00::1:2]:53".parse().unwrap();
        let ep = endpoint(b);
        assert_eq!(ep.family, FAMILY_V6);
        assert_eq!(ep.addr[3].to_ne_bytes(), [0, 1, 0, 2]);
        assert_eq!(socket_addr(&ep), Some(b));
    }

    #[test]
    fn v4_mapped_addresses_are_folded_to_v4() {
        let a: SocketAddr = "[::ffff:127.96.0.1]:80".parse().unwrap();
        assert_eq!(endpoint(a).family, FAMILY_V4);
        assert_eq!(endpoint(a), endpoint("127.96.0.1:80".parse().unwrap()));
    }

    /// `a` ready, `b` not ready, `c` terminating.
    fn one_of_each(a: SocketAddr, b: SocketAddr, c: SocketAddr) -> [Backend; 3] {
        let with = |addr, state| Backend { addr, state };
        [
            Backend::ready(a),
            with(b, BackendState::NotReady),
            with(c, BackendState::Terminating),
        ]
    }

    #[test]
    fn ready_endpoints_skip_not_ready_and_terminating_and_dedupe() {
        let fe = Frontend::tcp("127.96.0.1:80".parse().unwrap());
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let [ready, not_ready, terminating] = one_of_each(a, b, c);
        let spec = ServiceSpec::new(fe, [ready, not_ready, terminating, ready]);
        assert_eq!(spec.ready_endpoints().unwrap(), vec![endpoint(a)]);
    }

    #[test]
    fn a_not_ready_backend_keeps_tcp_connections_but_not_udp_ones() {
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:3".parse().unwrap();
        let backends = one_of_each(a, b, c);
        let vip: SocketAddr = "127.96.0.1:53".parse().unwrap();
        let tcp = ServiceSpec::new(Frontend::tcp(vip), backends);
        assert_eq!(
            tcp.alive_endpoints(),
            vec![endpoint(a), endpoint(b), endpoint(c)]
        );
        let udp = ServiceSpec::new(Frontend::udp(vip), backends);
        assert_eq!(udp.alive_endpoints(), vec![endpoint(a), endpoint(c)]);
    }

    #[test]
    fn mixed_families_are_refused_with_the_backend_named() {
        let fe = Frontend::tcp("127.96.0.1:80".parse().unwrap());
        let spec = ServiceSpec::new(fe, [Backend::ready("[::1]:80".parse().unwrap())]);
        let err = spec.ready_endpoints().unwrap_err();
        assert!(err.contains("[::1]:80"), "{err}");
    }

    #[test]
    fn frontend_key_round_trips() {
        for fe in [
            Frontend::tcp("127.96.0.1:80".parse().unwrap()),
            Frontend::udp("[fd00:96::a]:53".parse().unwrap()),
        ] {
            assert_eq!(Frontend::from_key(&fe.key()), Some(fe));
        }
    }
}
