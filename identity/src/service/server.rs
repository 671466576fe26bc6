//! Serving gRPC over TLS: accepting, handshaking off the accept loop, and handing finished
//! TLS streams to tonic.

use super::metrics::IdentityMetrics;
use super::{IdentityService, MAX_REQUEST_BYTES, REFUSAL_HEADER};
use musubi_proto::identity::v1::identity_server::IdentityServer;
use rustls::ServerConfig;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Limits applied per connection, per handshake, and per client.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// Concurrent Certify calls on one connection (HTTP/2 max concurrent streams).
    pub per_connection: u32,
    pub handshake_timeout: Duration,
    /// Certify calls one client IP may have in flight at once; more are refused at once
    /// (`client_limit`). 0 refuses every call.
    pub per_client: u32,
    /// Requests of one client IP that may be refused as invalid per minute (and at once)
    /// before its calls are refused without asking the validator (`client_refusal_rate`);
    /// 0 turns this off.
    pub client_refusals_per_minute: u32,
    /// How long a token the validator refused as invalid is refused without asking it again.
    pub negative_cache_ttl: Duration,
    /// Tokens remembered that way, at most; the oldest is forgotten first.
    pub negative_cache_size: usize,
}

pub const DEFAULT_PER_CONNECTION: u32 = 32;
pub const DEFAULT_PER_CLIENT: u32 = 4;
pub const DEFAULT_CLIENT_REFUSALS_PER_MINUTE: u32 = 60;
pub const DEFAULT_NEGATIVE_CACHE_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_NEGATIVE_CACHE_SIZE: usize = 10_000;

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            per_connection: DEFAULT_PER_CONNECTION,
            handshake_timeout: Duration::from_secs(10),
            per_client: DEFAULT_PER_CLIENT,
            client_refusals_per_minute: DEFAULT_CLIENT_REFUSALS_PER_MINUTE,
            negative_cache_ttl: DEFAULT_NEGATIVE_CACHE_TTL,
            negative_cache_size: DEFAULT_NEGATIVE_CACHE_SIZE,
        }
    }
}

/// A TLS connection that tells tonic its peer's address, for the per-client limits.
///
/// tonic's own `Connected` for TLS streams stores the address where `Request::remote_addr`
/// looks only when one of tonic's TLS features is on, which this crate does not use (rustls is
/// configured here); without this wrapper `remote_addr` is `None` and every client would share
/// one set of limits.
pub struct PeerTls {
    tls: TlsStream<TcpStream>,
    peer: SocketAddr,
}

impl Connected for PeerTls {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        TcpConnectInfo {
            local_addr: self.tls.get_ref().0.local_addr().ok(),
            remote_addr: Some(self.peer),
        }
    }
}

impl AsyncRead for PeerTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

/// Accepts TCP connections, completes TLS handshakes concurrently, and yields the streams.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    timeout: Duration,
    metrics: Arc<IdentityMetrics>,
) -> ReceiverStream<Result<PeerTls, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving after a pause.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let conn_tx = tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = conn_tx.send(Ok(PeerTls { tls, peer })).await;
                    }
                    Ok(Err(e)) => {
                        metrics.refused("tls_handshake_failed");
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics.refused("tls_handshake_timeout");
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Counts refusals that tonic produces before our handler runs (an oversized message, a
/// malformed frame); the handler counts its own and marks them with [`REFUSAL_HEADER`].
fn count_transport_refusals(
    metrics: Arc<IdentityMetrics>,
) -> impl Fn(http::Response<tonic::body::Body>) -> http::Response<tonic::body::Body> + Clone {
    move |resp| {
        let headers = resp.headers();
        if let Some(status) = headers.get("grpc-status")
            && status != "0"
            && !headers.contains_key(REFUSAL_HEADER)
        {
            let reason = match status.to_str().unwrap_or("") {
                "8" | "11" => "request_too_large",
                "12" => "unknown_method",
                _ => "protocol_error",
            };
            metrics.refused(reason);
        }
        resp
    }
}

/// Serves the Identity gRPC service on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    service: IdentityService,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let metrics = service.metrics.clone();
    let incoming = tls_incoming(listener, tls, limits.handshake_timeout, metrics.clone());
    let grpc = IdentityServer::new(service)
        .max_decoding_message_size(MAX_REQUEST_BYTES)
        .max_encoding_message_size(64 * 1024);
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.per_connection)
        .concurrency_limit_per_connection(limits.per_connection as usize)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .layer(tower::util::MapResponseLayer::new(
            count_transport_refusals(metrics),
        ))
        .add_service(grpc)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
