//! Musubi identity: SPIFFE IDs, the certificate authority, the certificate issuance service,
//! and the rustls configurations that do SPIFFE verification for the proxy.
//!
//! This is the only crate in the workspace that knows X.509, `rustls`, `rcgen` or
//! `x509-parser`. It does not route, balance or proxy anything.

pub mod bundle;
pub mod ca;
pub mod cert;
pub mod client;
pub mod crypto;
pub mod csr;
pub mod logging;
pub mod metrics;
pub mod pem;
pub mod renew;
pub mod service;
pub mod spiffe_id;
pub mod store;
pub mod testing;
pub mod tls;
pub mod token;

pub use bundle::TrustBundle;
pub use spiffe_id::{IdError, SpiffeId, TrustDomain, Workload};
pub use store::CredentialStore;
