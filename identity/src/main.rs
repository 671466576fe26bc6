//! `musubi-identity`: the mesh's certificate issuance service, and the commands around it.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use musubi_identity::service::reload::IssuerFiles;
use musubi_identity::service::run::{self, ServiceConfig};
use musubi_identity::service::server::{self as grpc_server, ServeLimits};
use musubi_identity::token::{self, TokenValidator};
use musubi_identity::{SpiffeId, TrustBundle, TrustDomain, ca};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;

mod cli_dev;

/// Exit code for a bad configuration (EX_USAGE).
const EXIT_CONFIG: i32 = 64;

#[derive(Parser)]
#[command(
    name = "musubi-identity",
    version,
    about = "Musubi identity service: issues SPIFFE X509-SVIDs to workloads against their service-account tokens"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a trust anchor (root) and an issuer (intermediate) for local use.
    Init(InitArgs),
    /// Generate a new issuer signed by an existing trust anchor (to rotate the issuer).
    NewIssuer(NewIssuerArgs),
    /// Run the identity service.
    Serve(Box<ServeArgs>),
    /// Run the identity service locally with a fresh CA and a local token issuer, and print
    /// how to get a certificate from it.
    Dev(cli_dev::DevArgs),
    /// Ask an identity service for a certificate and print it (the key stays in memory).
    Certify(cli_dev::CertifyArgs),
}

#[derive(clap::Args)]
struct InitArgs {
    /// Trust domain of the mesh.
    #[arg(long, env = "MUSUBI_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Directory to write trust-anchor.{crt,key} and issuer.{crt,key} into.
    #[arg(long)]
    out: PathBuf,
    /// Lifetime of the trust anchor.
    #[arg(long, default_value = "3650d", value_parser = humantime::parse_duration)]
    anchor_ttl: Duration,
    /// Lifetime of the issuer.
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    issuer_ttl: Duration,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct NewIssuerArgs {
    #[arg(long, env = "MUSUBI_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Trust anchor certificate (PEM).
    #[arg(long)]
    anchor_cert: PathBuf,
    /// Trust anchor private key (PEM).
    #[arg(long)]
    anchor_key: PathBuf,
    /// Where to write the issuer certificate.
    #[arg(long)]
    out_cert: PathBuf,
    /// Where to write the issuer key.
    #[arg(long)]
    out_key: PathBuf,
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    ttl: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum ValidatorKind {
    /// Kubernetes TokenReview through the API server.
    Kubernetes,
    /// Offline JWT validation against the service-account issuer's JWKS.
    Jwks,
}

#[derive(clap::Args)]
struct ServeArgs {
    #[arg(long, env = "MUSUBI_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Trust anchor bundle (PEM, one or more certificates).
    #[arg(long, env = "MUSUBI_IDENTITY_TRUST_ANCHORS")]
    trust_anchors: PathBuf,
    /// Issuer certificate (PEM; may be followed by further intermediates). Re-read on change.
    #[arg(long, env = "MUSUBI_IDENTITY_ISSUER_CERT")]
    issuer_cert: PathBuf,
    /// Issuer private key (PEM). Re-read on change.
    #[arg(long, env = "MUSUBI_IDENTITY_ISSUER_KEY")]
    issuer_key: PathBuf,
    /// How often to check the issuer files for changes.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    issuer_reload_interval: Duration,
    /// gRPC (TLS) listen address.
    #[arg(long, env = "MUSUBI_IDENTITY_LISTEN", default_value = "0.0.0.0:8080")]
    listen: String,
    /// Admin (plain HTTP: /metrics, /ready, /live) listen address.
    #[arg(
        long,
        env = "MUSUBI_IDENTITY_ADMIN_LISTEN",
        default_value = "0.0.0.0:9990"
    )]
    admin_listen: String,
    /// Namespace this service runs in (its own SPIFFE ID is .../ns/<namespace>/sa/musubi-identity).
    #[arg(long, env = "POD_NAMESPACE", default_value = "musubi-system")]
    namespace: String,
    /// Lifetime of issued workload certificates.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    svid_ttl: Duration,
    /// How tokens are validated.
    #[arg(long, value_enum, default_value = "kubernetes")]
    token_validator: ValidatorKind,
    /// Audience tokens must be issued for.
    #[arg(long, default_value = token::AUDIENCE)]
    audience: String,
    /// (jwks) Trusted token issuer (`iss`), e.g. https://kubernetes.default.svc.cluster.local
    #[arg(long)]
    token_issuer: Option<String>,
    /// (jwks) JWKS file.
    #[arg(long, conflicts_with = "jwks_url")]
    jwks_file: Option<PathBuf>,
    /// (jwks) JWKS URL, e.g. https://kubernetes.default.svc/openid/v1/jwks
    #[arg(long)]
    jwks_url: Option<String>,
    /// (jwks) CA bundle for the JWKS URL.
    #[arg(long)]
    jwks_ca: Option<PathBuf>,
    /// (jwks) Bearer token file for the JWKS URL.
    #[arg(long)]
    jwks_token_file: Option<PathBuf>,
    /// Certify calls handled at once across all connections; more are refused.
    #[arg(long, default_value_t = 1024)]
    max_inflight: usize,
    /// Concurrent Certify calls per connection.
    #[arg(long, default_value_t = grpc_server::DEFAULT_PER_CONNECTION)]
    max_per_connection: u32,
    /// Certify calls one client IP may have in flight at once; more are refused at once
    /// (RESOURCE_EXHAUSTED, reason client_limit). Raise it if clients reach this service
    /// through a NAT that hides their addresses.
    #[arg(long, default_value_t = grpc_server::DEFAULT_PER_CLIENT,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_per_client: u32,
    /// Requests of one client IP that may be refused as invalid (bad token, oversized CSR) per
    /// minute, also the burst at once; past that its calls are refused without asking the token
    /// validator (reason client_refusal_rate). 0 turns this off.
    #[arg(long, default_value_t = grpc_server::DEFAULT_CLIENT_REFUSALS_PER_MINUTE)]
    max_client_refusals_per_minute: u32,
    /// How long a token the validator refused as invalid is refused again without asking it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    token_negative_cache_ttl: Duration,
    /// Most tokens remembered as refused (by their SHA-256, never the token); the oldest go
    /// first. 0 turns the cache off.
    #[arg(long, default_value_t = grpc_server::DEFAULT_NEGATIVE_CACHE_SIZE)]
    token_negative_cache_size: usize,
}

fn main() {
    musubi_identity::crypto::install_default();
    musubi_identity::logging::init("info");
    let cli = Cli::parse();
    let rt = musubi_identity::logging::runtime_or_exit("musubi-identity");
    let result = rt.block_on(async {
        match cli.command {
            Command::Init(a) => init(a),
            Command::NewIssuer(a) => new_issuer(a),
            Command::Serve(a) => serve(*a).await,
            Command::Dev(a) => cli_dev::dev(a).await,
            Command::Certify(a) => cli_dev::certify(a).await,
        }
    });
    if let Err(e) = result {
        eprintln!("musubi-identity: {e:#}");
        let code = if e.is::<ConfigError>() {
            EXIT_CONFIG
        } else {
            1
        };
        std::process::exit(code);
    }
}

/// A configuration problem: the process exits with code 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConfigError(String);

fn config_err(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(ConfigError(msg.into()))
}

fn trust_domain(s: &str) -> Result<TrustDomain> {
    TrustDomain::new(s).map_err(|e| config_err(format!("--trust-domain: {e}")))
}

/// Writes `contents` to `path`, readable only by the owner when `secret`.
pub(crate) fn write_file(path: &Path, contents: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if secret {
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// File names `init` writes.
pub(crate) struct CaPaths {
    pub anchor_cert: PathBuf,
    pub anchor_key: PathBuf,
    pub issuer_cert: PathBuf,
    pub issuer_key: PathBuf,
}

impl CaPaths {
    pub fn in_dir(dir: &Path) -> Self {
        CaPaths {
            anchor_cert: dir.join("trust-anchor.crt"),
            anchor_key: dir.join("trust-anchor.key"),
            issuer_cert: dir.join("issuer.crt"),
            issuer_key: dir.join("issuer.key"),
        }
    }
}

pub(crate) fn write_ca(
    td: &TrustDomain,
    dir: &Path,
    anchor_ttl: Duration,
    issuer_ttl: Duration,
) -> Result<CaPaths> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let now = SystemTime::now();
    let root = ca::generate_root(td, anchor_ttl, now)?;
    let issuer = ca::generate_issuer(td, &root.cert_pem, &root.key_pem, issuer_ttl, now)?;
    let paths = CaPaths::in_dir(dir);
    write_file(&paths.anchor_cert, &root.cert_pem, false)?;
    write_file(&paths.anchor_key, &root.key_pem, true)?;
    write_file(&paths.issuer_cert, &issuer.cert_pem, false)?;
    write_file(&paths.issuer_key, &issuer.key_pem, true)?;
    Ok(paths)
}

fn init(a: InitArgs) -> Result<()> {
    let td = trust_domain(&a.trust_domain)?;
    let paths = CaPaths::in_dir(&a.out);
    if !a.force && paths.anchor_cert.exists() {
        bail!(
            "{} already exists; pass --force to overwrite",
            paths.anchor_cert.display()
        );
    }
    let paths = write_ca(&td, &a.out, a.anchor_ttl, a.issuer_ttl)?;
    println!("trust domain: {td}");
    println!(
        "trust anchor: {} (key {})",
        paths.anchor_cert.display(),
        paths.anchor_key.display()
    );
    println!(
        "issuer:       {} (key {})",
        paths.issuer_cert.display(),
        paths.issuer_key.display()
    );
    Ok(())
}

fn new_issuer(a: NewIssuerArgs) -> Result<()> {
    let td = trust_domain(&a.trust_domain)?;
    let cert = std::fs::read_to_string(&a.anchor_cert)
        .with_context(|| format!("reading {}", a.anchor_cert.display()))?;
    let key = std::fs::read_to_string(&a.anchor_key)
        .with_context(|| format!("reading {}", a.anchor_key.display()))?;
    let issuer = ca::generate_issuer(&td, &cert, &key, a.ttl, SystemTime::now())?;
    // Key first, so a watcher never sees a new certificate with the old key for long.
    write_file(&a.out_key, &issuer.key_pem, true)?;
    write_file(&a.out_cert, &issuer.cert_pem, false)?;
    println!(
        "issuer: {} (key {})",
        a.out_cert.display(),
        a.out_key.display()
    );
    Ok(())
}

pub(crate) async fn bind(addr: &str, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| config_err(format!("{what} {addr}: cannot listen: {e}")))
}

async fn validator_from(a: &ServeArgs) -> Result<Arc<dyn TokenValidator>> {
    Ok(match a.token_validator {
        ValidatorKind::Kubernetes => Arc::new(
            token::kubernetes::TokenReviewValidator::from_default_config(a.audience.clone())
                .await
                .map_err(|e| config_err(format!("--token-validator kubernetes: {e}")))?,
        ),
        ValidatorKind::Jwks => {
            let issuer = a
                .token_issuer
                .clone()
                .ok_or_else(|| config_err("--token-validator jwks needs --token-issuer"))?;
            let source =
                match (&a.jwks_file, &a.jwks_url) {
                    (Some(f), None) => token::jwks::JwksSource::File(f.clone()),
                    (None, Some(u)) => token::jwks::JwksSource::Url {
                        url: u.clone(),
                        ca_pem: match &a.jwks_ca {
                            Some(p) => Some(std::fs::read(p).map_err(|e| {
                                config_err(format!("--jwks-ca {}: {e}", p.display()))
                            })?),
                            None => None,
                        },
                        bearer_token_file: a.jwks_token_file.clone(),
                    },
                    _ => {
                        return Err(config_err(
                            "--token-validator jwks needs --jwks-file or --jwks-url",
                        ));
                    }
                };
            let v = token::jwks::JwksValidator::load(issuer, source)
                .await
                .map_err(|e| config_err(format!("JWKS: {e}")))?
                .with_audience(a.audience.clone());
            let v = Arc::new(v);
            v.clone().spawn_refresh(Duration::from_secs(60));
            v
        }
    })
}

async fn serve(a: ServeArgs) -> Result<()> {
    let td = trust_domain(&a.trust_domain)?;
    let read = |p: &Path, what: &str| {
        std::fs::read(p).map_err(|e| config_err(format!("{what} {}: {e}", p.display())))
    };
    let anchors = read(&a.trust_anchors, "--trust-anchors")?;
    let bundle = TrustBundle::from_pem(td, &anchors)
        .map_err(|e| config_err(format!("--trust-anchors: {e}")))?;
    let issuer_pem = (
        read(&a.issuer_cert, "--issuer-cert")?,
        read(&a.issuer_key, "--issuer-key")?,
    );
    SpiffeId::workload(bundle.trust_domain(), &a.namespace, run::SERVICE_ACCOUNT)
        .map_err(|e| config_err(format!("--namespace: {e}")))?;
    let validator = validator_from(&a).await?;
    let grpc = bind(&a.listen, "--listen").await?;
    let admin = bind(&a.admin_listen, "--admin-listen").await?;
    let running = run::start(ServiceConfig {
        bundle,
        issuer_pem,
        issuer_files: Some(IssuerFiles {
            cert: a.issuer_cert.clone(),
            key: a.issuer_key.clone(),
        }),
        reload_every: a.issuer_reload_interval,
        validator,
        svid_ttl: a.svid_ttl,
        namespace: a.namespace.clone(),
        grpc,
        admin: Some(admin),
        limits: ServeLimits {
            per_connection: a.max_per_connection,
            per_client: a.max_per_client,
            client_refusals_per_minute: a.max_client_refusals_per_minute,
            negative_cache_ttl: a.token_negative_cache_ttl,
            negative_cache_size: a.token_negative_cache_size,
            ..ServeLimits::default()
        },
        max_inflight: a.max_inflight,
    })
    .await
    .map_err(|e| config_err(e.to_string()))?;
    println!(
        "LISTENING grpc={} admin={} id={}",
        running.grpc_addr,
        running
            .admin_addr
            .map(|a| a.to_string())
            .unwrap_or_default(),
        running.id
    );
    cli_dev::run_until_signal(running).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_flag_defaults_are_the_service_defaults() {
        let cli = Cli::try_parse_from([
            "musubi-identity",
            "serve",
            "--trust-anchors=a",
            "--issuer-cert=b",
            "--issuer-key=c",
        ])
        .unwrap();
        let Command::Serve(a) = cli.command else {
            panic!("not serve");
        };
        let d = ServeLimits::default();
        assert_eq!(a.max_per_connection, d.per_connection);
        assert_eq!(a.max_per_client, d.per_client);
        assert_eq!(
            a.max_client_refusals_per_minute,
            d.client_refusals_per_minute
        );
        assert_eq!(a.token_negative_cache_ttl, d.negative_cache_ttl);
        assert_eq!(a.token_negative_cache_size, d.negative_cache_size);
    }

    #[test]
    fn zero_per_client_is_refused() {
        let parsed = Cli::try_parse_from([
            "musubi-identity",
            "serve",
            "--trust-anchors=a",
            "--issuer-cert=b",
            "--issuer-key=c",
            "--max-per-client=0",
        ]);
        assert!(parsed.is_err());
    }
}
