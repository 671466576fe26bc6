//! Starting the proxy: listeners, identity bootstrap (first certificate before traffic),
//! controller streams, and draining on shutdown.

use crate::admin::{self, Admin};
use crate::config::Config;
use crate::control::{self, Resolver};
use crate::ctx::{self, Ctx};
use crate::destination::Destination;
use crate::drain::Drain;
use crate::listen::Listener;
use crate::metrics::Metrics;
use crate::policy::InboundPolicy;
use crate::pool::{ALPN, ALPN_H2, Connector, H2Pool};
use musubi_identity::client::{self, RemoteCertSource, TokenSource};
use musubi_identity::renew::{CertSource, RenewPolicy, Renewal};
use musubi_identity::tls::{self, ClientAuth};
use musubi_identity::{CredentialStore, TrustBundle};
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{what} {addr}: cannot listen: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("trust anchors {path}: {reason}")]
    Anchors { path: String, reason: String },
    #[error("{0}")]
    Setup(String),
}

pub struct Running {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub store: Arc<CredentialStore>,
    pub drain: Drain,
    task: JoinHandle<()>,
}

impl Running {
    /// Starts draining (as SIGTERM does) and waits until the proxy has stopped.
    pub async fn shutdown(self) {
        self.drain.start();
        let _ = self.task.await;
    }

    /// Waits until the proxy has stopped (after `/shutdown` or [`Drain::start`]).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    crate::listen::bind(addr).map_err(|source| StartError::Bind { what, addr, source })
}

/// In transparent mode ip6tables redirects IPv6 connections to `[::1]:<outbound port>`: when
/// the outbound listener is IPv4 loopback, listen there too (hosts without IPv6 skip it).
fn outbound_v6(config: &Config, v4: SocketAddr) -> Option<TcpListener> {
    if config.mode != crate::config::CaptureMode::Transparent
        || v4 != config.outbound
        || !v4.ip().is_loopback()
        || !v4.is_ipv4()
    {
        return None;
    }
    let addr = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), v4.port());
    match crate::listen::bind(addr) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!(%addr, error = %e, "no IPv6 outbound listener");
            None
        }
    }
}

/// Overrides for embedding the proxy (tests, `musubi up`).
#[derive(Default)]
pub struct StartOptions {
    /// Where certificates come from; the identity service (token file) when `None`.
    pub cert_source: Option<Arc<dyn CertSource>>,
    /// A fixed discovery table used instead of the controller's streams.
    pub fixed_destinations: Option<HashMap<String, Arc<Destination>>>,
    /// A fixed inbound policy used instead of the controller's stream.
    pub fixed_policy: Option<InboundPolicy>,
}

/// Starts a proxy: binds its listeners, then obtains its certificate and serves.
pub async fn start(config: Config, opts: StartOptions) -> Result<Running, StartError> {
    let source = opts.cert_source;
    let anchors = config
        .trust_anchors
        .load()
        .map_err(|(path, reason)| StartError::Anchors { path, reason })?;
    let bundle = TrustBundle::from_pem(config.trust_domain.clone(), &anchors).map_err(|e| {
        StartError::Anchors {
            path: config.trust_anchors.describe(),
            reason: e.to_string(),
        }
    })?;
    let admin_l = bind("admin", config.admin)?;
    let inbound_l = bind("inbound", config.inbound)?;
    let outbound_l = bind("outbound", config.outbound)?;
    let addrs = |l: &TcpListener| l.local_addr().map_err(|e| StartError::Setup(e.to_string()));
    let (inbound, outbound, admin_addr) =
        (addrs(&inbound_l)?, addrs(&outbound_l)?, addrs(&admin_l)?);

    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let store = CredentialStore::new();
    musubi_identity::metrics::register_svid_expiry(
        &mut registry,
        "musubi_proxy_certificate_expiry_seconds",
        store.clone(),
    );
    let drain = Drain::default();
    let admin = Arc::new(Admin {
        registry,
        store: store.clone(),
        ctx: OnceLock::new(),
        drain: drain.clone(),
    });
    tokio::spawn(admin::serve(
        admin.clone(),
        Listener::new(admin_l, admin::MAX_CONNECTIONS, "admin"),
        metrics.clone(),
    ));

    let source = match source {
        Some(s) => s,
        None => {
            let channel = client::connect(
                &config.identity_addr,
                &bundle,
                config.identity_server.clone(),
            )
            .map_err(|e| StartError::Setup(e.to_string()))?;
            Arc::new(RemoteCertSource::new(
                channel,
                TokenSource::File(config.token_file.clone()),
            ))
        }
    };
    let renewal = Renewal {
        id: config.id.clone(),
        source,
        store: store.clone(),
        bundle: bundle.clone(),
        policy: RenewPolicy::default(),
    };
    let fixed = (opts.fixed_destinations, opts.fixed_policy);
    let task = tokio::spawn(run(
        config,
        bundle,
        store.clone(),
        renewal,
        metrics,
        admin,
        drain.clone(),
        (inbound_l, outbound_l),
        [inbound, outbound, admin_addr],
        fixed,
    ));
    Ok(Running {
        inbound,
        outbound,
        admin: admin_addr,
        store,
        drain,
        task,
    })
}

#[allow(clippy::too_many_arguments)]
async fn run(
    config: Config,
    bundle: TrustBundle,
    store: Arc<CredentialStore>,
    renewal: Renewal,
    metrics: Arc<Metrics>,
    admin: Arc<Admin>,
    drain: Drain,
    (inbound_l, outbound_l): (TcpListener, TcpListener),
    own: [SocketAddr; 3],
    (fixed, fixed_policy): (
        Option<HashMap<String, Arc<Destination>>>,
        Option<InboundPolicy>,
    ),
) {
    // Identity first: no traffic until we hold a certificate.
    let mut attempt = 0;
    let first = loop {
        tokio::select! {
            r = renewal.renew_once() => match r {
                Ok(info) => break info,
                Err(e) => {
                    let delay = musubi_identity::renew::backoff_delay(&renewal.policy, attempt, fastrand::f64());
                    attempt += 1;
                    tracing::warn!(error = %e, retry_in = ?delay, "waiting for the first certificate");
                    tokio::time::sleep(delay).await;
                }
            },
            _ = drain.signaled() => return,
        }
    };
    tracing::info!(id = %first.id, "obtained certificate");
    let delay = musubi_identity::renew::renewal_delay(
        &renewal.policy,
        first.not_before,
        first.not_after,
        std::time::SystemTime::now(),
        fastrand::f64(),
    );
    let renewer = tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        renewal.run().await;
    });

    let controller = config.controller.as_ref().and_then(|(addr, id)| {
        control::channel(addr, &bundle, store.clone(), id.clone())
            .map_err(|e| tracing::error!(error = %e, "controller channel"))
            .ok()
    });
    let namespace = config.id.namespace().unwrap_or_default();
    let limits = config.limits.clone();
    let resolver = match (&controller, fixed) {
        (_, Some(table)) => Resolver::Fixed(table),
        (Some(ch), None) => Resolver::controller(
            ch.clone(),
            namespace,
            limits.max_destinations,
            limits.destination_idle,
            metrics.clone(),
        ),
        (None, None) => Resolver::Fixed(Default::default()),
    };
    let policy = match fixed_policy {
        Some(p) => tokio::sync::watch::channel(Some(Arc::new(p))).1,
        None => control::watch_policy(controller, config.app_ports.clone(), metrics.clone()),
    };
    let tls = match tls::server_config(
        store.clone(),
        &bundle,
        ClientAuth::Required,
        &[ALPN, ALPN_H2],
    ) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the inbound TLS configuration");
            return;
        }
    };
    let connector = Arc::new(Connector::new(
        store.clone(),
        bundle.clone(),
        metrics.clone(),
    ));
    let drain_timeout = config.drain_timeout;
    let outbound_v6 = outbound_v6(&config, own[1]);
    let mut own_ports: Vec<u16> = own.iter().map(|a| a.port()).collect();
    own_ports.sort_unstable();
    own_ports.dedup();
    let ctx = Arc::new(Ctx {
        own: crate::own::OwnAddrs::discover(own_ports),
        config,
        bundle,
        store,
        resolver,
        policy,
        pool: H2Pool::new(connector.clone()),
        connector,
        metrics,
        drain: drain.clone(),
        http1: ctx::passthrough_client(),
        local: Default::default(),
        http2: Default::default(),
    });
    let _ = admin.ctx.set(ctx.clone());
    let inbound = tokio::spawn(crate::inbound::serve(
        ctx.clone(),
        Listener::new(inbound_l, limits.inbound_connections, "inbound"),
        tls,
    ));
    let outbound = tokio::spawn(crate::outbound::serve(
        ctx.clone(),
        Listener::new(outbound_l, limits.outbound_connections, "outbound"),
    ));
    let outbound6 = outbound_v6.map(|l| {
        tokio::spawn(crate::outbound::serve(
            ctx.clone(),
            Listener::new(l, limits.outbound_connections, "outbound"),
        ))
    });
    drain.signaled().await;
    tracing::info!(active = drain.active(), "draining");
    let _ = inbound.await;
    let _ = outbound.await;
    if let Some(o) = outbound6 {
        let _ = o.await;
    }
    if tokio::time::timeout(drain_timeout, drain.idle())
        .await
        .is_err()
    {
        tracing::warn!(
            active = drain.active(),
            "drain deadline passed with connections still open"
        );
    }
    renewer.abort();
    tracing::info!("stopped");
}

/// Used by tests and `musubi up`: a short wait helper.
pub async fn wait_ready(admin: SocketAddr, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if let Ok(mut tcp) = tokio::net::TcpStream::connect(admin).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = tcp
                .write_all(b"GET /ready HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                .await;
            let mut out = String::new();
            let _ = tcp.read_to_string(&mut out).await;
            if out.starts_with("HTTP/1.1 200") {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Runs a proxy until SIGTERM or SIGINT, then drains and returns: what the `musubi-proxy`
/// binary (and `musubi up`'s proxies) do.
pub async fn serve_until_signal(config: Config) -> Result<(), StartError> {
    let running = start(config, StartOptions::default()).await?;
    println!(
        "LISTENING inbound={} outbound={} admin={}",
        running.inbound, running.outbound, running.admin
    );
    let drain = running.drain.clone();
    tokio::spawn(async move {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        drain.start();
    });
    running.stopped().await;
    Ok(())
}
