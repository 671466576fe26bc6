//! Obtaining and renewing the workload's SVID.
//!
//! Every attempt generates a fresh P-256 key in memory, sends a CSR to a [`CertSource`]
//! (the identity service over gRPC, or the in-process CA for the identity service itself),
//! checks what comes back, and swaps it into the [`CredentialStore`]. Renewal happens at ~70 %
//! of the lifetime; failures back off exponentially with jitter, and the old certificate keeps
//! serving until it expires.

use crate::bundle::TrustBundle;
use crate::ca::IssuedLeaf;
use crate::cert;
use crate::csr::build_csr;
use crate::spiffe_id::SpiffeId;
use crate::store::{CredentialStore, SvidInfo};
use crate::token::BoxFuture;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer, UnixTime};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, thiserror::Error)]
pub enum RenewError {
    #[error("could not generate a key or CSR: {0}")]
    Local(String),
    #[error("certificate source refused: {0}")]
    Refused(String),
    #[error("certificate source unreachable: {0}")]
    Unavailable(String),
    #[error("issued certificate is unusable: {0}")]
    BadCertificate(String),
}

/// Something that turns a CSR into a certificate chain.
pub trait CertSource: Send + Sync + 'static {
    fn certify(&self, csr_der: Vec<u8>) -> BoxFuture<'_, Result<IssuedLeaf, RenewError>>;
}

/// When to renew and how to back off.
#[derive(Debug, Clone)]
pub struct RenewPolicy {
    /// Fraction of the lifetime after which to renew.
    pub renew_at: f64,
    /// Renewal time is spread by ± this fraction of the lifetime.
    pub jitter: f64,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for RenewPolicy {
    fn default() -> Self {
        RenewPolicy {
            renew_at: 0.7,
            jitter: 0.05,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// How long to wait before renewing a certificate valid from `not_before` to `not_after`.
/// `sample` is uniform in [0, 1) and places the renewal inside the jitter window.
pub fn renewal_delay(
    policy: &RenewPolicy,
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    sample: f64,
) -> Duration {
    let lifetime = not_after
        .duration_since(not_before)
        .unwrap_or_default()
        .as_secs_f64();
    let fraction = (policy.renew_at + policy.jitter * (2.0 * sample - 1.0)).clamp(0.05, 0.95);
    let at = not_before + Duration::from_secs_f64(lifetime * fraction);
    at.duration_since(now).unwrap_or_default()
}

/// Delay before retry number `attempt` (0-based): exponential, capped, with full jitter
/// between half and all of the step so that many proxies do not retry in lockstep.
pub fn backoff_delay(policy: &RenewPolicy, attempt: u32, sample: f64) -> Duration {
    let step = policy
        .backoff_min
        .saturating_mul(1u32 << attempt.min(20))
        .min(policy.backoff_max);
    step.mul_f64(0.5 + 0.5 * sample.clamp(0.0, 1.0))
}

/// Keeps one identity's SVID fresh in a store.
pub struct Renewal {
    pub id: SpiffeId,
    pub source: Arc<dyn CertSource>,
    pub store: Arc<CredentialStore>,
    pub bundle: TrustBundle,
    pub policy: RenewPolicy,
}

impl Renewal {
    /// One attempt: new key, CSR, certify, check, install.
    pub async fn renew_once(&self) -> Result<SvidInfo, RenewError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| RenewError::Local(e.to_string()))?;
        let csr = build_csr(&key, &self.id).map_err(|e| RenewError::Local(e.to_string()))?;
        let issued = self.source.certify(csr).await?;
        self.check(&issued, &key)?;
        let mut chain = vec![issued.leaf];
        chain.extend(issued.intermediates);
        let pkcs8 = PrivatePkcs8KeyDer::from(key.serialize_der());
        self.store
            .install(chain, pkcs8)
            .map_err(|e| RenewError::BadCertificate(e.to_string()))
    }

    /// Refuses a certificate for another identity, another key, or one peers would reject.
    fn check(&self, issued: &IssuedLeaf, key: &rcgen::KeyPair) -> Result<(), RenewError> {
        let bad = |m: String| RenewError::BadCertificate(m);
        let id = cert::spiffe_id(&issued.leaf).map_err(|e| bad(e.to_string()))?;
        if id != self.id {
            return Err(bad(format!("issued for {id}, requested {}", self.id)));
        }
        let parsed = cert::parse(&issued.leaf).map_err(|e| bad(e.to_string()))?;
        if parsed.tbs_certificate.subject_pki.raw
            != rcgen::PublicKeyData::subject_public_key_info(key).as_slice()
        {
            return Err(bad("issued for a different public key".into()));
        }
        let end_entity = CertificateDer::from(issued.leaf.as_ref());
        let parsed = rustls::server::ParsedCertificate::try_from(&end_entity)
            .map_err(|e| bad(e.to_string()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.bundle.root_store(),
            &issued.intermediates,
            UnixTime::now(),
            crate::crypto::provider()
                .signature_verification_algorithms
                .all,
        )
        .map_err(|e| bad(format!("does not chain to the trust bundle: {e}")))?;
        Ok(())
    }

    /// Renews forever: at ~70 % of each certificate's lifetime, retrying with backoff.
    pub async fn run(self) {
        let mut attempt = 0u32;
        loop {
            let delay = match self.renew_once().await {
                Ok(info) => {
                    attempt = 0;
                    tracing::info!(id = %info.id, not_after = %humantime::format_rfc3339_seconds(info.not_after), "installed new certificate");
                    renewal_delay(
                        &self.policy,
                        info.not_before,
                        info.not_after,
                        SystemTime::now(),
                        fastrand::f64(),
                    )
                }
                Err(e) => {
                    let delay = backoff_delay(&self.policy, attempt, fastrand::f64());
                    attempt = attempt.saturating_add(1);
                    if self.store.clear_if_expired(SystemTime::now()) {
                        tracing::error!(id = %self.id, "certificate expired before it could be renewed");
                    }
                    tracing::warn!(id = %self.id, error = %e, retry_in = ?delay, "certificate renewal failed");
                    delay
                }
            };
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn renewal_delay_table() {
        let p = RenewPolicy::default();
        // (not_before, not_after, now, sample) -> delay secs
        let cases = [
            ((0, 1000, 0, 0.5), 700),
            ((0, 1000, 0, 0.0), 650),
            ((0, 1000, 0, 1.0), 750),
            ((0, 1000, 500, 0.5), 200),
            ((0, 1000, 900, 0.5), 0),
            ((100, 100, 100, 0.5), 0),
            ((0, 86_400, 60, 0.5), 60_420),
        ];
        for ((nb, na, now, s), want) in cases {
            let got = renewal_delay(&p, t(nb), t(na), t(now), s);
            assert_eq!(got.as_secs(), want, "{nb} {na} {now} {s}");
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = RenewPolicy {
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            ..RenewPolicy::default()
        };
        let full: Vec<u64> = (0..8)
            .map(|a| backoff_delay(&p, a, 1.0).as_secs())
            .collect();
        assert_eq!(full, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(backoff_delay(&p, 3, 0.0), Duration::from_secs(4));
        assert_eq!(backoff_delay(&p, 100, 1.0), Duration::from_secs(30));
    }
}
