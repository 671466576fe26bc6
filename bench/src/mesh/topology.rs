//! The three systems under test, each on its own loopback addresses: baseline (straight to the
//! backend), a Musubi proxy pair (certificates from our identity service, discovery from our
//! controller), and an Envoy pair configured equivalently.

use super::routed;
use anyhow::{Context, Result, bail};
use musubi_tests::envoy::Envoy;
use musubi_tests::{Identity, mesh::Controller};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// CPUs for the proxies, and for the load generator + backend (when there are two or more).
pub const PROXY_CPUS: &str = "1";
pub const LOAD_CPUS: &str = "0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Baseline,
    Musubi,
    Envoy,
}

impl Which {
    pub fn label(self) -> &'static str {
        match self {
            Which::Baseline => "baseline",
            Which::Musubi => "musubi",
            Which::Envoy => "envoy",
        }
    }
}

/// Where the load goes for each kind of traffic.
#[derive(Debug, Clone)]
pub struct Targets {
    pub http: String,
    pub http_authority: String,
    pub grpc: String,
    pub grpc_authority: String,
    /// The service with routes (the `routed` point): same listener as `http`, its own authority.
    pub routed: String,
    pub routed_authority: String,
    pub tcp: String,
    /// `CONNECT` authority for opaque TCP (Musubi's explicit mode); None: connect directly.
    pub tcp_connect: Option<String>,
}

pub struct System {
    pub which: Which,
    pub targets: Targets,
    /// The proxies' processes: (name, pid).
    pub proxies: Vec<(String, u32)>,
    /// The client proxy's admin endpoint (where the routed split is counted).
    pub client_admin: Option<SocketAddr>,
    _children: Vec<Child>,
    _envoys: Vec<Envoy>,
}

/// The backend process's three listeners (on 127.0.0.1).
#[derive(Debug, Clone, Copy)]
pub struct Backend {
    pub http: u16,
    pub grpc: u16,
    pub tcp: u16,
}

pub async fn free_port(ip: &str) -> Result<u16> {
    let l = tokio::net::TcpListener::bind((ip, 0)).await?;
    Ok(l.local_addr()?.port())
}

fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    if !p.exists() {
        bail!(
            "{} not found next to musubi-bench: cargo build --release -p musubi-proxy -p musubi-bench",
            p.display()
        );
    }
    Ok(p)
}

async fn wait_connect(addr: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("{addr} never accepted a connection");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Starts the backend process, pinned with the load generator.
pub async fn backend() -> Result<(Child, Backend)> {
    let b = Backend {
        http: free_port("127.0.0.1").await?,
        grpc: free_port("127.0.0.1").await?,
        tcp: free_port("127.0.0.1").await?,
    };
    let child = Command::new("taskset")
        .args(["-c", LOAD_CPUS])
        .arg(std::env::current_exe()?)
        .arg("backend")
        .args(["--http", &format!("127.0.0.1:{}", b.http)])
        .args(["--grpc", &format!("127.0.0.1:{}", b.grpc)])
        .args(["--tcp", &format!("127.0.0.1:{}", b.tcp)])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting the backend")?;
    for p in [b.http, b.grpc, b.tcp] {
        wait_connect(&format!("127.0.0.1:{p}"), Duration::from_secs(10)).await?;
    }
    Ok((child, b))
}

pub fn baseline(b: Backend) -> System {
    System {
        which: Which::Baseline,
        targets: Targets {
            http: format!("127.0.0.1:{}", b.http),
            http_authority: "backend".into(),
            grpc: format!("127.0.0.1:{}", b.grpc),
            grpc_authority: "backend".into(),
            routed: format!("127.0.0.1:{}", b.http),
            routed_authority: "backend".into(),
            tcp: format!("127.0.0.1:{}", b.tcp),
            tcp_connect: None,
        },
        proxies: vec![],
        client_admin: None,
        _children: vec![],
        _envoys: vec![],
    }
}

/// The control plane the Musubi pair uses: our identity service and controller, in-process.
pub struct ControlPlane {
    pub identity: Identity,
    pub controller: Controller,
    dir: tempfile::TempDir,
}

fn mesh_yaml(b: Backend, server_in: u16) -> String {
    let ep = |port: u16| {
        format!(
            "[{{ address: 127.0.0.12, port: {port}, serviceAccount: server, proxyPort: {server_in} }}]"
        )
    };
    format!(
        "services:\n\
         - {{ name: backend, namespace: bench, port: 80, protocol: detect, endpoints: {} }}\n\
         - {{ name: grpc, namespace: bench, port: 81, protocol: http2, endpoints: {} }}\n\
         - {{ name: tcp, namespace: bench, port: 82, protocol: opaque, endpoints: {} }}\n\
         {}\
         workloads:\n\
         - namespace: bench\n  serviceAccount: server\n  ports:\n\
         \x20\x20- {{ port: {}, allow: [{{ identity: spiffe://cluster.local/ns/bench/sa/client }}] }}\n\
         \x20\x20- {{ port: {}, allow: [{{ identity: spiffe://cluster.local/ns/bench/sa/client }}] }}\n\
         \x20\x20- {{ port: {}, allow: [{{ identity: spiffe://cluster.local/ns/bench/sa/client }}] }}\n\
         {}",
        ep(b.http),
        ep(b.grpc),
        ep(b.tcp),
        routed::mesh_services(&ep(b.http)),
        b.http,
        b.grpc,
        b.tcp,
        routed::mesh_routes(),
    )
}

/// Ports of one Musubi proxy.
pub struct ProxyPorts {
    pub ip: &'static str,
    pub inbound: u16,
    pub outbound: u16,
    pub admin: u16,
}

impl ProxyPorts {
    pub async fn on(ip: &'static str) -> Result<ProxyPorts> {
        Ok(ProxyPorts {
            ip,
            inbound: free_port(ip).await?,
            outbound: free_port(ip).await?,
            admin: free_port(ip).await?,
        })
    }
}

impl ControlPlane {
    pub async fn start(b: Backend, server_in: u16) -> Result<ControlPlane> {
        let identity = Identity::start().await;
        let controller = Controller::start(&identity, &mesh_yaml(b, server_in)).await;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("anchors.pem"), identity.ca.bundle.to_pem())?;
        Ok(ControlPlane {
            identity,
            controller,
            dir,
        })
    }

    /// Starts a `musubi-proxy` process for `bench/<sa>` pinned to the proxies' CPU, and returns
    /// it with its start-to-ready time (process start until `/ready` answers 200).
    pub async fn proxy(
        &self,
        sa: &str,
        ports: &ProxyPorts,
        app_ports: &str,
    ) -> Result<(Child, Duration)> {
        let token = self
            .identity
            .tokens
            .mint("bench", sa, Duration::from_secs(3600))
            .map_err(|e| anyhow::anyhow!("minting a token: {e}"))?;
        let token_path = self.dir.path().join(format!("{sa}.jwt"));
        std::fs::write(&token_path, token)?;
        let started = Instant::now();
        let child = Command::new("taskset")
            .args(["-c", PROXY_CPUS])
            .arg(sibling("musubi-proxy")?)
            .env("MUSUBI_PROXY_CAPTURE_MODE", "explicit")
            .env(
                "MUSUBI_PROXY_INBOUND_LISTEN",
                format!("{}:{}", ports.ip, ports.inbound),
            )
            .env(
                "MUSUBI_PROXY_OUTBOUND_LISTEN",
                format!("{}:{}", ports.ip, ports.outbound),
            )
            .env(
                "MUSUBI_PROXY_ADMIN_LISTEN",
                format!("{}:{}", ports.ip, ports.admin),
            )
            .env("MUSUBI_PROXY_APP_PORTS", app_ports)
            .env(
                "MUSUBI_PROXY_TRUST_ANCHORS",
                self.dir.path().join("anchors.pem"),
            )
            .env("MUSUBI_PROXY_NAMESPACE", "bench")
            .env("MUSUBI_PROXY_SERVICE_ACCOUNT", sa)
            .env("MUSUBI_PROXY_TOKEN_FILE", &token_path)
            .env("MUSUBI_PROXY_IDENTITY_ADDR", self.identity.addr())
            .env("MUSUBI_PROXY_IDENTITY_NAMESPACE", "musubi")
            .env(
                "MUSUBI_PROXY_CONTROLLER_ADDR",
                self.controller.addr.to_string(),
            )
            .env(
                "MUSUBI_PROXY_CONTROLLER_IDENTITY",
                self.controller.id.to_string(),
            )
            .env("MUSUBI_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting musubi-proxy")?;
        let admin: SocketAddr = format!("{}:{}", ports.ip, ports.admin).parse()?;
        let deadline = started + Duration::from_secs(20);
        loop {
            if http_status(admin, "/ready").await == Some(200) {
                return Ok((child, started.elapsed()));
            }
            if Instant::now() > deadline {
                bail!("musubi-proxy {sa} never became ready");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Status code of a GET, or None when nothing answered.
pub async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = [0u8; 12];
    tcp.read_exact(&mut buf).await.ok()?;
    std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
}

pub async fn musubi(
    cp: &ControlPlane,
    b: Backend,
    server: &ProxyPorts,
) -> Result<(System, Vec<Duration>)> {
    let client = ProxyPorts::on("127.0.0.11").await?;
    let apps = format!("{},{},{}", b.http, b.grpc, b.tcp);
    let (server_child, t1) = cp.proxy("server", server, &apps).await?;
    let (client_child, t2) = cp.proxy("client", &client, "1").await?;
    let proxies = vec![
        ("client".to_string(), client_child.id().unwrap_or(0)),
        ("server".to_string(), server_child.id().unwrap_or(0)),
    ];
    let outbound = format!("{}:{}", client.ip, client.outbound);
    Ok((
        System {
            which: Which::Musubi,
            targets: Targets {
                http: outbound.clone(),
                http_authority: "backend.bench:80".into(),
                grpc: outbound.clone(),
                grpc_authority: "grpc.bench:81".into(),
                routed: outbound.clone(),
                routed_authority: routed::MUSUBI_AUTHORITY.into(),
                tcp: outbound,
                tcp_connect: Some("tcp.bench:82".into()),
            },
            proxies,
            client_admin: Some(format!("{}:{}", client.ip, client.admin).parse()?),
            _children: vec![client_child, server_child],
            _envoys: vec![],
        },
        vec![t1, t2],
    ))
}

pub async fn envoy(cp: &ControlPlane, b: Backend) -> Result<(System, Duration)> {
    let ca = &cp.identity.ca;
    let client_svid = ca.svid(&ca.id("bench", "client"));
    let server_svid = ca.svid(&ca.id("bench", "server"));
    let anchors = ca.bundle.to_pem();
    let server_http = free_port("127.0.0.14").await?;
    let server_tcp = free_port("127.0.0.14").await?;
    let started = Instant::now();
    let server = Envoy::start(
        &super::envoy_config::server(server_http, server_tcp, b),
        &[
            ("svid.crt", &server_svid.chain_pem()),
            ("svid.key", &server_svid.key_pem()),
            ("ca.crt", &anchors),
        ],
    )
    .await;
    let ready = started.elapsed();
    let client_http = free_port("127.0.0.13").await?;
    let client_tcp = free_port("127.0.0.13").await?;
    let client = Envoy::start(
        &super::envoy_config::client(client_http, client_tcp, server_http, server_tcp),
        &[
            ("svid.crt", &client_svid.chain_pem()),
            ("svid.key", &client_svid.key_pem()),
            ("ca.crt", &anchors),
        ],
    )
    .await;
    let proxies = vec![
        ("client".to_string(), client.pid()),
        ("server".to_string(), server.pid()),
    ];
    for (_, pid) in &proxies {
        crate::sys::pin(*pid, PROXY_CPUS);
    }
    let client_admin: SocketAddr = client
        .admin
        .parse()
        .with_context(|| format!("Envoy's admin address {:?}", client.admin))?;
    Ok((
        System {
            which: Which::Envoy,
            targets: Targets {
                http: format!("127.0.0.13:{client_http}"),
                http_authority: "backend.bench".into(),
                grpc: format!("127.0.0.13:{client_http}"),
                grpc_authority: "grpc.bench".into(),
                routed: format!("127.0.0.13:{client_http}"),
                routed_authority: routed::ENVOY_AUTHORITY.into(),
                tcp: format!("127.0.0.13:{client_tcp}"),
                tcp_connect: None,
            },
            proxies,
            client_admin: Some(client_admin),
            _children: vec![],
            _envoys: vec![client, server],
        },
        ready,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The controller takes the generated mesh file, routes and all (it refuses a bad one).
    #[tokio::test]
    async fn the_mesh_file_is_accepted() {
        let b = Backend {
            http: 10001,
            grpc: 10002,
            tcp: 10003,
        };
        let identity = Identity::start().await;
        let yaml = mesh_yaml(b, 10004);
        let _controller = Controller::start(&identity, &yaml).await;
        assert!(yaml.contains("name: routed-b") && yaml.contains("\nroutes:\n"));
    }
}
