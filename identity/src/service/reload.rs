//! Re-reading the issuer certificate and key when their files change (cert-manager or a
//! Vault-fed Secret rotating them), without a restart. A bad new pair is refused loudly and
//! the old issuer keeps signing.

use super::IssuerHandle;
use super::metrics::{IdentityMetrics, ResultLabel};
use crate::bundle::TrustBundle;
use crate::ca::Issuer;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone)]
pub struct IssuerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a poll found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    Unchanged,
    Reloaded,
    Refused(String),
}

/// Watches the issuer files by content (Kubernetes swaps Secret volumes through symlinks, so
/// modification times are not reliable).
pub struct IssuerReloader {
    files: IssuerFiles,
    bundle: TrustBundle,
    handle: IssuerHandle,
    metrics: Arc<IdentityMetrics>,
    last_seen: Option<(Vec<u8>, Vec<u8>)>,
}

impl IssuerReloader {
    /// `initial` is the content the current issuer was loaded from.
    pub fn new(
        files: IssuerFiles,
        bundle: TrustBundle,
        handle: IssuerHandle,
        metrics: Arc<IdentityMetrics>,
        initial: (Vec<u8>, Vec<u8>),
    ) -> Self {
        IssuerReloader {
            files,
            bundle,
            handle,
            metrics,
            last_seen: Some(initial),
        }
    }

    /// Reads the files once and swaps the issuer if they changed and are good.
    pub async fn poll(&mut self) -> ReloadOutcome {
        let read = async {
            let cert = tokio::fs::read(&self.files.cert).await?;
            let key = tokio::fs::read(&self.files.key).await?;
            Ok::<_, std::io::Error>((cert, key))
        };
        let (cert, key) = match read.await {
            Ok(pair) => pair,
            // Mid-rotation a file can be briefly missing; the next poll sees the new state.
            Err(e) => return ReloadOutcome::Refused(format!("cannot read issuer files: {e}")),
        };
        if self.last_seen.as_ref() == Some(&(cert.clone(), key.clone())) {
            return ReloadOutcome::Unchanged;
        }
        let outcome = match Issuer::from_pem(&cert, &key, &self.bundle, SystemTime::now()) {
            Ok(issuer) => {
                tracing::info!(issuer = ?issuer, "issuer rotated from {}", self.files.cert.display());
                self.handle.store(Arc::new(issuer));
                self.metrics
                    .issuer_reloads
                    .get_or_create(&ResultLabel { result: "ok" })
                    .inc();
                ReloadOutcome::Reloaded
            }
            Err(e) => {
                tracing::error!(
                    cert = %self.files.cert.display(),
                    key = %self.files.key.display(),
                    error = %e,
                    "REFUSED new issuer certificate/key; still signing with the previous issuer"
                );
                self.metrics
                    .issuer_reloads
                    .get_or_create(&ResultLabel { result: "refused" })
                    .inc();
                ReloadOutcome::Refused(e.to_string())
            }
        };
        self.last_seen = Some((cert, key));
        outcome
    }

    /// Polls every `every` forever.
    pub async fn run(mut self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.poll().await;
        }
    }
}
