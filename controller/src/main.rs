//! `musubi-controller`: serves discovery and policy to the proxies from a mesh file.

use anyhow::{Context, Result};
use clap::Parser;
use musubi_controller::file::FileSource;
use musubi_controller::{ControllerConfig, identity, register_metrics, start};
use musubi_identity::client::{self, RemoteCertSource, TokenSource};
use musubi_identity::renew::{RenewPolicy, Renewal};
use musubi_identity::{CredentialStore, SpiffeId, TrustBundle, TrustDomain};
use prometheus_client::registry::Registry;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const EXIT_CONFIG: i32 = 64;

#[derive(Parser)]
#[command(
    name = "musubi-controller",
    version,
    about = "Musubi controller: discovery and policy streams for the proxies"
)]
struct Args {
    /// Mesh file (YAML, see docs/mesh-file.md); re-read when it changes.
    #[arg(long, env = "MUSUBI_CONTROLLER_CONFIG")]
    config: PathBuf,
    /// How often to check the mesh file for changes.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    reload_interval: Duration,
    /// gRPC (mTLS) listen address.
    #[arg(long, env = "MUSUBI_CONTROLLER_LISTEN", default_value = "0.0.0.0:8090")]
    listen: String,
    /// Admin (plain HTTP: /metrics, /ready, /live) listen address.
    #[arg(
        long,
        env = "MUSUBI_CONTROLLER_ADMIN_LISTEN",
        default_value = "0.0.0.0:9991"
    )]
    admin_listen: String,
    #[arg(long, env = "MUSUBI_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Trust anchor bundle (PEM).
    #[arg(long, env = "MUSUBI_TRUST_ANCHORS")]
    trust_anchors: PathBuf,
    /// Identity service host:port.
    #[arg(long, env = "MUSUBI_IDENTITY_ADDR")]
    identity_addr: String,
    /// Namespace of the identity service (its SPIFFE ID is checked).
    #[arg(long, default_value = "musubi-system")]
    identity_namespace: String,
    /// Service-account token file (audience identity.musubi.io).
    #[arg(long, env = "MUSUBI_TOKEN_FILE")]
    token_file: PathBuf,
    /// The controller's own namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "musubi-system")]
    namespace: String,
    /// The controller's own service account.
    #[arg(long, default_value = "musubi-controller")]
    service_account: String,
}

fn main() {
    musubi_identity::crypto::install_default();
    musubi_identity::logging::init("info");
    let args = Args::parse();
    let rt = musubi_identity::logging::runtime_or_exit("musubi-controller");
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("musubi-controller: {e:#}");
        std::process::exit(EXIT_CONFIG);
    }
}

async fn run(a: Args) -> Result<()> {
    let source = FileSource::load(&a.config)?;
    let td = TrustDomain::new(&a.trust_domain).context("--trust-domain")?;
    let anchors = std::fs::read(&a.trust_anchors)
        .with_context(|| format!("--trust-anchors {}", a.trust_anchors.display()))?;
    let bundle = TrustBundle::from_pem(td.clone(), &anchors).context("--trust-anchors")?;
    let id = identity(&bundle, &a.namespace, &a.service_account)
        .context("--namespace/--service-account")?;
    let identity_id = SpiffeId::workload(&td, &a.identity_namespace, "musubi-identity")
        .context("--identity-namespace")?;
    let store = CredentialStore::new();
    let renewal = Renewal {
        id,
        source: Arc::new(RemoteCertSource::new(
            client::connect(&a.identity_addr, &bundle, identity_id)?,
            TokenSource::File(a.token_file.clone()),
        )),
        store: store.clone(),
        bundle: bundle.clone(),
        policy: RenewPolicy::default(),
    };
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .with_context(|| format!("--listen {}", a.listen))?;
    let admin = tokio::net::TcpListener::bind(&a.admin_listen)
        .await
        .with_context(|| format!("--admin-listen {}", a.admin_listen))?;
    let mut registry = Registry::default();
    register_metrics(&mut registry, &source);
    musubi_identity::metrics::register_svid_expiry(
        &mut registry,
        "musubi_controller_certificate_expiry_seconds",
        store.clone(),
    );
    let ready_store = store.clone();
    tokio::spawn(musubi_identity::service::admin::serve(
        admin,
        Arc::new(registry),
        Arc::new(move || ready_store.info().is_some()),
    ));
    // First certificate before serving; then renew in the background.
    let mut attempt = 0;
    while let Err(e) = renewal.renew_once().await {
        let d = musubi_identity::renew::backoff_delay(&renewal.policy, attempt, 0.5);
        attempt += 1;
        tracing::warn!(error = %e, retry_in = ?d, "waiting for the controller's certificate");
        tokio::time::sleep(d).await;
    }
    tokio::spawn(renewal.run());
    let _watch = source.spawn_watch(a.reload_interval);
    let running = start(ControllerConfig {
        source,
        bundle,
        store,
        listener,
    })
    .map_err(anyhow::Error::msg)?;
    println!("LISTENING grpc={}", running.addr);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    running.shutdown().await;
    Ok(())
}
