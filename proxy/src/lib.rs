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
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod pool;
pub mod run;
pub mod transport;

/// Where a redirected connection was going (transparent mode).
pub(crate) fn orig_dst_addr(tcp: &tokio::net::TcpStream) -> Option<std::net::SocketAddr> {
    // Replaced by SO_ORIGINAL_DST (see `orig_dst`) once transparent capture lands.
    tcp.local_addr().ok()
}

/// The application port a redirected connection was for (transparent mode).
pub(crate) fn orig_dst_port(tcp: &tokio::net::TcpStream) -> Option<u16> {
    orig_dst_addr(tcp).map(|a| a.port())
}
