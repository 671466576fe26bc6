//! `musubi up`: the whole mesh on this machine, without root. The identity service and the
//! controller run in this process; every proxy and every application is its own process, each
//! under a `musubi supervise` that ends it when `up` ends, however `up` ends.

use crate::credentials;
use crate::spec::{UpFile, UpService};
use crate::supervise::{self, StopSignals};
use anyhow::{Context, Result, bail};
use musubi_identity::service::run::{self as identity_run, RunningService, ServiceConfig};
use musubi_identity::service::server::ServeLimits;
use musubi_identity::token::local::LocalIssuer;
use musubi_identity::{TrustBundle, TrustDomain, ca};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpListener;
use tokio::signal::unix::SignalKind;

pub const TOKEN_ISSUER: &str = "https://musubi.local/token-issuer";
const IDENTITY_NAMESPACE: &str = "musubi";

#[derive(clap::Args)]
pub struct UpArgs {
    /// A mesh file describing your services (see README); without it, a demo mesh runs.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// Where the CA, tokens, logs and generated configuration live.
    #[arg(long, default_value = ".musubi/up")]
    state: PathBuf,
    /// Seconds between the light requests sent to exposed services (0: none).
    #[arg(long, default_value_t = 1.0)]
    traffic_every: f64,
    /// Stop after this long instead of waiting for Ctrl-C (for scripts and tests).
    #[arg(long, value_parser = humantime::parse_duration)]
    run_for: Option<Duration>,
    /// Lifetime of the service-account tokens the proxies present to the identity service
    /// (at least 4s); each is minted again at half its lifetime.
    #[arg(long, default_value = "1h", value_parser = credentials::parse_token_ttl)]
    token_ttl: Duration,
    /// Lifetime of the proxies' certificates (X509-SVIDs; at least 30s); proxies renew at
    /// about 70 % of it.
    #[arg(long, default_value = "24h", value_parser = credentials::parse_svid_ttl)]
    svid_ttl: Duration,
}

/// How long tokens and certificates live.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub token: Duration,
    pub svid: Duration,
}

/// Ports of one service's proxy and application.
#[derive(Debug, Clone)]
pub struct Placement {
    pub svc: UpService,
    pub app_port: u16,
    pub inbound: u16,
    pub outbound: u16,
    pub admin: u16,
}

async fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?.port())
}

fn write_secret(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// The local CA: created on first run, reused after.
fn ensure_ca(dir: &Path, td: &TrustDomain) -> Result<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    std::fs::create_dir_all(dir)?;
    let (anchor, issuer_crt, issuer_key) = (
        dir.join("trust-anchor.crt"),
        dir.join("issuer.crt"),
        dir.join("issuer.key"),
    );
    if !anchor.exists() {
        let now = SystemTime::now();
        let root = ca::generate_root(td, Duration::from_secs(3650 * 86400), now)?;
        let issuer = ca::generate_issuer(
            td,
            &root.cert_pem,
            &root.key_pem,
            Duration::from_secs(365 * 86400),
            now,
        )?;
        std::fs::write(&anchor, &root.cert_pem)?;
        write_secret(&dir.join("trust-anchor.key"), &root.key_pem)?;
        std::fs::write(&issuer_crt, &issuer.cert_pem)?;
        write_secret(&issuer_key, &issuer.key_pem)?;
    }
    Ok((
        std::fs::read(anchor)?,
        std::fs::read(issuer_crt)?,
        std::fs::read(issuer_key)?,
    ))
}

/// A command that runs `program` under `musubi supervise`, tied to this process's life (add
/// the program's arguments, environment and output to it as to the program's own command).
fn supervised(exe: &Path, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("supervise")
        .arg("--parent")
        .arg(std::process::id().to_string())
        .arg("--")
        .arg(program);
    cmd
}

/// How long `stop` waits for the supervisors: their own bounded shutdown, and some slack.
const STOP_TIMEOUT: Duration = supervise::GRACE
    .saturating_add(supervise::KILL_WAIT)
    .saturating_add(Duration::from_secs(2));

/// The supervisors of the mesh's processes, stopped with SIGTERM (then waited for) when dropped.
///
/// PR_SET_PDEATHSIG fires when the *thread* that started a supervisor ends: they are started
/// from the thread that runs `up` itself (the runtime's `block_on` thread, which lives as long
/// as the process), never from a worker or blocking thread.
#[derive(Default)]
pub struct Children(Vec<(String, Child)>);

impl Children {
    fn push(&mut self, name: String, child: Child) {
        self.0.push((name, child));
    }

    /// SIGTERM to every supervisor (applications first, they were started last), then wait for
    /// all of them, within [`STOP_TIMEOUT`]; SIGKILL for any still there after it.
    pub fn stop(&mut self) {
        for (_, child) in self.0.iter_mut().rev() {
            // Not one already reaped: its pid may belong to someone else by now.
            if matches!(child.try_wait(), Ok(None))
                && let Ok(pid) = i32::try_from(child.id())
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            self.0
                .retain_mut(|(_, child)| matches!(child.try_wait(), Ok(None)));
            if self.0.is_empty() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for (name, child) in self.0.iter_mut() {
            eprintln!("musubi up: {name} did not stop in time; killing it");
            let _ = child.kill();
            let _ = child.wait();
        }
        self.0.clear();
    }

    /// The first child that exited, if any.
    fn exited(&mut self) -> Option<String> {
        self.0
            .iter_mut()
            .find_map(|(name, c)| matches!(c.try_wait(), Ok(Some(_))).then(|| name.clone()))
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Mesh {
    pub identity: RunningService,
    pub controller: crate::control_plane::Controller,
    pub placements: Vec<Placement>,
    pub children: Children,
    pub namespace: String,
    pub state: PathBuf,
    /// Mints the proxies' tokens again before they expire.
    pub token_refresh: tokio::task::JoinHandle<()>,
}

fn log_file(state: &Path, name: &str) -> Result<std::fs::File> {
    let dir = state.join("logs");
    std::fs::create_dir_all(&dir)?;
    Ok(std::fs::File::create(dir.join(format!("{name}.log")))?)
}

pub fn service_env_name(name: &str) -> String {
    format!(
        "MUSUBI_SERVICE_{}",
        name.to_ascii_uppercase().replace(['-', '.'], "_")
    )
}

/// Starts the whole mesh described by `file`; returns once every proxy is ready.
pub async fn start(file: UpFile, state: &Path, lifetimes: Lifetimes) -> Result<Mesh> {
    let exe = std::env::current_exe()?;
    let td = TrustDomain::new("cluster.local")?;
    let (anchors, issuer_cert, issuer_key) = ensure_ca(&state.join("ca"), &td)?;
    let bundle = TrustBundle::from_pem(td.clone(), &anchors)?;
    let tokens = Arc::new(
        LocalIssuer::generate(TOKEN_ISSUER)
            .map_err(|e| anyhow::anyhow!("local token issuer: {e}"))?,
    );
    let identity = identity_run::start(ServiceConfig {
        bundle: bundle.clone(),
        issuer_pem: (issuer_cert, issuer_key),
        issuer_files: None,
        reload_every: Duration::from_secs(5),
        // One clock mints and checks the tokens: no skew to allow for, so a token is refused
        // the second it expires.
        validator: Arc::new(tokens.validator().with_leeway(Duration::ZERO)),
        svid_ttl: lifetimes.svid,
        namespace: IDENTITY_NAMESPACE.into(),
        grpc: TcpListener::bind("127.0.0.1:0").await?,
        admin: Some(TcpListener::bind("127.0.0.1:0").await?),
        limits: ServeLimits::default(),
        max_inflight: 1024,
    })
    .await?;

    let mut placements = Vec::new();
    for svc in &file.services {
        placements.push(Placement {
            svc: svc.clone(),
            app_port: free_port().await?,
            inbound: free_port().await?,
            outbound: free_port().await?,
            admin: free_port().await?,
        });
    }
    let controller = crate::control_plane::start(
        state,
        &bundle,
        &identity,
        &tokens,
        &file.namespace,
        &placements,
        &crate::control_plane::routes_yaml(&file.namespace, &file.routes, &file.fault_injections),
    )
    .await?;

    let token_dir = state.join("tokens");
    std::fs::create_dir_all(&token_dir)?;
    let token_files = credentials::token_files(
        &token_dir,
        &file.namespace,
        placements.iter().map(|p| p.svc.service_account()),
    );
    credentials::mint_all(&tokens, &token_files, lifetimes.token)?;
    let token_refresh =
        credentials::spawn_refresh(tokens.clone(), token_files.clone(), lifetimes.token);
    let anchors_path = state.join("ca").join("trust-anchor.crt");
    let mut children = Children::default();
    for p in &placements {
        let sa = p.svc.service_account();
        let token_path = token_files
            .iter()
            .find(|f| f.service_account == sa)
            .map(|f| f.path.clone())
            .context("no token file for a service account")?;
        let child = supervised(&exe, &exe)
            .arg("proxy")
            .env("MUSUBI_PROXY_CAPTURE_MODE", "explicit")
            .env(
                "MUSUBI_PROXY_INBOUND_LISTEN",
                format!("127.0.0.1:{}", p.inbound),
            )
            .env(
                "MUSUBI_PROXY_OUTBOUND_LISTEN",
                format!("127.0.0.1:{}", p.outbound),
            )
            .env(
                "MUSUBI_PROXY_ADMIN_LISTEN",
                format!("127.0.0.1:{}", p.admin),
            )
            .env("MUSUBI_PROXY_APP_PORTS", p.app_port.to_string())
            .env("MUSUBI_PROXY_TRUST_DOMAIN", td.as_str())
            .env("MUSUBI_PROXY_TRUST_ANCHORS", &anchors_path)
            .env("MUSUBI_PROXY_NAMESPACE", &file.namespace)
            .env("MUSUBI_PROXY_SERVICE_ACCOUNT", sa)
            .env("MUSUBI_PROXY_TOKEN_FILE", &token_path)
            .env("MUSUBI_PROXY_IDENTITY_ADDR", identity.grpc_addr.to_string())
            .env("MUSUBI_PROXY_IDENTITY_NAMESPACE", IDENTITY_NAMESPACE)
            .env("MUSUBI_PROXY_CONTROLLER_ADDR", controller.addr.to_string())
            .env(
                "MUSUBI_PROXY_CONTROLLER_IDENTITY",
                controller.id.to_string(),
            )
            .env("MUSUBI_PROXY_DRAIN_TIMEOUT", "5s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(state, &format!("{}-proxy", p.svc.name))?)
            .spawn()
            .context("starting a proxy")?;
        children.push(format!("{} proxy", p.svc.name), child);
    }
    for p in &placements {
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], p.admin));
        if !musubi_proxy::run::wait_ready(admin, Duration::from_secs(30)).await {
            bail!(
                "the proxy of {} did not become ready; see {}",
                p.svc.name,
                state
                    .join("logs")
                    .join(format!("{}-proxy.log", p.svc.name))
                    .display()
            );
        }
    }
    for p in &placements {
        let mut cmd = supervised(&exe, "sh");
        cmd.arg("-c")
            .arg(&p.svc.command)
            .env("PORT", p.app_port.to_string())
            .env("MUSUBI_OUTBOUND", format!("127.0.0.1:{}", p.outbound))
            .env("HTTP_PROXY", format!("http://127.0.0.1:{}", p.outbound))
            .env("http_proxy", format!("http://127.0.0.1:{}", p.outbound))
            .env("NO_PROXY", "")
            .stdin(Stdio::null())
            .stdout(log_file(state, &p.svc.name)?)
            .stderr(log_file(state, &format!("{}-stderr", p.svc.name))?);
        for other in &placements {
            cmd.env(
                service_env_name(&other.svc.name),
                format!("{}.{}:{}", other.svc.name, file.namespace, other.svc.port),
            );
        }
        children.push(
            p.svc.name.clone(),
            cmd.spawn()
                .with_context(|| format!("starting {}", p.svc.name))?,
        );
    }
    for p in &placements {
        if !app_listening(p.app_port, APP_START_TIMEOUT).await {
            eprintln!(
                "musubi up: {} is not listening on its port {} after {:?}; requests to it get 502 until it does",
                p.svc.name, p.app_port, APP_START_TIMEOUT
            );
        }
    }
    Ok(Mesh {
        identity,
        controller,
        placements,
        children,
        namespace: file.namespace,
        state: state.to_path_buf(),
        token_refresh,
    })
}

/// How long `up` waits for each app to open its port before printing where to look.
const APP_START_TIMEOUT: Duration = Duration::from_secs(15);

/// Waits until something accepts connections on the app's port (an app that never listens,
/// a worker, is not an error: `up` warns and goes on).
async fn app_listening(port: u16, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).await?;
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

pub async fn up(a: UpArgs) -> Result<()> {
    let exe = std::env::current_exe()?.display().to_string();
    let file = match &a.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            crate::spec::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => crate::spec::demo(&exe),
    };
    std::fs::create_dir_all(&a.state)?;
    // Handlers first: a stop signal while the mesh starts ends the start (dropping what it
    // started stops it) instead of killing `up` with the default action.
    let mut stops = StopSignals::new(&[
        ("SIGTERM", SignalKind::terminate()),
        ("SIGINT", SignalKind::interrupt()),
        ("SIGHUP", SignalKind::hangup()),
    ])?;
    let lifetimes = Lifetimes {
        token: a.token_ttl,
        svid: a.svid_ttl,
    };
    let mut mesh = tokio::select! {
        mesh = start(file, &a.state, lifetimes) => mesh?,
        name = stops.recv() => {
            eprintln!("musubi up: {name} while starting; stopped");
            return Ok(());
        }
    };
    let exposed: Vec<String> = mesh
        .placements
        .iter()
        .filter(|p| p.svc.expose)
        .map(|p| format!("127.0.0.1:{}", p.inbound))
        .collect();
    println!(
        "Musubi is up: {} services, each behind its own proxy, mTLS between them.",
        mesh.placements.len()
    );
    println!();
    for entry in &exposed {
        println!("  entry        http://{entry}/      (try: curl http://{entry}/)");
    }
    for p in &mesh.placements {
        println!(
            "  {:<12} app 127.0.0.1:{:<5}  proxy metrics http://127.0.0.1:{}/metrics  as spiffe://cluster.local/ns/{}/sa/{}  (HTTP_PROXY 127.0.0.1:{})",
            p.svc.name,
            p.app_port,
            p.admin,
            mesh.namespace,
            p.svc.service_account(),
            p.outbound
        );
    }
    println!(
        "  identity     {} (metrics http://{}/metrics)",
        mesh.identity.grpc_addr,
        mesh.identity
            .admin_addr
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    println!(
        "  controller   {} (config {})",
        mesh.controller.addr,
        mesh.controller.config_path.display()
    );
    println!("  logs         {}", mesh.state.join("logs").display());
    if let Some(p) = mesh.placements.first() {
        println!();
        println!("Watch it:");
        println!(
            "  watch -n1 \"curl -s http://127.0.0.1:{}/metrics | grep -E '^musubi_proxy_(requests|responses)_total'\"",
            p.admin
        );
    }
    println!();
    println!("Ctrl-C stops everything.");

    let mut tick = tokio::time::interval(Duration::from_secs_f64(a.traffic_every.max(0.05)));
    let deadline = a.run_for.map(|d| tokio::time::Instant::now() + d);
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = stops.recv() => break,
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            _ = tick.tick() => {
                if let Some(name) = mesh.children.exited() {
                    eprintln!("musubi up: {name} exited; stopping (see {})", mesh.state.join("logs").display());
                    failures += 1;
                    break;
                }
                if a.traffic_every > 0.0 {
                    for entry in &exposed {
                        if let Ok((status, _)) = http_get(entry, "/").await && status != 200 {
                            tracing::debug!(status, "demo request failed");
                        }
                    }
                }
            }
        }
    }
    {
        use std::io::Write;
        // stdout may be gone by now (a closed pipe); stopping must not depend on it.
        let _ = writeln!(std::io::stdout(), "stopping…");
    }
    mesh.children.stop();
    mesh.token_refresh.abort();
    mesh.controller.shutdown().await;
    mesh.identity.shutdown().await;
    if failures > 0 {
        bail!("a process of the mesh exited early");
    }
    Ok(())
}
