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
        }],
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
    let env: HashMap<&str, &str> = HashMap::from([
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
    let cfg = Config::from_source(&env).expect("proxy config");
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
            fixed_destinations: Some(setup.destinations),
            fixed_policy: setup.policy,
        },
    )
    .await
    .expect("proxy starts");
    assert!(
        run::wait_ready(running.admin, Duration::from_secs(20)).await,
        "proxy {ns}/{sa} never became ready"
    );
    Proxy {
        running,
        id: identity.id(ns, sa),
        _dir: dir,
    }
}
