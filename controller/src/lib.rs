//! Musubi's controller: turns a description of the mesh (a file now, Kubernetes objects later)
//! into the discovery and policy streams proxies watch. It never touches the data plane's
//! sockets; it only serves protobuf streams over mTLS.

mod conn;
pub mod file;
pub mod kubernetes;
pub mod limits;
pub mod model;
pub mod server;

pub use limits::{StreamLimits, StreamMetrics};

use model::MeshState;
use musubi_identity::tls::{self, ClientAuth};
use musubi_identity::{CredentialStore, SpiffeId, TrustBundle};
use musubi_proto::discovery::v1::discovery_server::DiscoveryServer;
use musubi_proto::policy::v1::policy_server::PolicyServer;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

/// Where the mesh state comes from (the file source here; Kubernetes later).
pub trait DiscoverySource: Send + Sync + 'static {
    fn state(&self) -> watch::Receiver<Arc<MeshState>>;
}

pub struct ControllerConfig {
    pub source: Arc<dyn DiscoverySource>,
    pub bundle: TrustBundle,
    /// The controller's own SVID (kept fresh by the caller).
    pub store: Arc<CredentialStore>,
    pub listener: TcpListener,
    /// Caps per client, and the streams' metrics (register them with
    /// [`StreamMetrics::register`]).
    pub streams: StreamOptions,
}

/// What bounds the streams, and where they are counted.
#[derive(Clone, Default)]
pub struct StreamOptions {
    pub limits: StreamLimits,
    pub metrics: StreamMetrics,
}

pub struct RunningController {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningController {
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// The controller's identity: `spiffe://<td>/ns/<ns>/sa/<sa>`.
pub fn identity(
    bundle: &TrustBundle,
    ns: &str,
    sa: &str,
) -> Result<SpiffeId, musubi_identity::IdError> {
    SpiffeId::workload(bundle.trust_domain(), ns, sa)
}

/// Serves the streams on `cfg.listener` (mTLS, client certificates required).
pub fn start(cfg: ControllerConfig) -> Result<RunningController, String> {
    let addr = cfg.listener.local_addr().map_err(|e| e.to_string())?;
    let tls = tls::server_config(cfg.store, &cfg.bundle, ClientAuth::Required, &[b"h2"])
        .map_err(|e| e.to_string())?;
    let (stopping_tx, stopping) = watch::channel(false);
    let per_connection = cfg.streams.limits.per_connection();
    let streams = server::Streams {
        state: cfg.source.state(),
        version: Arc::new(AtomicU64::new(0)),
        stopping,
        slots: limits::Slots::new(cfg.streams.limits, cfg.streams.metrics),
    };
    let (incoming_tx, incoming_rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = cfg.listener;
    let accept_loop = tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(a) => {
                    failures = 0;
                    a
                }
                Err(e) => {
                    // Out of file descriptors and the like: pause (5 ms doubling to 1 s)
                    // while connections close, instead of spinning on the error.
                    let pause = Duration::from_millis(5)
                        .saturating_mul(1 << failures.min(8))
                        .min(Duration::from_secs(1));
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = %e, ?pause, "controller accept failed");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = incoming_tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok::<_, std::io::Error>(conn::MeshConn(tls))).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "refused a controller client"),
                    Err(_) => tracing::info!(%peer, "controller client handshake timed out"),
                }
            });
        }
    });
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    // The server owns its source: a source that stops with its last owner (the Kubernetes
    // watches) lives as long as the streams it feeds.
    let source = cfg.source;
    let task = tokio::spawn(async move {
        let _source = source;
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .max_concurrent_streams(per_connection)
            .add_service(DiscoveryServer::new(streams.clone()))
            .add_service(PolicyServer::new(streams))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(incoming_rx),
                async move {
                    let _ = stop_rx.await;
                    stopping_tx.send_replace(true);
                },
            )
            .await;
        accept_loop.abort();
        if let Err(e) = result {
            tracing::error!(error = %e, "controller server stopped");
        }
    });
    Ok(RunningController {
        addr,
        stop: Some(stop_tx),
        task,
    })
}

/// Registers the file source's reload counter.
pub fn register_metrics(registry: &mut Registry, source: &file::FileSource) {
    registry.register(
        "musubi_controller_config_reloads",
        "Mesh file reloads, by result (ok, refused)",
        source.reloads.clone(),
    );
}
