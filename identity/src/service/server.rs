//! Serving gRPC over TLS: accepting, handshaking off the accept loop, and handing finished
//! TLS streams to tonic.

use super::metrics::IdentityMetrics;
use super::{IdentityService, MAX_REQUEST_BYTES, REFUSAL_HEADER};
use musubi_proto::identity::v1::identity_server::IdentityServer;
use rustls::ServerConfig;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Limits applied per connection and per handshake.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    /// Concurrent Certify calls on one connection (HTTP/2 max concurrent streams).
    pub per_connection: u32,
    pub handshake_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            per_connection: 32,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Accepts TCP connections, completes TLS handshakes concurrently, and yields the streams.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    timeout: Duration,
    metrics: Arc<IdentityMetrics>,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
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
                        let _ = conn_tx.send(Ok(tls)).await;
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
