//! The certificate authority: trust anchors and issuers, and signing workload X509-SVIDs.
//!
//! Hierarchy: trust anchor (root, long-lived, offline or in a Secret) → issuer (intermediate,
//! held by the identity service, rotatable) → leaf SVIDs (ECDSA P-256, short-lived).

use crate::bundle::TrustBundle;
use crate::cert::{self, to_system_time};
use crate::pem;
use crate::spiffe_id::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use std::time::{Duration, SystemTime};

/// Leaf lifetime when none is configured.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// How far NotBefore is set back, for peers whose clocks run a little behind.
pub const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0}")]
    Pem(#[from] pem::PemError),
    #[error("issuer private key: {0}")]
    Key(String),
    #[error("issuer certificate: {0}")]
    Cert(#[from] cert::CertError),
    #[error("issuer certificate is not a CA (basicConstraints cA is not set)")]
    NotCa,
    #[error("issuer private key does not match the issuer certificate's public key")]
    KeyMismatch,
    #[error("issuer certificate is not valid now (valid {not_before} to {not_after})")]
    NotValidNow {
        not_before: String,
        not_after: String,
    },
    #[error("issuer chain does not lead to a trust anchor in the bundle: {0}")]
    Untrusted(String),
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("the workload public key is not usable: {0}")]
    PublicKey(String),
}

/// PEM of a generated CA certificate and its key (for `musubi-identity init` and tests).
pub struct GeneratedCa {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // aws-lc's RNG failing is not recoverable in any sensible way; fall back to fastrand so a
    // serial is still unique in practice rather than aborting issuance.
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        for b in &mut bytes {
            *b = fastrand::u8(..);
        }
    }
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn ca_params(
    td: &TrustDomain,
    common_name: &str,
    not_before: SystemTime,
    ttl: Duration,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td.as_str());
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = (not_before - BACKDATE).into();
    params.not_after = (not_before + ttl).into();
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    params
}

fn new_p256_key() -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Key(e.to_string()))
}

/// A new self-signed trust anchor for `td`.
pub fn generate_root(
    td: &TrustDomain,
    ttl: Duration,
    now: SystemTime,
) -> Result<GeneratedCa, CaError> {
    let key = new_p256_key()?;
    let mut params = ca_params(td, &format!("{td} trust anchor"), now, ttl);
    params.use_authority_key_identifier_extension = false;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    Ok(GeneratedCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().clone(),
    })
}

/// A new issuer (intermediate) for `td`, signed by the root given as PEM.
pub fn generate_issuer(
    td: &TrustDomain,
    root_cert_pem: &str,
    root_key_pem: &str,
    ttl: Duration,
    now: SystemTime,
) -> Result<GeneratedCa, CaError> {
    let root_key = KeyPair::from_pem(root_key_pem).map_err(|e| CaError::Key(e.to_string()))?;
    let root = rcgen::Issuer::from_ca_cert_pem(root_cert_pem, root_key)
        .map_err(|e| CaError::Sign(format!("root certificate: {e}")))?;
    let root_der = pem::certs(root_cert_pem.as_bytes())?
        .into_iter()
        .next()
        .ok_or(pem::PemError::NoCertificates)?;
    let root_not_after = cert::validity(&root_der)?.not_after;
    let key = new_p256_key()?;
    let mut params = ca_params(td, &format!("{td} issuer"), now, ttl);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    if SystemTime::from(params.not_after) > root_not_after {
        params.not_after = root_not_after.into();
    }
    let cert = params
        .signed_by(&key, &root)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    Ok(GeneratedCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().clone(),
    })
}

/// A serving certificate for an ordinary HTTPS endpoint (the admission webhook) and the
/// self-signed CA that signed it (for the webhook configuration's `caBundle`).
pub struct ServingCert {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A fresh CA and a serving certificate for `dns_names` (ECDSA P-256).
pub fn generate_serving_cert(
    dns_names: &[String],
    ttl: Duration,
    now: SystemTime,
) -> Result<ServingCert, CaError> {
    let ca_key = new_p256_key()?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "musubi webhook CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = (now - BACKDATE).into();
    ca.not_after = (now + ttl).into();
    ca.serial_number = Some(random_serial());
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let key = new_p256_key()?;
    let mut leaf =
        CertificateParams::new(dns_names.to_vec()).map_err(|e| CaError::Sign(e.to_string()))?;
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = (now - BACKDATE).into();
    leaf.not_after = (now + ttl).into();
    leaf.serial_number = Some(random_serial());
    let cert = leaf
        .signed_by(&key, &issuer)
        .map_err(|e| CaError::Sign(e.to_string()))?;
    Ok(ServingCert {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// An issued leaf with the chain a peer needs to verify it.
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    pub leaf: CertificateDer<'static>,
    /// Intermediates, leaf-side first; never the trust anchor.
    pub intermediates: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
}

/// The intermediate CA that signs workload certificates.
pub struct Issuer {
    signer: rcgen::Issuer<'static, KeyPair>,
    /// The issuer certificate first, then any further intermediates towards the anchor.
    chain: Vec<CertificateDer<'static>>,
    not_after: SystemTime,
    trust_domain: TrustDomain,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Issuer")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .field("fingerprint", &cert::fingerprint(&self.chain[0]))
            .finish()
    }
}

impl Issuer {
    /// Loads an issuer and checks it is fit to sign for `bundle`'s trust domain at `now`: a CA,
    /// currently valid, its key matching, and its chain leading to one of the bundle's anchors.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        bundle: &TrustBundle,
        now: SystemTime,
    ) -> Result<Self, CaError> {
        let chain = pem::certs(cert_pem)?;
        let key_der = pem::private_key(key_pem)?;
        let key = KeyPair::try_from(&key_der).map_err(|e| CaError::Key(e.to_string()))?;

        let first = cert::parse(&chain[0])?;
        match first.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            _ => return Err(CaError::NotCa),
        }
        if first.tbs_certificate.subject_pki.raw
            != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        {
            return Err(CaError::KeyMismatch);
        }
        let not_before = to_system_time(first.validity().not_before);
        let not_after = to_system_time(first.validity().not_after);
        if now < not_before || now > not_after {
            return Err(CaError::NotValidNow {
                not_before: humantime::format_rfc3339_seconds(not_before).to_string(),
                not_after: humantime::format_rfc3339_seconds(not_after).to_string(),
            });
        }
        verify_chain_to_bundle(&chain, bundle)?;

        let signer = rcgen::Issuer::from_ca_cert_der(&chain[0], key)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        // Intermediates handed out with leaves exclude anything that is itself an anchor.
        let chain = chain
            .into_iter()
            .filter(|c| !bundle.roots().contains(c))
            .collect::<Vec<_>>();
        let chain = if chain.is_empty() {
            pem::certs(cert_pem)?.into_iter().take(1).collect()
        } else {
            chain
        };
        Ok(Issuer {
            signer,
            chain,
            not_after,
            trust_domain: bundle.trust_domain().clone(),
        })
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// Signs an X509-SVID for `id` over `spki_der` (a DER SubjectPublicKeyInfo).
    ///
    /// NotBefore is `now - BACKDATE`; NotAfter is `now + ttl`, clamped to the issuer's own expiry.
    pub fn sign(
        &self,
        spki_der: &[u8],
        id: &SpiffeId,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedLeaf, CaError> {
        let public_key = SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| CaError::PublicKey(e.to_string()))?;
        let uri = rcgen::string::Ia5String::try_from(id.uri())
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let not_after = (now + ttl).min(self.not_after);

        let mut params = CertificateParams::default();
        // Empty subject: the identity is the URI SAN, which rcgen then marks critical.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;

        let cert = params
            .signed_by(&public_key, &self.signer)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(IssuedLeaf {
            leaf: cert.der().clone(),
            intermediates: self.chain.clone(),
            not_after: cert::validity(cert.der())?.not_after,
        })
    }
}

/// Each certificate must be signed by the next; the last must be an anchor or signed by one.
fn verify_chain_to_bundle(
    chain: &[CertificateDer<'static>],
    bundle: &TrustBundle,
) -> Result<(), CaError> {
    for pair in chain.windows(2) {
        let child = cert::parse(&pair[0])?;
        let parent = cert::parse(&pair[1])?;
        child
            .verify_signature(Some(parent.public_key()))
            .map_err(|e| CaError::Untrusted(format!("chain link does not verify: {e}")))?;
    }
    let Some(last_der) = chain.last() else {
        return Err(CaError::Untrusted("empty chain".into()));
    };
    if bundle.roots().contains(last_der) {
        return Ok(());
    }
    let last = cert::parse(last_der)?;
    for root_der in bundle.roots() {
        let root = cert::parse(root_der)?;
        if last.issuer() == root.subject() && last.verify_signature(Some(root.public_key())).is_ok()
        {
            return Ok(());
        }
    }
    Err(CaError::Untrusted(format!(
        "no anchor among {} in the bundle signed {}",
        bundle.roots().len(),
        last.issuer()
    )))
}

#[cfg(test)]
mod tests;
