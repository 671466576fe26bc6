//! Reading what matters out of X.509 certificates: validity, SPIFFE ID, fingerprints.

use crate::spiffe_id::SpiffeId;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("certificate does not parse: {0}")]
    Malformed(String),
    #[error("certificate has no URI SAN, so no SPIFFE ID")]
    NoSpiffeId,
    #[error("certificate has {0} URI SANs; an X509-SVID has exactly one")]
    ManyUris(usize),
    #[error("certificate URI SAN is not a SPIFFE ID: {0}")]
    BadSpiffeId(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

pub(crate) fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| CertError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::Malformed("trailing bytes".into()));
    }
    Ok(cert)
}

pub(crate) fn to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

pub fn validity(der: &[u8]) -> Result<Validity, CertError> {
    let cert = parse(der)?;
    Ok(Validity {
        not_before: to_system_time(cert.validity().not_before),
        not_after: to_system_time(cert.validity().not_after),
    })
}

/// The SPIFFE ID of an X509-SVID: its one and only URI SAN.
pub fn spiffe_id(der: &[u8]) -> Result<SpiffeId, CertError> {
    spiffe_id_of(&parse(der)?)
}

pub(crate) fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, CertError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| CertError::Malformed(e.to_string()))?
        .ok_or(CertError::NoSpiffeId)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(CertError::NoSpiffeId),
        [uri] => SpiffeId::parse(uri).map_err(|e| CertError::BadSpiffeId(e.to_string())),
        many => Err(CertError::ManyUris(many.len())),
    }
}

/// SHA-256 of the DER, lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Seconds from `now` until `t` (negative once `t` has passed).
pub fn seconds_until(t: SystemTime, now: SystemTime) -> f64 {
    match t.duration_since(now) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}
