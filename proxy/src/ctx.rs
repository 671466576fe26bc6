//! What every connection handler needs, shared behind one `Arc`.

use crate::config::Config;
use crate::control::Resolver;
use crate::destination::{Destination, Endpoint};
use crate::drain::Drain;
use crate::http::Body;
use crate::local::LocalHttp1;
use crate::metrics::Metrics;
use crate::own::OwnAddrs;
use crate::policy::{InboundPolicy, PortProtocol};
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
    /// `None` until the first policy arrives: inbound refuses everything until then.
    pub policy: watch::Receiver<Option<Arc<InboundPolicy>>>,
    pub connector: Arc<Connector>,
    pub pool: H2Pool,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    /// HTTP/1.1 to destinations outside the mesh.
    pub http1: AppClient,
    /// HTTP/1.1 to the local application.
    pub local: Arc<LocalHttp1>,
    /// HTTP/2 (prior knowledge) to the local application.
    pub http2: Arc<crate::local::LocalHttp2>,
    /// The proxy's own listeners: never a destination (loops), never an application port.
    pub own: OwnAddrs,
}

/// HTTP/1.1 to destinations outside the mesh.
pub fn passthrough_client() -> AppClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
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
    /// The policy in force, or `None` before the first one arrived.
    pub fn policy(&self) -> Option<Arc<InboundPolicy>> {
        self.policy.borrow().clone()
    }

    /// Whether inbound traffic may be forwarded to application port `port`: only the
    /// workload's declared ports (`MUSUBI_PROXY_APP_PORTS` and every port the policy lists),
    /// never the proxy's own. A loopback-only listener in the pod (an agent on 127.0.0.1:8200)
    /// is not declared, so no mesh identity reaches it.
    pub fn declared(&self, policy: &InboundPolicy, port: u16) -> bool {
        !self.own.is_own_port(port)
            && (self.config.app_ports.contains(&port) || policy.ports.contains_key(&port))
    }

    /// What the application speaks on `port`: what the policy declares, else opaque for the
    /// configured opaque ports (`MUSUBI_PROXY_OPAQUE_PORTS`), else detected.
    pub fn protocol(&self, policy: &InboundPolicy, port: u16) -> PortProtocol {
        match policy.ports.get(&port).map(|p| p.protocol) {
            Some(declared) if declared != PortProtocol::Detect => declared,
            _ if self.config.opaque_ports.contains(&port) => PortProtocol::Opaque,
            _ => PortProtocol::Detect,
        }
    }
}
