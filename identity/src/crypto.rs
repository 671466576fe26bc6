//! The process-wide rustls crypto provider (aws-lc-rs), installed once at start.
//!
//! With kube, rcgen and jsonwebtoken in the graph both ring and aws-lc-rs may be compiled in,
//! and rustls refuses to guess between them; every binary and test calls [`install_default`].

use rustls::crypto::CryptoProvider;
use std::sync::Arc;

/// Installs aws-lc-rs as the process default provider. Idempotent.
pub fn install_default() {
    // Err only means another provider is already installed; the one we build configs with
    // is always passed explicitly anyway (see `provider`).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The provider Musubi builds its TLS configurations with: aws-lc-rs, TLS 1.3 suites only.
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites
        .retain(|s| s.version() == &rustls::version::TLS13);
    Arc::new(p)
}
