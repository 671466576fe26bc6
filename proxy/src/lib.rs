//! The Musubi proxy: a sidecar that gives its workload a SPIFFE identity, carries its traffic
//! to other workloads' proxies over mutual TLS, enforces inbound policy and exports golden
//! metrics. It does not issue certificates or parse them (that is `musubi-identity`), and it
//! does not decide routing or policy (that comes from the controller's streams).

pub mod detect;
pub mod init;
pub mod transport;
