//! The Musubi proxy: a sidecar that gives its workload a SPIFFE identity, carries its traffic
//! to other workloads' proxies over mutual TLS, enforces inbound policy and exports golden
//! metrics. It does not issue certificates or parse them (that is `musubi-identity`), and it
//! does not decide routing or policy (that comes from the controller's streams).

pub mod admin;
pub mod config;
pub mod control;
pub mod ctx;
pub mod destination;
pub mod detect;
pub mod drain;
pub mod http;
pub mod inbound;
pub mod init;
pub mod listen;
pub mod local;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod own;
pub mod policy;
pub mod pool;
pub mod route;
pub mod run;
pub mod transport;

/// Where a redirected connection was going (transparent mode): the original destination
/// from conntrack, or `None` when the connection reached the listener directly.
pub(crate) fn orig_dst_addr(tcp: &tokio::net::TcpStream) -> Option<std::net::SocketAddr> {
    orig_dst::original_dst(tcp)
}

/// The application port a connection to the inbound listener was for (transparent mode): the
/// original destination's port when iptables redirected it, else the port it was sent to (a
/// client that connected to the inbound listener directly).
pub(crate) fn orig_dst_port(tcp: &tokio::net::TcpStream) -> Option<u16> {
    orig_dst_addr(tcp)
        .or_else(|| tcp.local_addr().ok())
        .map(|a| a.port())
}
