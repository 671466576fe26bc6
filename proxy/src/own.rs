//! The proxy's own listeners, and whether an address would reach one of them: a request that
//! the proxy would forward to itself (`http://127.0.0.1:4140/` through the outbound listener,
//! plaintext to `pod:4143`) recurses until the process runs out of memory, so every path
//! refuses such a target before it connects.

use std::net::{IpAddr, SocketAddr};

/// Where this proxy listens.
#[derive(Debug, Clone, Default)]
pub struct OwnAddrs {
    /// Ports of the inbound, outbound and admin listeners.
    pub ports: Vec<u16>,
    /// Addresses of this host's (pod's) interfaces, besides loopback.
    pub local_ips: Vec<IpAddr>,
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

impl OwnAddrs {
    /// Reads the interface addresses of this network namespace.
    pub fn discover(ports: Vec<u16>) -> OwnAddrs {
        let local_ips = match nix::ifaddrs::getifaddrs() {
            Ok(addrs) => addrs
                .filter_map(|a| a.address)
                .filter_map(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| IpAddr::V4(v4.ip()))
                        .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list interface addresses; loop detection covers loopback only");
                Vec::new()
            }
        };
        OwnAddrs { ports, local_ips }
    }

    /// Whether `ip` is this host: loopback, the unspecified address (which connects to this
    /// host) or one of its interface addresses.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_loopback()
            || ip.is_unspecified()
            || self.local_ips.iter().any(|l| canonical(*l) == ip)
    }

    /// Whether connecting to `addr` would reach one of this proxy's own listeners.
    pub fn is_loop(&self, addr: SocketAddr) -> bool {
        self.ports.contains(&addr.port()) && self.is_local(addr.ip())
    }

    /// Whether `port` is one of this proxy's own listener ports.
    pub fn is_own_port(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }
}

/// Resolves `host:port` (a name, an IPv4 or a bracketed IPv6 address) and refuses it when any
/// of its addresses is one of this proxy's listeners. Returns the address to connect to, so
/// that what was checked is what gets dialled.
pub async fn vet(own: &OwnAddrs, authority: &str) -> Result<SocketAddr, VetError> {
    let addrs: Vec<SocketAddr> = match authority.parse::<SocketAddr>() {
        Ok(a) => vec![a],
        Err(_) => tokio::net::lookup_host(authority)
            .await
            .map_err(|e| VetError::Resolve(authority.to_string(), e.to_string()))?
            .collect(),
    };
    if addrs.iter().any(|a| own.is_loop(*a)) {
        return Err(VetError::Loop(authority.to_string()));
    }
    addrs
        .first()
        .copied()
        .ok_or_else(|| VetError::Resolve(authority.to_string(), "no addresses".into()))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VetError {
    #[error("{0} is this proxy's own listener (a request loop); refused")]
    Loop(String),
    #[error("{0}: cannot resolve: {1}")]
    Resolve(String, String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> OwnAddrs {
        OwnAddrs {
            ports: vec![4140, 4143, 4191],
            local_ips: vec!["10.1.2.3".parse().unwrap(), "fd00::7".parse().unwrap()],
        }
    }

    #[test]
    fn loop_table() {
        let cases = [
            ("127.0.0.1:4140", true),
            ("127.9.9.9:4143", true),
            ("0.0.0.0:4191", true),
            ("[::1]:4140", true),
            ("[::]:4143", true),
            ("[::ffff:127.0.0.1]:4140", true),
            ("10.1.2.3:4143", true),
            ("[::ffff:10.1.2.3]:4143", true),
            ("[fd00::7]:4140", true),
            ("10.1.2.4:4143", false),
            ("127.0.0.1:8080", false),
            ("10.1.2.3:80", false),
        ];
        for (addr, want) in cases {
            assert_eq!(own().is_loop(addr.parse().unwrap()), want, "{addr}");
        }
    }

    #[tokio::test]
    async fn names_are_resolved_before_the_check() {
        let own = own();
        assert!(matches!(
            vet(&own, "localhost:4140").await,
            Err(VetError::Loop(_))
        ));
        assert!(matches!(
            vet(&own, "[::1]:4191").await,
            Err(VetError::Loop(_))
        ));
        assert_eq!(
            vet(&own, "127.0.0.1:8080").await,
            Ok("127.0.0.1:8080".parse().unwrap())
        );
        assert!(matches!(
            vet(&own, "no-such-host.invalid:80").await,
            Err(VetError::Resolve(..))
        ));
    }

    #[test]
    fn discover_finds_this_hosts_addresses() {
        let own = OwnAddrs::discover(vec![1]);
        assert!(
            own.local_ips.iter().any(|ip| ip.is_loopback()),
            "{:?}",
            own.local_ips
        );
    }
}
