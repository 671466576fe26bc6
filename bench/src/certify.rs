//! Certificates per second: raw signing in-process, and end to end over gRPC+TLS against a
//! `musubi-identity serve` process (pinned to one core when the machine has two or more).

use crate::sys;
use anyhow::{Context, Result, bail};
use musubi_identity::client;
use musubi_identity::csr::{build_csr, check_csr};
use musubi_identity::testing::TestCa;
use musubi_identity::token::TokenValidator;
use musubi_identity::token::local::LocalIssuer;
use musubi_proto::identity::v1::CertifyRequest;
use musubi_proto::identity::v1::identity_client::IdentityClient;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const TOKEN_ISSUER: &str = "https://musubi.bench/issuer";

#[derive(clap::Args)]
pub struct Args {
    /// A short smoke run (about 15 s): one repetition of 2 s.
    #[arg(long)]
    quick: bool,
    /// Concurrent gRPC clients, each on its own connection.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Measurement window per repetition.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Repetitions of the end-to-end measurement (median and spread are reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// The musubi-identity binary (default: next to this one, as `cargo build --release` puts it).
    #[arg(long)]
    identity_bin: Option<PathBuf>,
    /// Also write the JSON result here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Runs `op` in a tight loop on one thread for `window`; returns operations per second.
fn per_second(window: Duration, mut op: impl FnMut(usize)) -> f64 {
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < window {
        op(n);
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

struct Raw {
    sign: f64,
    csr_check_and_sign: f64,
    token_validate: f64,
}

async fn raw(window: Duration) -> Result<Raw> {
    let ca = TestCa::new("cluster.local");
    let id = ca.id("bench", "raw");
    let keys: Vec<rcgen::KeyPair> = (0..64)
        .map(|_| rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256))
        .collect::<Result<_, _>>()?;
    let spkis: Vec<Vec<u8>> = keys
        .iter()
        .map(rcgen::PublicKeyData::subject_public_key_info)
        .collect();
    let csrs: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| build_csr(k, &id))
        .collect::<Result<_, _>>()?;
    let now = SystemTime::now();
    let ttl = Duration::from_secs(86400);
    let sign = per_second(window, |i| {
        let _ = ca.issuer.sign(&spkis[i % spkis.len()], &id, ttl, now);
    });
    let csr_check_and_sign = per_second(window, |i| {
        if let Ok(c) = check_csr(&csrs[i % csrs.len()], &id) {
            let _ = ca.issuer.sign(&c.spki_der, &id, ttl, now);
        }
    });
    let issuer = LocalIssuer::generate(TOKEN_ISSUER)?;
    let validator = issuer.validator();
    let token = issuer.mint("bench", "raw", Duration::from_secs(3600))?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < window {
        validator.validate(&token).await?;
        n += 1;
    }
    let token_validate = n as f64 / start.elapsed().as_secs_f64();
    Ok(Raw {
        sign,
        csr_check_and_sign,
        token_validate,
    })
}

struct Server {
    child: Child,
    grpc: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn identity_bin(a: &Args) -> Result<PathBuf> {
    let path = match &a.identity_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for the bench binary")?
            .join("musubi-identity"),
    };
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p musubi-identity) or pass --identity-bin",
            path.display()
        );
    }
    Ok(path)
}

fn start_server(
    bin: &PathBuf,
    ca: &TestCa,
    tokens: &LocalIssuer,
    clients: usize,
) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let p = |n: &str| dir.path().join(n);
    std::fs::write(p("anchor.crt"), &ca.root.cert_pem)?;
    std::fs::write(p("issuer.crt"), &ca.issuer_pem.cert_pem)?;
    std::fs::write(p("issuer.key"), &ca.issuer_pem.key_pem)?;
    std::fs::write(p("jwks.json"), tokens.jwks_json())?;
    let mut child = Command::new(bin)
        .arg("serve")
        .args(["--trust-domain", "cluster.local", "--namespace", "musubi"])
        .arg("--trust-anchors")
        .arg(p("anchor.crt"))
        .arg("--issuer-cert")
        .arg(p("issuer.crt"))
        .arg("--issuer-key")
        .arg(p("issuer.key"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--token-validator", "jwks", "--token-issuer", TOKEN_ISSUER])
        .arg("--jwks-file")
        .arg(p("jwks.json"))
        .args(["--max-inflight", &(clients * 64).to_string()])
        .env("MUSUBI_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let grpc = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("grpc="))
        .with_context(|| format!("unexpected first line from the server: {line:?}"))?
        .to_string();
    Ok(Server {
        child,
        grpc,
        _dir: dir,
    })
}

struct E2e {
    certs_per_sec: f64,
    server_cores: f64,
    certs_per_core_sec: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
    rss_bytes: u64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

type Work = Vec<(Vec<u8>, String)>;

async fn e2e_once(
    server: &Server,
    ca: &TestCa,
    work: &[Arc<Work>],
    window: Duration,
) -> Result<E2e> {
    let pid = server.child.id();
    let mut tasks = Vec::new();
    let start_gate = Arc::new(tokio::sync::Barrier::new(work.len() + 1));
    for w in work {
        let channel =
            client::connect(&server.grpc, &ca.bundle, ca.id("musubi", "musubi-identity"))?;
        let mut c = IdentityClient::new(channel);
        // Warm the connection (TLS handshake) before the window opens.
        let (csr, token) = w[0].clone();
        c.certify(CertifyRequest { csr, token }).await?;
        let w = w.clone();
        let gate = start_gate.clone();
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            let start = Instant::now();
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = 0;
            while start.elapsed() < window {
                let (csr, token) = w[i % w.len()].clone();
                i += 1;
                let t = Instant::now();
                match c.certify(CertifyRequest { csr, token }).await {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let cpu0 = sys::cpu_time(pid).context("server CPU time")?;
    let t0 = Instant::now();
    start_gate.wait().await;
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = (sys::cpu_time(pid).context("server CPU time")? - cpu0).as_secs_f64();
    lat.sort();
    let n = lat.len() as f64;
    Ok(E2e {
        certs_per_sec: n / elapsed,
        server_cores: cpu / elapsed,
        certs_per_core_sec: if cpu > 0.0 { n / cpu } else { 0.0 },
        p50: sys::percentile(&lat, 50.0),
        p99: sys::percentile(&lat, 99.0),
        errors,
        rss_bytes: sys::rss(pid).map(|r| r.1).unwrap_or(0),
    })
}

pub async fn run(mut a: Args) -> Result<()> {
    if a.quick {
        a.duration = Duration::from_secs(2);
        a.repeats = 1;
    }
    let raw_window = if a.quick {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(3)
    };
    let bin = identity_bin(&a)?;

    println!(
        "musubi-bench certify: {} clients, {:?} x {} (quick: {})",
        a.clients, a.duration, a.repeats, a.quick
    );
    let raw = raw(raw_window).await?;

    let ca = TestCa::new("cluster.local");
    let tokens = LocalIssuer::generate(TOKEN_ISSUER)?;
    let server = start_server(&bin, &ca, &tokens, a.clients)?;
    let pinned = sys::pin(server.child.id(), "1") && sys::pin(std::process::id(), "0");

    // Each client cycles through its own CSRs (fresh keys) and a token for its identity;
    // generating them is client work and stays out of the window.
    let mut work = Vec::new();
    for c in 0..a.clients {
        let sa = format!("client-{c}");
        let id = ca.id("bench", &sa);
        let token = tokens.mint("bench", &sa, Duration::from_secs(3600))?;
        let mut w = Vec::new();
        for _ in 0..16 {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            w.push((build_csr(&key, &id)?, token.clone()));
        }
        work.push(Arc::new(w));
    }
    let mut runs = Vec::new();
    for _ in 0..a.repeats {
        runs.push(e2e_once(&server, &ca, &work, a.duration).await?);
    }
    let med = |f: fn(&E2e) -> f64| sys::median(runs.iter().map(f).collect());
    let min = |f: fn(&E2e) -> f64| runs.iter().map(f).fold(f64::INFINITY, f64::min);
    let max = |f: fn(&E2e) -> f64| runs.iter().map(f).fold(0.0, f64::max);

    let table = format!(
        "| measure | value |\n|---|---|\n\
         | raw signing, 1 thread (certs/s) | {:.0} |\n\
         | CSR check + signing, 1 thread (certs/s) | {:.0} |\n\
         | token validation (ES256 JWT), 1 thread (tokens/s) | {:.0} |\n\
         | end to end over gRPC+TLS, {} clients (certs/s, median [min-max]) | {:.0} [{:.0}-{:.0}] |\n\
         | server CPU used (cores) | {:.2} |\n\
         | end to end per server core (certs per CPU-second) | {:.0} [{:.0}-{:.0}] |\n\
         | latency p50 / p99 (ms) | {:.2} / {:.2} |\n\
         | errors | {} |\n\
         | server peak RSS (MB) | {:.1} |\n\
         | server pinned to its own core | {} |\n",
        raw.sign,
        raw.csr_check_and_sign,
        raw.token_validate,
        a.clients,
        med(|r| r.certs_per_sec),
        min(|r| r.certs_per_sec),
        max(|r| r.certs_per_sec),
        med(|r| r.server_cores),
        med(|r| r.certs_per_core_sec),
        min(|r| r.certs_per_core_sec),
        max(|r| r.certs_per_core_sec),
        med(|r| ms(r.p50)),
        med(|r| ms(r.p99)),
        runs.iter().map(|r| r.errors).sum::<u64>(),
        max(|r| r.rss_bytes as f64) / 1e6,
        pinned,
    );
    println!("{table}");
    let result = json!({
        "benchmark": "certify",
        "date": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        "host": sys::hostname(),
        "cpu": sys::cpu_model(),
        "cores": sys::cores(),
        "version": env!("CARGO_PKG_VERSION"),
        "quick": a.quick,
        "clients": a.clients,
        "window_seconds": a.duration.as_secs_f64(),
        "repeats": a.repeats,
        "raw": {"sign_per_sec": raw.sign, "csr_check_and_sign_per_sec": raw.csr_check_and_sign, "token_validate_per_sec": raw.token_validate},
        "e2e": runs.iter().map(|r| json!({
            "certs_per_sec": r.certs_per_sec,
            "server_cores": r.server_cores,
            "certs_per_core_sec": r.certs_per_core_sec,
            "p50_ms": ms(r.p50),
            "p99_ms": ms(r.p99),
            "errors": r.errors,
            "server_peak_rss_bytes": r.rss_bytes,
        })).collect::<Vec<_>>(),
        "pinned": pinned,
    });
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&result)?)?;
        println!("wrote {}", out.display());
    }
    let total_errors: u64 = runs.iter().map(|r| r.errors).sum();
    if total_errors > 0 {
        bail!("{total_errors} requests failed during the benchmark");
    }
    Ok(())
}
