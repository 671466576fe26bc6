//! `musubi-controller`: serves discovery and policy to the proxies, from the Kubernetes API
//! (in a cluster) or from a mesh file.

use anyhow::{Context, Result};
use clap::Parser;
use musubi_controller::file::FileSource;
use musubi_controller::kubernetes::{KubeSource, KubeSourceConfig};
use musubi_controller::limits::{
    DEFAULT_DISCOVERY_STREAMS_PER_CLIENT, DEFAULT_MAX_TARGET_BYTES,
    DEFAULT_POLICY_STREAMS_PER_CLIENT,
};
use musubi_controller::model::Mtls;
use musubi_controller::{
    ControllerConfig, DiscoverySource, StreamLimits, StreamMetrics, StreamOptions, identity,
    register_metrics, start,
};
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
    /// Mesh file (YAML, see docs/mesh-file.md), re-read when it changes. Without it, the
    /// controller watches the Kubernetes API (in-cluster config, else $KUBECONFIG).
    #[arg(long, env = "MUSUBI_CONTROLLER_CONFIG")]
    config: Option<PathBuf>,
    /// (Kubernetes) Mesh-wide mTLS mode: STRICT or PERMISSIVE; namespaces and MeshTLS
    /// objects override it.
    #[arg(long, env = "MUSUBI_MTLS_MODE", default_value = "STRICT", value_parser = parse_mode)]
    mtls_mode: Mtls,
    /// (Kubernetes) The cluster's DNS domain.
    #[arg(long, env = "MUSUBI_CLUSTER_DOMAIN", default_value = "cluster.local")]
    cluster_domain: String,
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
    /// Concurrent discovery streams one client (a workload identity from one address) may
    /// hold; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MUSUBI_CONTROLLER_DISCOVERY_STREAMS_PER_CLIENT", default_value_t = DEFAULT_DISCOVERY_STREAMS_PER_CLIENT, value_parser = parse_positive)]
    discovery_streams_per_client: usize,
    /// Concurrent policy streams one client may hold; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "MUSUBI_CONTROLLER_POLICY_STREAMS_PER_CLIENT", default_value_t = DEFAULT_POLICY_STREAMS_PER_CLIENT, value_parser = parse_positive)]
    policy_streams_per_client: usize,
    /// Longest discovery target (host:port) accepted, in bytes; longer is INVALID_ARGUMENT.
    #[arg(long, env = "MUSUBI_CONTROLLER_MAX_TARGET_BYTES", default_value_t = DEFAULT_MAX_TARGET_BYTES, value_parser = parse_positive)]
    max_target_bytes: usize,
    /// (Kubernetes) Longest wait for the first lists of namespaces, services, endpoint slices
    /// and pods before serving discovery anyway. Policy is never served before the MeshTLS and
    /// AuthorizationPolicy lists are in.
    #[arg(long, env = "MUSUBI_CONTROLLER_INITIAL_SYNC_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    initial_sync_timeout: Duration,
}

fn parse_positive(v: &str) -> Result<usize, String> {
    v.parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{v:?} is not a positive whole number"))
}

fn parse_mode(v: &str) -> Result<Mtls, String> {
    Mtls::parse(v).ok_or_else(|| format!("{v:?} is not STRICT or PERMISSIVE"))
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
    let mut _file_watch = None;
    let source: Arc<dyn DiscoverySource> = match &a.config {
        Some(path) => {
            let file = FileSource::load(path)?;
            register_metrics(&mut registry, &file);
            _file_watch = Some(file.spawn_watch(a.reload_interval));
            file
        }
        None => {
            let client = kube::Client::try_default()
                .await
                .context("Kubernetes client (in-cluster or $KUBECONFIG)")?;
            KubeSource::start(KubeSourceConfig {
                client,
                trust_domain: a.trust_domain.clone(),
                cluster_domain: a.cluster_domain.clone(),
                mtls: a.mtls_mode,
                initial_sync_timeout: a.initial_sync_timeout,
            })
            .await
        }
    };
    let stream_metrics = StreamMetrics::default();
    stream_metrics.register(&mut registry);
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
    let running = start(ControllerConfig {
        source,
        bundle,
        store,
        listener,
        streams: StreamOptions {
            limits: StreamLimits {
                discovery_per_client: a.discovery_streams_per_client,
                policy_per_client: a.policy_streams_per_client,
                max_target_bytes: a.max_target_bytes,
            },
            metrics: stream_metrics,
        },
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
