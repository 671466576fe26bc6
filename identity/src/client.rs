//! The workload side of issuance: a gRPC client for `musubi.identity.v1.Identity` over TLS that
//! checks the identity service's own SPIFFE ID, and a [`CertSource`] built on it.

use crate::bundle::TrustBundle;
use crate::ca::IssuedLeaf;
use crate::renew::{CertSource, RenewError};
use crate::spiffe_id::SpiffeId;
use crate::tls::{self, ServerIdentity};
use crate::token::BoxFuture;
use hyper_util::rt::TokioIo;
use musubi_proto::identity::v1::{CertifyRequest, identity_client::IdentityClient};
use rustls_pki_types::CertificateDer;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// ALPN for gRPC over TLS.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid identity service address {0:?}")]
    Address(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsConfigError),
}

/// Opens a lazily connected channel to the identity service at `addr` (`host:port`), verifying
/// that the server presents `server_id`.
pub fn connect(
    addr: &str,
    bundle: &TrustBundle,
    server_id: SpiffeId,
) -> Result<Channel, ClientError> {
    let config = tls::client_config(None, bundle, ServerIdentity::Exactly(server_id), &[ALPN_H2])?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let target = addr.to_string();
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ClientError::Address(addr.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    let connect = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let target = target.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(tls::mesh_server_name(), tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connect))
}

/// Where the workload's token comes from. Projected tokens rotate, so files are re-read
/// for every request.
#[derive(Clone)]
pub enum TokenSource {
    File(PathBuf),
    Fixed(String),
    Mint(Arc<dyn Fn() -> Result<String, String> + Send + Sync>),
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::File(p) => write!(f, "File({})", p.display()),
            TokenSource::Fixed(_) => f.write_str("Fixed(<redacted>)"),
            TokenSource::Mint(_) => f.write_str("Mint"),
        }
    }
}

impl TokenSource {
    pub async fn token(&self) -> Result<String, RenewError> {
        match self {
            TokenSource::File(path) => tokio::fs::read_to_string(path)
                .await
                .map(|t| t.trim().to_string())
                .map_err(|e| {
                    RenewError::Local(format!("reading token file {}: {e}", path.display()))
                }),
            TokenSource::Fixed(t) => Ok(t.clone()),
            TokenSource::Mint(f) => f().map_err(RenewError::Local),
        }
    }
}

/// Certificates from the identity service.
pub struct RemoteCertSource {
    client: IdentityClient<Channel>,
    token: TokenSource,
}

impl RemoteCertSource {
    pub fn new(channel: Channel, token: TokenSource) -> Self {
        RemoteCertSource {
            client: IdentityClient::new(channel),
            token,
        }
    }
}

impl CertSource for RemoteCertSource {
    fn certify(&self, csr_der: Vec<u8>) -> BoxFuture<'_, Result<IssuedLeaf, RenewError>> {
        Box::pin(async move {
            let token = self.token.token().await?;
            let mut client = self.client.clone();
            let resp = client
                .certify(CertifyRequest {
                    csr: csr_der,
                    token,
                })
                .await
                .map_err(|s| match s.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unknown => {
                        RenewError::Unavailable(format!("{:?}: {}", s.code(), s.message()))
                    }
                    code => RenewError::Refused(format!("{code:?}: {}", s.message())),
                })?
                .into_inner();
            let not_after = resp
                .valid_until
                .and_then(|t| {
                    u64::try_from(t.seconds)
                        .ok()
                        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
                })
                .ok_or_else(|| RenewError::BadCertificate("response has no valid_until".into()))?;
            Ok(IssuedLeaf {
                leaf: CertificateDer::from(resp.leaf),
                intermediates: resp
                    .intermediates
                    .into_iter()
                    .map(CertificateDer::from)
                    .collect(),
                not_after,
            })
        })
    }
}
