//! Starting the whole identity service (gRPC, admin, own SVID, issuer reload) in-process.
//! The `musubi-identity` binary, `musubi up`, tests and benchmarks all start it through here.

use super::admin;
use super::clients::{ClientGate, ClientLimits, MAX_TRACKED_CLIENTS};
use super::metrics::IdentityMetrics;
use super::negative_cache::NegativeCache;
use super::reload::{IssuerFiles, IssuerReloader};
use super::server::{self, ServeLimits};
use super::{IdentityService, IssuerHandle, LocalCaSource};
use crate::bundle::TrustBundle;
use crate::ca::{CaError, Issuer};
use crate::client::ALPN_H2;
use crate::renew::{RenewPolicy, Renewal};
use crate::spiffe_id::{IdError, SpiffeId};
use crate::store::CredentialStore;
use crate::tls::{self, ClientAuth};
use crate::token::TokenValidator;
use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;

/// The service account the identity service's own SVID is issued for.
pub const SERVICE_ACCOUNT: &str = "musubi-identity";

pub struct ServiceConfig {
    pub bundle: TrustBundle,
    /// Issuer certificate (chain) and key, PEM.
    pub issuer_pem: (Vec<u8>, Vec<u8>),
    /// Files to watch for issuer rotation; `None` for an issuer that lives only in memory.
    pub issuer_files: Option<IssuerFiles>,
    pub reload_every: Duration,
    pub validator: Arc<dyn TokenValidator>,
    pub svid_ttl: Duration,
    /// Namespace the service runs in (part of its own SPIFFE ID).
    pub namespace: String,
    pub grpc: TcpListener,
    pub admin: Option<TcpListener>,
    pub limits: ServeLimits,
    pub max_inflight: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("issuer: {0}")]
    Issuer(#[from] CaError),
    #[error("own identity: {0}")]
    Id(#[from] IdError),
    #[error("own certificate: {0}")]
    OwnCert(#[from] crate::renew::RenewError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsConfigError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// A running identity service; dropping it does not stop it, [`RunningService::shutdown`] does.
pub struct RunningService {
    pub grpc_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    pub id: SpiffeId,
    pub issuer: IssuerHandle,
    pub store: Arc<CredentialStore>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    background: Vec<JoinHandle<()>>,
}

impl RunningService {
    /// Stops accepting, lets in-flight calls finish, and waits for the server to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for bg in &self.background {
            bg.abort();
        }
        let _ = (&mut self.task).await;
    }

    /// Waits until the server ends on its own (it only does on a fatal error).
    pub async fn wait(&mut self) -> Result<(), String> {
        match (&mut self.task).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

pub async fn start(cfg: ServiceConfig) -> Result<RunningService, StartError> {
    let issuer = Issuer::from_pem(
        &cfg.issuer_pem.0,
        &cfg.issuer_pem.1,
        &cfg.bundle,
        SystemTime::now(),
    )?;
    let handle: IssuerHandle = Arc::new(ArcSwap::from_pointee(issuer));
    let trust_domain = cfg.bundle.trust_domain().clone();
    let id = SpiffeId::workload(&trust_domain, &cfg.namespace, SERVICE_ACCOUNT)?;

    let mut registry = Registry::default();
    let metrics = Arc::new(IdentityMetrics::new(&mut registry));
    let store = CredentialStore::new();
    crate::metrics::register_svid_expiry(
        &mut registry,
        "musubi_identity_serving_certificate_expiry_seconds",
        store.clone(),
    );
    {
        let h = handle.clone();
        crate::metrics::SecondsUntil::new(
            "musubi_identity_issuer_expiry_seconds",
            "Seconds until the issuer (intermediate) certificate expires",
            move || Some(h.load().not_after()),
        )
        .register(&mut registry);
        let bundle = cfg.bundle.clone();
        crate::metrics::SecondsUntil::new(
            "musubi_identity_trust_anchor_expiry_seconds",
            "Seconds until the earliest-expiring trust anchor expires",
            move || bundle.earliest_expiry(),
        )
        .register(&mut registry);
    }

    // Our own serving certificate, issued by ourselves and renewed like everyone else's.
    let renewal = Renewal {
        id: id.clone(),
        source: Arc::new(LocalCaSource {
            issuer: handle.clone(),
            id: id.clone(),
            ttl: cfg.svid_ttl,
        }),
        store: store.clone(),
        bundle: cfg.bundle.clone(),
        policy: RenewPolicy::default(),
    };
    let first = renewal.renew_once().await?;
    let mut background = Vec::new();
    let first_delay = crate::renew::renewal_delay(
        &renewal.policy,
        first.not_before,
        first.not_after,
        SystemTime::now(),
        fastrand::f64(),
    );
    background.push(tokio::spawn(async move {
        tokio::time::sleep(first_delay).await;
        renewal.run().await;
    }));

    if let Some(files) = cfg.issuer_files.clone() {
        let reloader = IssuerReloader::new(
            files,
            cfg.bundle.clone(),
            handle.clone(),
            metrics.clone(),
            cfg.issuer_pem.clone(),
        );
        let every = cfg.reload_every;
        background.push(tokio::spawn(reloader.run(every)));
    }

    let admin_addr = match cfg.admin {
        Some(listener) => {
            let addr = listener.local_addr()?;
            let ready_store = store.clone();
            let ready: admin::ReadyCheck = Arc::new(move || ready_store.info().is_some());
            background.push(tokio::spawn(admin::serve(
                listener,
                Arc::new(registry),
                ready,
            )));
            Some(addr)
        }
        None => None,
    };

    let tls = tls::server_config(store.clone(), &cfg.bundle, ClientAuth::None, &[ALPN_H2])?;
    let service = IdentityService {
        issuer: handle.clone(),
        validator: cfg.validator,
        trust_domain,
        ttl: cfg.svid_ttl,
        metrics,
        inflight: Arc::new(Semaphore::new(cfg.max_inflight)),
        clients: ClientGate::new(ClientLimits {
            per_client: cfg.limits.per_client,
            refusals_per_minute: cfg.limits.client_refusals_per_minute,
            max_clients: MAX_TRACKED_CLIENTS,
        }),
        refused_tokens: Mutex::new(NegativeCache::new(
            cfg.limits.negative_cache_ttl,
            cfg.limits.negative_cache_size,
        )),
    };
    let grpc_addr = cfg.grpc.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(
        cfg.grpc,
        tls,
        service,
        cfg.limits,
        async move {
            let _ = stop_rx.await;
        },
    ));
    tracing::info!(%grpc_addr, ?admin_addr, %id, "identity service started");
    Ok(RunningService {
        grpc_addr,
        admin_addr,
        id,
        issuer: handle,
        store,
        stop: Some(stop_tx),
        task,
        background,
    })
}
