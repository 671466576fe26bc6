//! The trust bundle: the trust anchors (roots) of one trust domain.

use crate::pem::{self, PemError};
use crate::spiffe_id::TrustDomain;
use rustls_pki_types::CertificateDer;
use std::sync::Arc;
use std::time::SystemTime;

/// The roots that certificates of one trust domain chain to. Several roots may be present
/// while an anchor is being rotated.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    trust_domain: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
    store: Arc<rustls::RootCertStore>,
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("trust bundle has no certificates")]
    Empty,
    #[error("trust anchor #{index} is not usable as a root: {reason}")]
    BadRoot { index: usize, reason: String },
}

impl TrustBundle {
    pub fn new(
        trust_domain: TrustDomain,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, BundleError> {
        if roots.is_empty() {
            return Err(BundleError::Empty);
        }
        let mut store = rustls::RootCertStore::empty();
        for (index, root) in roots.iter().enumerate() {
            store.add(root.clone()).map_err(|e| BundleError::BadRoot {
                index,
                reason: e.to_string(),
            })?;
        }
        Ok(TrustBundle {
            trust_domain,
            roots,
            store: Arc::new(store),
        })
    }

    pub fn from_pem(trust_domain: TrustDomain, pem_bytes: &[u8]) -> Result<Self, BundleError> {
        Self::new(trust_domain, pem::certs(pem_bytes)?)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub(crate) fn root_store(&self) -> Arc<rustls::RootCertStore> {
        self.store.clone()
    }

    /// SHA-256 of each root, hex, for `/debug/identity` and logs.
    pub fn fingerprints(&self) -> Vec<String> {
        self.roots
            .iter()
            .map(|c| crate::cert::fingerprint(c))
            .collect()
    }

    /// The earliest NotAfter among the roots.
    pub fn earliest_expiry(&self) -> Option<SystemTime> {
        self.roots
            .iter()
            .filter_map(|c| crate::cert::validity(c).ok().map(|v| v.not_after))
            .min()
    }

    pub fn to_pem(&self) -> String {
        self.roots.iter().map(|c| pem::encode_cert(c)).collect()
    }
}
