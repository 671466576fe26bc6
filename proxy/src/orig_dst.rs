//! The destination a connection had before iptables redirected it to the proxy (transparent
//! mode): `SO_ORIGINAL_DST` for IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6, read from conntrack's
//! NAT entry through nix's safe socket-option API.

use nix::sys::socket::{SockaddrIn, SockaddrIn6, getsockopt, sockopt};
use std::net::SocketAddr;
use tokio::net::TcpStream;

/// The redirected destination of `tcp`, or `None` when the connection was not redirected
/// (no NAT entry: someone connected to the listener directly) or the kernel cannot say.
pub fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    // A v4 connection accepted on a dual-stack v6 socket still has its NAT entry in the v4
    // table, so ask by the connection's real family.
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let found: SocketAddr = if v4 {
        SockaddrIn::from(getsockopt(tcp, sockopt::OriginalDst).ok()?).into()
    } else {
        SockaddrIn6::from(getsockopt(tcp, sockopt::Ip6tOriginalDst).ok()?).into()
    };
    // Without a NAT entry the kernel answers ENOENT; some kernels answer the local address.
    // Either way the connection was not redirected.
    if found.port() == 0 || same(found, local) {
        return None;
    }
    Some(found)
}

fn same(a: SocketAddr, b: SocketAddr) -> bool {
    let canon = |s: SocketAddr| match s {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => s,
        },
        v4 => v4,
    };
    canon(a) == canon(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(original_dst(&server), None);
    }

    #[test]
    fn same_ignores_v4_mapping() {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert!(same(a, b));
        assert!(!same(a, "10.0.0.1:81".parse().unwrap()));
    }
}
