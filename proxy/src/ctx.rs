//! What every connection handler needs, shared behind one `Arc`.

use crate::config::Config;
use crate::control::Resolver;
use crate::destination::{Destination, Endpoint};
use crate::drain::Drain;
use crate::http::Body;
use crate::local::LocalHttp1;
use crate::metrics::Metrics;
use crate::policy::InboundPolicy;
use crate::pool::{Connector, H2Pool};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use musubi_identity::{CredentialStore, TrustBundle};
use std::sync::Arc;
use tokio::sync::watch;

pub type AppClient = Client<HttpConnector, Body>;

pub struct Ctx {
    pub config: Config,
    pub bundle: TrustBundle,
    pub store: Arc<CredentialStore>,
    pub resolver: Resolver,
    pub policy: watch::Receiver<Arc<InboundPolicy>>,
    pub connector: Arc<Connector>,
    pub pool: H2Pool,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    /// HTTP/1.1 to destinations outside the mesh.
    pub http1: AppClient,
    /// HTTP/1.1 to the local application.
    pub local: Arc<LocalHttp1>,
    /// HTTP/2 (prior knowledge) to the local application.
    pub http2: AppClient,
    /// Ports of the proxy itself, never valid as application ports.
    pub own_ports: Vec<u16>,
}

pub fn app_clients() -> (AppClient, AppClient) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let http1 = Client::builder(TokioExecutor::new()).build(connector.clone());
    let http2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector);
    (http1, http2)
}

/// Picks an endpoint, weighted at random among those with an identity.
pub fn pick(dest: &Destination) -> Option<&Endpoint> {
    let total: u64 = dest.endpoints.iter().map(|e| u64::from(e.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut n = fastrand::u64(..total);
    for e in &dest.endpoints {
        let w = u64::from(e.weight);
        if n < w {
            return Some(e);
        }
        n -= w;
    }
    dest.endpoints.last()
}

impl Ctx {
    /// Whether an inbound connection may be forwarded to application port `port`.
    pub fn app_port_allowed(&self, port: u16) -> bool {
        if self.own_ports.contains(&port) {
            return false;
        }
        match self.config.mode {
            crate::config::CaptureMode::Explicit => self.config.app_ports.contains(&port),
            crate::config::CaptureMode::Transparent => true,
        }
    }
}
