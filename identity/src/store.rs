//! The credential store: the workload's current SVID and private key, swapped atomically.
//!
//! New handshakes read whatever is current; connections already established keep the
//! certificate they were made with. The private key lives only in memory.

use crate::cert;
use crate::spiffe_id::SpiffeId;
use arc_swap::ArcSwapOption;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::watch;

/// What is known about the SVID in use, without the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidInfo {
    pub id: SpiffeId,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// SHA-256 of the leaf.
    pub fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("leaf certificate: {0}")]
    Cert(#[from] cert::CertError),
    #[error("private key is not usable: {0}")]
    Key(String),
    #[error("private key does not match the leaf certificate")]
    KeyMismatch,
}

struct Current {
    key: Arc<CertifiedKey>,
    info: SvidInfo,
}

/// Holds the current credentials and tells watchers when they change.
pub struct CredentialStore {
    current: ArcSwapOption<Current>,
    changes: watch::Sender<Option<SvidInfo>>,
}

impl std::fmt::Debug for CredentialStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialStore")
            .field("svid", &self.info())
            .finish()
    }
}

impl Default for CredentialStore {
    fn default() -> Self {
        CredentialStore {
            current: ArcSwapOption::empty(),
            changes: watch::channel(None).0,
        }
    }
}

impl CredentialStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Installs a new chain (leaf first) and its PKCS#8 private key.
    pub fn install(
        &self,
        chain: Vec<CertificateDer<'static>>,
        pkcs8_key: PrivatePkcs8KeyDer<'static>,
    ) -> Result<SvidInfo, StoreError> {
        let leaf = chain.first().ok_or(StoreError::EmptyChain)?;
        let id = cert::spiffe_id(leaf)?;
        let validity = cert::validity(leaf)?;
        let info = SvidInfo {
            id,
            not_before: validity.not_before,
            not_after: validity.not_after,
            fingerprint: cert::fingerprint(leaf),
        };
        let signing_key = crate::crypto::provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(pkcs8_key))
            .map_err(|e| StoreError::Key(e.to_string()))?;
        let key = CertifiedKey::new(chain, signing_key);
        key.keys_match().map_err(|_| StoreError::KeyMismatch)?;
        self.current.store(Some(Arc::new(Current {
            key: Arc::new(key),
            info: info.clone(),
        })));
        self.changes.send_replace(Some(info.clone()));
        Ok(info)
    }

    /// Drops the credentials if they have expired at `now`; returns whether it did.
    pub fn clear_if_expired(&self, now: SystemTime) -> bool {
        let expired = self
            .current
            .load()
            .as_ref()
            .is_some_and(|c| c.info.not_after <= now);
        if expired {
            self.current.store(None);
            self.changes.send_replace(None);
        }
        expired
    }

    pub fn info(&self) -> Option<SvidInfo> {
        self.current.load().as_ref().map(|c| c.info.clone())
    }

    /// The current credentials for a handshake.
    pub fn certified_key(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load().as_ref().map(|c| c.key.clone())
    }

    /// A receiver that sees every install and expiry.
    pub fn subscribe(&self) -> watch::Receiver<Option<SvidInfo>> {
        self.changes.subscribe()
    }

    /// Waits until credentials are present.
    pub async fn ready(&self) -> SvidInfo {
        let mut rx = self.subscribe();
        loop {
            if let Some(info) = rx.borrow_and_update().clone() {
                return info;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`, so this cannot happen while we are borrowed.
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Resolves server and client certificates from a [`CredentialStore`].
#[derive(Debug, Clone)]
pub struct StoreResolver(pub Arc<CredentialStore>);

impl ResolvesServerCert for StoreResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.certified_key()
    }
}

impl ResolvesClientCert for StoreResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.certified_key()
    }

    fn has_certs(&self) -> bool {
        self.0.certified_key().is_some()
    }
}
