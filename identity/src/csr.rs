//! Checking a workload's certificate signing request against the identity its token proved.
//!
//! The CSR contributes exactly one thing to the certificate: its public key. Everything else
//! in it is either ignored (subject, other requested extensions) or must agree with the
//! token's identity (the SAN), so a CSR can never ask for more than the token allows.

use crate::spiffe_id::SpiffeId;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

/// Largest CSR accepted, in bytes. A P-256 CSR with one URI SAN is ~300 bytes.
pub const MAX_CSR_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is {0} bytes; at most {MAX_CSR_BYTES} are accepted")]
    TooLarge(usize),
    #[error("CSR is not a valid DER PKCS#10 request: {0}")]
    Malformed(String),
    #[error("CSR signature does not verify with its own public key")]
    BadSignature,
    #[error("CSR key must be ECDSA P-256; got {0}")]
    UnsupportedKey(String),
    #[error("CSR asks for {requested} but the token proves {proven}")]
    IdentityMismatch { requested: String, proven: String },
    #[error("CSR carries a SAN other than the workload's URI: {0}")]
    ExtraSan(String),
}

impl CsrError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CsrError::TooLarge(_) => "csr_too_large",
            CsrError::Malformed(_) => "csr_malformed",
            CsrError::BadSignature => "csr_bad_signature",
            CsrError::UnsupportedKey(_) => "csr_unsupported_key",
            CsrError::IdentityMismatch { .. } => "csr_identity_mismatch",
            CsrError::ExtraSan(_) => "csr_extra_san",
        }
    }
}

/// The part of an accepted CSR that goes into the certificate.
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    /// DER SubjectPublicKeyInfo of the workload's key.
    pub spki_der: Vec<u8>,
}

/// Accepts `der` when it is a well-formed, self-signed PKCS#10 request for a P-256 key whose
/// SANs are either absent or exactly the URI of `proven` (the identity from the token).
pub fn check_csr(der: &[u8], proven: &SpiffeId) -> Result<CheckedCsr, CsrError> {
    if der.len() > MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(der.len()));
    }
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed(format!(
            "{} trailing bytes after the request",
            rest.len()
        )));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
        return Err(CsrError::UnsupportedKey(format!(
            "key algorithm {}",
            spki.algorithm.algorithm
        )));
    }
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if curve.as_ref() != Some(&OID_EC_P256) {
        return Err(CsrError::UnsupportedKey(match curve {
            Some(oid) => format!("EC curve {oid}"),
            None => "EC key without a named curve".into(),
        }));
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let proven_uri = proven.uri();
    let mut uris = 0;
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) => {
                        uris += 1;
                        if *uri != proven_uri {
                            return Err(CsrError::IdentityMismatch {
                                requested: uri.to_string(),
                                proven: proven_uri,
                            });
                        }
                    }
                    other => return Err(CsrError::ExtraSan(describe(other))),
                }
            }
        }
    }
    if uris > 1 {
        return Err(CsrError::ExtraSan(format!(
            "{uris} URI SANs; one is allowed"
        )));
    }
    Ok(CheckedCsr {
        spki_der: spki.raw.to_vec(),
    })
}

fn describe(name: &GeneralName<'_>) -> String {
    match name {
        GeneralName::DNSName(d) => format!("DNS name {d:?}"),
        GeneralName::RFC822Name(m) => format!("e-mail {m:?}"),
        GeneralName::IPAddress(ip) => format!("IP address {ip:?}"),
        GeneralName::URI(u) => format!("URI {u:?}"),
        other => format!("{other:?}"),
    }
}

/// Builds a CSR for `id` over `key` (used by the renewal client and tests).
pub fn build_csr(key: &rcgen::KeyPair, id: &SpiffeId) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
        id.uri(),
    )?)];
    Ok(params.serialize_request(key)?.der().to_vec())
}

#[cfg(test)]
mod tests;
