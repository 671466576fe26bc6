//! rustls configurations for mesh mTLS, with SPIFFE verification inside the handshake.
//!
//! * Server side: the client must present a certificate that chains to the trust bundle and
//!   carries a SPIFFE ID of the bundle's trust domain; the caller reads the verified ID with
//!   [`peer_identity`].
//! * Client side: the server's certificate must chain to the bundle and carry exactly the
//!   SPIFFE ID the caller expects (what discovery says the endpoint is).
//!
//! TLS 1.3 only. A failed check aborts the handshake with an error naming the reason.

use crate::bundle::TrustBundle;
use crate::cert::{self, CertError};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::store::{CredentialStore, StoreResolver};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;

/// Why a peer's otherwise valid certificate is not acceptable as a mesh identity.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeVerifyError {
    #[error("peer certificate is not an X509-SVID: {0}")]
    NotSvid(CertError),
    #[error("peer identity {got} is not in trust domain {expected}")]
    ForeignTrustDomain {
        got: SpiffeId,
        expected: TrustDomain,
    },
    #[error("peer identity is {got}, expected {expected}")]
    WrongIdentity { got: SpiffeId, expected: String },
}

// rustls prints verifier errors with `{:?}`; make that the readable message.
impl std::fmt::Debug for SpiffeVerifyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

fn other(e: SpiffeVerifyError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// Which server identities a client accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerIdentity {
    /// Exactly this SPIFFE ID.
    Exactly(SpiffeId),
    /// Any of these (e.g. the endpoints of a service that run under several accounts).
    AnyOf(Vec<SpiffeId>),
}

impl ServerIdentity {
    fn check(&self, got: &SpiffeId) -> Result<(), SpiffeVerifyError> {
        let ok = match self {
            ServerIdentity::Exactly(id) => id == got,
            ServerIdentity::AnyOf(ids) => ids.contains(got),
        };
        if ok {
            Ok(())
        } else {
            Err(SpiffeVerifyError::WrongIdentity {
                got: got.clone(),
                expected: match self {
                    ServerIdentity::Exactly(id) => id.to_string(),
                    ServerIdentity::AnyOf(ids) => ids
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" or "),
                },
            })
        }
    }
}

/// The SPIFFE ID of a leaf, required to be in `td`.
pub fn svid_identity(
    leaf: &CertificateDer<'_>,
    td: &TrustDomain,
) -> Result<SpiffeId, SpiffeVerifyError> {
    let id = cert::spiffe_id(leaf).map_err(SpiffeVerifyError::NotSvid)?;
    if !id.is_member_of(td) {
        return Err(SpiffeVerifyError::ForeignTrustDomain {
            got: id,
            expected: td.clone(),
        });
    }
    Ok(id)
}

/// The verified SPIFFE ID of the peer of a finished handshake (from
/// `conn.peer_certificates()`). `None` when the peer sent no certificate.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| cert::spiffe_id(leaf).ok())
}

#[derive(Debug)]
struct SpiffeClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    trust_domain: TrustDomain,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Peers carry one SVID each; hints would only enlarge the CertificateRequest.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        svid_identity(end_entity, &self.trust_domain).map_err(other)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: TrustDomain,
    expected: ServerIdentity,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // The server name is not an identity in the mesh: the SPIFFE ID is checked instead.
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let id = svid_identity(end_entity, &self.trust_domain).map_err(other)?;
        self.expected.check(&id).map_err(other)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // Configs built here only enable TLS 1.3.
        Err(Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot build the client-certificate verifier: {0}")]
    Verifier(String),
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] Error),
    #[error("cannot read the serving certificate or key: {0}")]
    Pem(String),
}

/// Whether a server asks for client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Mesh mTLS: a client SVID from the bundle's trust domain is mandatory.
    Required,
    /// No client certificate is requested (the identity service, where tokens authenticate).
    None,
}

fn provider() -> Arc<CryptoProvider> {
    crate::crypto::provider()
}

/// A TLS 1.3 server config presenting the store's current SVID.
pub fn server_config(
    store: Arc<CredentialStore>,
    bundle: &TrustBundle,
    client_auth: ClientAuth,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Required => {
            let webpki = WebPkiClientVerifier::builder_with_provider(bundle.root_store(), provider)
                .build()
                .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
                webpki,
                trust_domain: bundle.trust_domain().clone(),
            }))
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(StoreResolver(store)));
    // No resumption: every connection proves its identity with the certificate it holds now,
    // so a rotated or expired SVID is never carried forward by a session ticket.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A TLS 1.3 client config that accepts only a server with the `expected` identity, and
/// presents the store's current SVID when `store` is given.
pub fn client_config(
    store: Option<Arc<CredentialStore>>,
    bundle: &TrustBundle,
    expected: ServerIdentity,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: bundle.root_store(),
        trust_domain: bundle.trust_domain().clone(),
        expected,
        algs: provider.signature_verification_algorithms,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match store {
        Some(store) => builder.with_client_cert_resolver(Arc::new(StoreResolver(store))),
        None => builder.with_no_client_auth(),
    };
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A server config for an ordinary HTTPS endpoint the Kubernetes API server calls (the
/// admission webhook): a certificate chain and key from PEM, no client certificates, TLS 1.2
/// and 1.3 (what API servers speak).
pub fn webhook_server_config(
    chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let chain = crate::pem::certs(chain_pem).map_err(|e| TlsConfigError::Pem(e.to_string()))?;
    let key = crate::pem::private_key(key_pem).map_err(|e| TlsConfigError::Pem(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The server name sent in SNI by mesh clients. Identity is checked by SPIFFE ID, not by name.
#[allow(clippy::expect_used)] // a constant, covered by a unit test
pub fn mesh_server_name() -> ServerName<'static> {
    ServerName::try_from("musubi.mesh").expect("constant is a valid DNS name")
}

#[cfg(test)]
mod tests;
