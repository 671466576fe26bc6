//! Connections to other workloads' proxies: mTLS with the expected SPIFFE ID checked inside
//! the handshake, the transport header, and a pool of multiplexed HTTP/2 connections.

use crate::destination::{Endpoint, Transport};
use crate::http::Body;
use crate::metrics::{Metrics, OUTBOUND, ReasonLabels};
use crate::transport::{Header, Protocol};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use musubi_identity::tls::{self, ServerIdentity};
use musubi_identity::{CredentialStore, SpiffeId, TrustBundle};
use rustls::ClientConfig;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// ALPN that marks a connection as Musubi's mesh transport.
pub const ALPN: &[u8] = b"musubi.transport/1";
/// ALPN of plain HTTP/2 over mTLS, for peers that are not Musubi proxies.
pub const ALPN_H2: &[u8] = b"h2";
/// The server name mesh clients send in SNI (identity is checked by SPIFFE ID, not by name).
/// A non-Musubi mTLS peer sends it too, so that PERMISSIVE ports tell it from the
/// application's own TLS.
pub const MESH_SERVER_NAME: &str = "musubi.mesh";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("endpoint {0} has no mesh identity")]
    NotMeshed(SocketAddr),
    #[error("connecting to {addr}: {reason}")]
    Tcp { addr: SocketAddr, reason: String },
    #[error("mTLS handshake with {addr}: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("HTTP/2 with {addr}: {reason}")]
    H2 { addr: SocketAddr, reason: String },
    #[error("timed out connecting to {0}")]
    Timeout(SocketAddr),
}

impl ConnectError {
    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::NotMeshed(_) => "not_meshed",
            ConnectError::Tcp { .. } => "connect_failed",
            ConnectError::Tls { .. } => "tls_failed",
            ConnectError::H2 { .. } => "h2_failed",
            ConnectError::Timeout(_) => "connect_timeout",
        }
    }
}

/// Opens mTLS connections to peer proxies.
pub struct Connector {
    store: Arc<CredentialStore>,
    bundle: TrustBundle,
    configs: Mutex<HashMap<(SpiffeId, Transport), Arc<ClientConfig>>>,
    metrics: Arc<Metrics>,
}

fn tls_reason(e: &std::io::Error) -> &'static str {
    let text = e.to_string();
    if text.contains("expected spiffe://") {
        "wrong_identity"
    } else if text.contains("not in trust domain") {
        "foreign_trust_domain"
    } else if text.contains("xpired") {
        "expired"
    } else if text.contains("UnknownIssuer") || text.contains("BadSignature") {
        "unknown_ca"
    } else {
        "other"
    }
}

impl Connector {
    pub fn new(store: Arc<CredentialStore>, bundle: TrustBundle, metrics: Arc<Metrics>) -> Self {
        Connector {
            store,
            bundle,
            configs: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn config_for(&self, id: &SpiffeId, transport: Transport) -> Result<Arc<ClientConfig>, String> {
        let mut configs = self
            .configs
            .lock()
            .map_err(|_| "config cache poisoned".to_string())?;
        let key = (id.clone(), transport);
        if let Some(c) = configs.get(&key) {
            return Ok(c.clone());
        }
        let alpn: &[u8] = match transport {
            Transport::Musubi => ALPN,
            Transport::H2Mtls => ALPN_H2,
        };
        let c = tls::client_config(
            Some(self.store.clone()),
            &self.bundle,
            ServerIdentity::Exactly(id.clone()),
            &[alpn],
        )
        .map_err(|e| e.to_string())?;
        configs.insert(key, c.clone());
        Ok(c)
    }

    /// TCP + mTLS (checking the endpoint's identity) + transport header.
    pub async fn connect(
        &self,
        ep: &Endpoint,
        header: &Header,
    ) -> Result<TlsStream<TcpStream>, ConnectError> {
        let addr = ep.connect;
        let id = ep.identity.as_ref().ok_or(ConnectError::NotMeshed(addr))?;
        let config = self
            .config_for(id, ep.transport)
            .map_err(|reason| ConnectError::Tls { addr, reason })?;
        let fut = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| ConnectError::Tcp {
                    addr,
                    reason: e.to_string(),
                })?;
            let _ = tcp.set_nodelay(true);
            let mut tls = match tokio_rustls::TlsConnector::from(config)
                .connect(tls::mesh_server_name(), tcp)
                .await
            {
                Ok(tls) => tls,
                Err(e) => {
                    self.metrics
                        .tls_failures
                        .get_or_create(&ReasonLabels {
                            direction: OUTBOUND,
                            reason: tls_reason(&e),
                        })
                        .inc();
                    return Err(ConnectError::Tls {
                        addr,
                        reason: e.to_string(),
                    });
                }
            };
            self.metrics
                .tls_handshakes
                .get_or_create(&ReasonLabels {
                    direction: OUTBOUND,
                    reason: "ok",
                })
                .inc();
            if ep.transport == Transport::Musubi {
                tls.write_all(&header.encode())
                    .await
                    .map_err(|e| ConnectError::Tls {
                        addr,
                        reason: e.to_string(),
                    })?;
            }
            Ok(tls)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| ConnectError::Timeout(addr))?
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Key {
    addr: SocketAddr,
    /// The SPIFFE ID's text, shared (the key is built on every request).
    identity: Option<Arc<str>>,
    port: u16,
}

type Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Body>>>>;

/// Multiplexed HTTP/2 connections to peer proxies, one per (endpoint, application port).
pub struct H2Pool {
    connector: Arc<Connector>,
    slots: Mutex<HashMap<Key, Slot>>,
}

impl H2Pool {
    pub fn new(connector: Arc<Connector>) -> Self {
        H2Pool {
            connector,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// A ready sender to `ep`, reusing an open connection when there is one.
    pub async fn sender(
        &self,
        ep: &Endpoint,
        authority: &str,
    ) -> Result<http2::SendRequest<Body>, ConnectError> {
        let key = Key {
            addr: ep.connect,
            identity: ep.identity.as_ref().map(SpiffeId::shared),
            port: ep.app_port,
        };
        let slot = {
            let mut slots = self.slots.lock().map_err(|_| ConnectError::H2 {
                addr: ep.connect,
                reason: "pool poisoned".into(),
            })?;
            slots.entry(key).or_default().clone()
        };
        let mut guard = slot.lock().await;
        if let Some(sender) = guard.as_ref()
            && !sender.is_closed()
        {
            let mut sender = sender.clone();
            if sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        let header = Header {
            port: ep.app_port,
            protocol: Protocol::Http2,
            authority: Some(authority.to_string()),
        };
        let tls = self.connector.connect(ep, &header).await?;
        let addr = ep.connect;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake::<_, Body>(TokioIo::new(tls))
            .await
            .map_err(|e| ConnectError::H2 {
                addr,
                reason: e.to_string(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "connection to peer proxy ended");
            }
        });
        *guard = Some(sender.clone());
        Ok(sender)
    }
}
