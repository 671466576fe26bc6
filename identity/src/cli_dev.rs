//! `musubi-identity dev` (the service with a local CA and token issuer) and `certify`.

use crate::{CaPaths, bind, config_err, write_ca, write_file};
use anyhow::{Context, Result};
use musubi_identity::client::{self, RemoteCertSource, TokenSource};
use musubi_identity::renew::{RenewPolicy, Renewal};
use musubi_identity::service::reload::IssuerFiles;
use musubi_identity::service::run::{self, RunningService, ServiceConfig};
use musubi_identity::service::server::ServeLimits;
use musubi_identity::token::local::LocalIssuer;
use musubi_identity::{CredentialStore, SpiffeId, TrustBundle, TrustDomain, pem};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The `iss` of tokens minted by the local issuer.
pub const LOCAL_TOKEN_ISSUER: &str = "https://musubi.local/token-issuer";

#[derive(clap::Args)]
pub struct DevArgs {
    #[arg(long, env = "MUSUBI_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// State directory: the CA is created here on first run and reused after.
    #[arg(long, default_value = ".musubi/identity")]
    state: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    #[arg(long, default_value = "127.0.0.1:9990")]
    admin_listen: String,
    /// Namespace of the identity service's own identity.
    #[arg(long, default_value = "musubi")]
    namespace: String,
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    svid_ttl: Duration,
    /// Workloads to mint demo tokens for, as namespace/service-account.
    #[arg(long, default_values = ["default/default"])]
    token_for: Vec<String>,
}

pub async fn dev(a: DevArgs) -> Result<()> {
    let td = TrustDomain::new(&a.trust_domain)
        .map_err(|e| config_err(format!("--trust-domain: {e}")))?;
    let ca_dir = a.state.join("ca");
    let paths = CaPaths::in_dir(&ca_dir);
    if !paths.anchor_cert.exists() {
        write_ca(
            &td,
            &ca_dir,
            Duration::from_secs(3650 * 86400),
            Duration::from_secs(365 * 86400),
        )?;
    }
    let anchors = std::fs::read(&paths.anchor_cert).context("reading the trust anchor")?;
    let bundle = TrustBundle::from_pem(td.clone(), &anchors)?;
    let issuer_pem = (
        std::fs::read(&paths.issuer_cert)?,
        std::fs::read(&paths.issuer_key)?,
    );

    // A local token issuer whose key lives only in this process; tokens it mints are checked
    // by the same JWKS validator a cluster would use.
    let local = LocalIssuer::generate(LOCAL_TOKEN_ISSUER)
        .map_err(|e| anyhow::anyhow!("local token issuer: {e}"))?;
    let token_dir = a.state.join("tokens");
    std::fs::create_dir_all(&token_dir)?;
    write_file(&a.state.join("jwks.json"), &local.jwks_json(), false)?;
    let mut tokens = Vec::new();
    for w in &a.token_for {
        let (ns, sa) = w.split_once('/').ok_or_else(|| {
            config_err(format!(
                "--token-for {w:?}: expected namespace/service-account"
            ))
        })?;
        let id = SpiffeId::workload(&td, ns, sa)
            .map_err(|e| config_err(format!("--token-for {w:?}: {e}")))?;
        let token = local
            .mint(ns, sa, a.svid_ttl)
            .map_err(|e| anyhow::anyhow!("minting a token: {e}"))?;
        let path = token_dir.join(format!("{ns}.{sa}.jwt"));
        write_file(&path, &token, true)?;
        tokens.push((id, ns.to_string(), sa.to_string(), path));
    }

    let running = run::start(ServiceConfig {
        bundle,
        issuer_pem,
        issuer_files: Some(IssuerFiles {
            cert: paths.issuer_cert.clone(),
            key: paths.issuer_key.clone(),
        }),
        reload_every: Duration::from_secs(2),
        validator: Arc::new(local.validator()),
        svid_ttl: a.svid_ttl,
        namespace: a.namespace.clone(),
        grpc: bind(&a.listen, "--listen").await?,
        admin: Some(bind(&a.admin_listen, "--admin-listen").await?),
        limits: ServeLimits::default(),
        max_inflight: 1024,
    })
    .await?;

    let admin = running
        .admin_addr
        .map(|a| a.to_string())
        .unwrap_or_default();
    println!("Musubi identity service (local mode), trust domain {td}");
    println!(
        "  gRPC over TLS  {}  serving as {}",
        running.grpc_addr, running.id
    );
    println!("  metrics        http://{admin}/metrics");
    println!("  trust anchor   {}", paths.anchor_cert.display());
    println!(
        "  issuer         {} (edit or replace it: the service reloads it)",
        paths.issuer_cert.display()
    );
    for (id, ns, sa, path) in &tokens {
        println!("  demo token     {} proves {id}", path.display());
        println!();
        println!("Get a certificate for it:");
        println!(
            "  cargo run -p musubi-identity -- certify --server {} --server-namespace {} --trust-anchors {} --token-file {} --namespace {ns} --service-account {sa}",
            running.grpc_addr,
            a.namespace,
            paths.anchor_cert.display(),
            path.display()
        );
    }
    println!();
    println!("Ctrl-C stops it.");
    run_until_signal(running).await
}

#[derive(clap::Args)]
pub struct CertifyArgs {
    #[arg(long, env = "MUSUBI_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Identity service address, host:port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    server: String,
    /// Namespace the identity service runs in (its SPIFFE ID is checked in the handshake).
    #[arg(long, default_value = "musubi")]
    server_namespace: String,
    /// Trust anchor bundle (PEM).
    #[arg(long)]
    trust_anchors: PathBuf,
    /// File holding the service-account token.
    #[arg(long)]
    token_file: PathBuf,
    /// Namespace of the workload asking.
    #[arg(long)]
    namespace: String,
    /// Service account of the workload asking.
    #[arg(long)]
    service_account: String,
}

pub async fn certify(a: CertifyArgs) -> Result<()> {
    let td = TrustDomain::new(&a.trust_domain)
        .map_err(|e| config_err(format!("--trust-domain: {e}")))?;
    let anchors = std::fs::read(&a.trust_anchors)
        .with_context(|| format!("reading {}", a.trust_anchors.display()))?;
    let bundle = TrustBundle::from_pem(td.clone(), &anchors)?;
    let id = SpiffeId::workload(&td, &a.namespace, &a.service_account)?;
    let server_id = SpiffeId::workload(&td, &a.server_namespace, run::SERVICE_ACCOUNT)?;
    let channel = client::connect(&a.server, &bundle, server_id)?;
    let store = CredentialStore::new();
    let renewal = Renewal {
        id,
        source: Arc::new(RemoteCertSource::new(
            channel,
            TokenSource::File(a.token_file.clone()),
        )),
        store: store.clone(),
        bundle,
        policy: RenewPolicy::default(),
    };
    let info = renewal.renew_once().await?;
    println!("SPIFFE ID:   {}", info.id);
    println!(
        "valid:       {} .. {}",
        humantime::format_rfc3339_seconds(info.not_before),
        humantime::format_rfc3339_seconds(info.not_after)
    );
    println!("sha256:      {}", info.fingerprint);
    if let Some(key) = store.certified_key() {
        for c in &key.cert {
            print!("{}", pem::encode_cert(c));
        }
    }
    println!("(the private key was generated in memory and is not written anywhere)");
    Ok(())
}

/// Serves until SIGINT or SIGTERM, then shuts down gracefully.
pub async fn run_until_signal(mut running: RunningService) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        r = running.wait() => return r.map_err(|e| anyhow::anyhow!("server stopped: {e}")),
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}
