//! Proxies for the mesh tests: real `musubi-proxy` instances in explicit mode on 127.0.0.1,
//! with certificates from a real identity service. Discovery and policy come from a fixed
//! table here (standing in for the controller, which has its own tests).

use crate::Identity;
use musubi_identity::SpiffeId;
use musubi_identity::client::{self, RemoteCertSource, TokenSource};
use musubi_proxy::config::{self, Config};
use musubi_proxy::destination::{Destination, Endpoint, Protocol, Transport};
use musubi_proxy::policy::InboundPolicy;
use musubi_proxy::run::{self, Running, StartOptions};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub struct Proxy {
    pub running: Running,
    pub id: SpiffeId,
    _dir: tempfile::TempDir,
}

impl Proxy {
    pub fn admin(&self) -> String {
        self.running.admin.to_string()
    }

    pub async fn metrics(&self) -> String {
        crate::http_get(&self.admin(), "/metrics").await
    }
}

/// What a proxy under test knows.
#[derive(Default)]
pub struct Setup {
    pub app_ports: Vec<u16>,
    pub destinations: HashMap<String, Arc<Destination>>,
    pub policy: Option<InboundPolicy>,
    /// Watch this controller (address, identity) instead of the fixed tables.
    pub controller: Option<(std::net::SocketAddr, SpiffeId)>,
    /// More `MUSUBI_PROXY_*` settings (limits, timeouts), over the defaults here.
    pub env: Vec<(&'static str, String)>,
    /// Do not wait for `/ready` (for tests of what happens before it).
    pub no_wait: bool,
}

/// A destination served by one proxy's inbound listener.
pub fn destination(authority: &str, server: &Proxy, app_port: u16) -> Arc<Destination> {
    destination_as(authority, server, app_port, server.id.clone())
}

/// Like [`destination`], but discovery claims the endpoint is `identity`.
pub fn destination_as(
    authority: &str,
    server: &Proxy,
    app_port: u16,
    identity: SpiffeId,
) -> Arc<Destination> {
    Arc::new(Destination {
        authority: authority.to_string(),
        protocol: Protocol::Detect,
        endpoints: vec![Endpoint {
            connect: server.running.inbound,
            app_port,
            identity: Some(identity),
            weight: 1,
            transport: Transport::Musubi,
            plaintext_allowed: false,
        }],
        routes: Default::default(),
        version: 1,
    })
}

pub async fn proxy(identity: &Identity, ns: &str, sa: &str, setup: Setup) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let anchors = dir.path().join("anchors.pem");
    std::fs::write(&anchors, identity.ca.bundle.to_pem()).unwrap();
    let ports = setup
        .app_ports
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let anchors_s = anchors.display().to_string();
    let identity_addr = identity.addr();
    let (controller_addr, controller_id) = match &setup.controller {
        Some((a, id)) => (a.to_string(), id.to_string()),
        None => (String::new(), String::new()),
    };
    let mut env: HashMap<&str, &str> = HashMap::from([
        (config::INBOUND_LISTEN, "127.0.0.1:0"),
        (config::OUTBOUND_LISTEN, "127.0.0.1:0"),
        (config::ADMIN_LISTEN, "127.0.0.1:0"),
        (config::CAPTURE_MODE, "explicit"),
        (
            config::APP_PORTS,
            if ports.is_empty() {
                "1"
            } else {
                ports.as_str()
            },
        ),
        (config::TRUST_ANCHORS, anchors_s.as_str()),
        (config::NAMESPACE, ns),
        (config::SERVICE_ACCOUNT, sa),
        (config::TOKEN_FILE, "/nonexistent"),
        (config::IDENTITY_ADDR, identity_addr.as_str()),
        (config::IDENTITY_NAMESPACE, "musubi"),
        (config::DRAIN_TIMEOUT, "5s"),
    ]);
    if setup.controller.is_some() {
        env.insert(config::CONTROLLER_ADDR, controller_addr.as_str());
        env.insert(config::CONTROLLER_IDENTITY, controller_id.as_str());
    }
    for (k, v) in &setup.env {
        env.insert(k, v.as_str());
    }
    let cfg = Config::from_source(&env).expect("proxy config");
    let fixed = setup.controller.is_none();
    let token = identity
        .tokens
        .mint(ns, sa, Duration::from_secs(3600))
        .unwrap();
    let channel = client::connect(
        &identity.addr(),
        &identity.ca.bundle,
        identity.service.id.clone(),
    )
    .unwrap();
    let source = Arc::new(RemoteCertSource::new(channel, TokenSource::Fixed(token)));
    let running = run::start(
        cfg,
        StartOptions {
            cert_source: Some(source),
            fixed_destinations: fixed.then_some(setup.destinations),
            fixed_policy: setup.policy,
        },
    )
    .await
    .expect("proxy starts");
    assert!(
        setup.no_wait || run::wait_ready(running.admin, Duration::from_secs(20)).await,
        "proxy {ns}/{sa} never became ready"
    );
    Proxy {
        running,
        id: identity.id(ns, sa),
        _dir: dir,
    }
}

/// A real controller serving a mesh file, with an SVID from the identity service.
pub struct Controller {
    pub running: Option<musubi_controller::RunningController>,
    pub source: Arc<musubi_controller::file::FileSource>,
    pub path: std::path::PathBuf,
    pub id: SpiffeId,
    pub addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Controller {
    pub async fn start(identity: &Identity, yaml: &str) -> Controller {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(identity, yaml, listener).await
    }

    /// Like [`Controller::start`], serving on a listener the caller bound.
    pub async fn start_on(
        identity: &Identity,
        yaml: &str,
        listener: tokio::net::TcpListener,
    ) -> Controller {
        let store = identity.svid("musubi", "musubi-controller").await;
        Self::start_with_svid(identity, yaml, listener, store)
    }

    /// Like [`Controller::start_on`], with an SVID the caller obtained.
    pub fn start_with_svid(
        identity: &Identity,
        yaml: &str,
        listener: tokio::net::TcpListener,
        store: Arc<musubi_identity::CredentialStore>,
    ) -> Controller {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, yaml).unwrap();
        let source = musubi_controller::file::FileSource::load(&path).expect("mesh file loads");
        let addr = listener.local_addr().unwrap();
        let mut c = Controller {
            running: None,
            source,
            path,
            id: identity.id("musubi", "musubi-controller"),
            addr,
            _dir: dir,
        };
        c.serve_with(identity, listener, store);
        c
    }

    async fn serve(&mut self, identity: &Identity, listener: tokio::net::TcpListener) {
        let store = identity.svid("musubi", "musubi-controller").await;
        self.serve_with(identity, listener, store);
    }

    fn serve_with(
        &mut self,
        identity: &Identity,
        listener: tokio::net::TcpListener,
        store: Arc<musubi_identity::CredentialStore>,
    ) {
        let running = musubi_controller::start(musubi_controller::ControllerConfig {
            source: self.source.clone(),
            bundle: identity.ca.bundle.clone(),
            store,
            listener,
            streams: Default::default(),
        })
        .expect("controller starts");
        self.running = Some(running);
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Starts serving again on the same address.
    pub async fn restart(&mut self, identity: &Identity) {
        self.stop().await;
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve(identity, listener).await;
    }

    /// Rewrites the mesh file and has the source pick it up now.
    pub async fn edit(&self, yaml: &str) -> Result<bool, musubi_controller::file::ConfigError> {
        std::fs::write(&self.path, yaml).unwrap();
        self.source.poll().await
    }

    pub fn endpoint(&self) -> (std::net::SocketAddr, SpiffeId) {
        (self.addr, self.id.clone())
    }
}

/// A `musubi-proxy` process (the real binary) in explicit mode on 127.0.0.1, with a token file
/// for the identity service: for what only a process shows (signals, exit codes).
pub struct ProxyProcess {
    pub child: crate::netns::Child,
    pub inbound: std::net::SocketAddr,
    pub outbound: std::net::SocketAddr,
    pub admin: std::net::SocketAddr,
    pub id: SpiffeId,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.0.id() as i32)
    }

    pub async fn metrics(&self) -> String {
        crate::http_get(&self.admin.to_string(), "/metrics").await
    }
}

pub async fn proxy_process(
    identity: &Identity,
    ns: &str,
    sa: &str,
    app_ports: &[u16],
    env: &[(&str, &str)],
) -> ProxyProcess {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let anchors = dir.path().join("anchors.pem");
    std::fs::write(&anchors, identity.ca.bundle.to_pem()).unwrap();
    let token = dir.path().join("token");
    let jwt = identity
        .tokens
        .mint(ns, sa, Duration::from_secs(3600))
        .unwrap();
    std::fs::write(&token, jwt).unwrap();
    let ports: Vec<String> = app_ports.iter().map(u16::to_string).collect();
    let mut cmd = std::process::Command::new(crate::netns::proxy_binary());
    cmd.env(config::INBOUND_LISTEN, "127.0.0.1:0")
        .env(config::OUTBOUND_LISTEN, "127.0.0.1:0")
        .env(config::ADMIN_LISTEN, "127.0.0.1:0")
        .env(config::CAPTURE_MODE, "explicit")
        .env(config::APP_PORTS, ports.join(","))
        .env(config::TRUST_ANCHORS, &anchors)
        .env(config::NAMESPACE, ns)
        .env(config::SERVICE_ACCOUNT, sa)
        .env(config::TOKEN_FILE, &token)
        .env(config::IDENTITY_ADDR, identity.addr())
        .env(config::IDENTITY_NAMESPACE, "musubi")
        .env(config::DRAIN_TIMEOUT, "10s")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = crate::netns::Child(cmd.spawn().expect("spawn musubi-proxy"));
    let stdout = child.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    })
    .await
    .unwrap()
    .unwrap();
    let addr = |key: &str| -> std::net::SocketAddr {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .parse()
            .unwrap()
    };
    let (inbound, outbound, admin) = (addr("inbound="), addr("outbound="), addr("admin="));
    assert!(
        run::wait_ready(admin, Duration::from_secs(20)).await,
        "proxy process {ns}/{sa} never became ready"
    );
    ProxyProcess {
        child,
        inbound,
        outbound,
        admin,
        id: identity.id(ns, sa),
        _dir: dir,
    }
}

/// A server proxy for `shop/<server_sa>` in front of `app_port` (set up by `server`, whose
/// `app_ports` is filled in), and a client proxy `shop/web` whose discovery sends `authority`
/// (e.g. `api.shop:80`) to it.
pub async fn pair(
    identity: &Identity,
    server_sa: &str,
    app_port: u16,
    authority: &str,
    server: Setup,
) -> (Proxy, Proxy) {
    let server = proxy(
        identity,
        "shop",
        server_sa,
        Setup {
            app_ports: vec![app_port],
            ..server
        },
    )
    .await;
    let client = proxy(
        identity,
        "shop",
        "web",
        Setup {
            destinations: HashMap::from([(
                authority.to_string(),
                destination(authority, &server, app_port),
            )]),
            ..Setup::default()
        },
    )
    .await;
    (server, client)
}

/// web → api: an HTTP app that reports what it receives (`crate::apps::http`), a server proxy
/// `shop/api` in front of it (set up by `server`) and a client proxy `shop/web` whose discovery
/// sends `api.shop:80` to the server.
pub struct WebApi {
    pub identity: Identity,
    pub app: crate::apps::App,
    pub server: Proxy,
    pub client: Proxy,
}

impl WebApi {
    pub async fn start(server: Setup) -> WebApi {
        let identity = Identity::start().await;
        let app = crate::apps::http().await;
        let (server, client) = pair(&identity, "api", app.port(), "api.shop:80", server).await;
        WebApi {
            identity,
            app,
            server,
            client,
        }
    }
}
