//! Streams from the controller: discovery (per destination) and inbound policy. Each is a
//! watch that keeps the last good snapshot when the controller is unreachable, reconnects with
//! backoff, and takes the controller's fresh snapshot on reconnect.

use crate::destination::{self, Destination};
use crate::policy::InboundPolicy;
use hyper_util::rt::TokioIo;
use musubi_identity::tls::{self, ServerIdentity};
use musubi_identity::{CredentialStore, SpiffeId, TrustBundle};
use musubi_proto::discovery::v1::{WatchRequest, discovery_client::DiscoveryClient};
use musubi_proto::policy::v1::{PolicyRequest, policy_client::PolicyClient};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint, Uri};

/// How long a request waits for the first answer about a destination it has never seen.
const FIRST_ANSWER: Duration = Duration::from_secs(3);

/// A lazily connected mTLS channel to the controller, presenting our SVID.
pub fn channel(
    addr: &str,
    bundle: &TrustBundle,
    store: Arc<CredentialStore>,
    controller: SpiffeId,
) -> Result<Channel, String> {
    let config = tls::client_config(
        Some(store),
        bundle,
        ServerIdentity::Exactly(controller),
        &[b"h2"],
    )
    .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let target = addr.to_string();
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("controller address {addr:?}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let connect = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let target = target.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(tls::mesh_server_name(), tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connect))
}

/// What is known about a destination.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Not a meshed service: forward as-is.
    Unknown,
    Meshed(Arc<Destination>),
}

#[derive(Debug, thiserror::Error)]
#[error("discovery has no answer for {0} yet (controller unreachable?)")]
pub struct NoAnswer(pub String);

type Watches = Mutex<HashMap<String, watch::Receiver<Option<Resolution>>>>;

/// Resolves destinations through the controller's discovery streams, or from a fixed table.
pub enum Resolver {
    Controller {
        channel: Channel,
        context_namespace: String,
        watches: Arc<Watches>,
    },
    Fixed(HashMap<String, Arc<Destination>>),
}

impl Resolver {
    pub fn controller(channel: Channel, context_namespace: String) -> Self {
        Resolver::Controller {
            channel,
            context_namespace,
            watches: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    pub async fn resolve(&self, target: &str) -> Result<Resolution, NoAnswer> {
        let (channel, ns, watches) = match self {
            Resolver::Fixed(table) => {
                return Ok(table
                    .get(target)
                    .map(|d| Resolution::Meshed(d.clone()))
                    .unwrap_or(Resolution::Unknown));
            }
            Resolver::Controller {
                channel,
                context_namespace,
                watches,
            } => (channel, context_namespace, watches),
        };
        let mut rx = {
            let mut map = watches.lock().map_err(|_| NoAnswer(target.into()))?;
            match map.get(target) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(target.to_string(), rx.clone());
                    tokio::spawn(watch_destination(
                        channel.clone(),
                        target.to_string(),
                        ns.clone(),
                        tx,
                    ));
                    rx
                }
            }
        };
        // Known already (every request after the first): no timer to arm.
        if let Some(r) = rx.borrow().as_ref() {
            return Ok(r.clone());
        }
        let answer = tokio::time::timeout(FIRST_ANSWER, rx.wait_for(Option::is_some)).await;
        match answer {
            Ok(Ok(r)) => r.clone().ok_or_else(|| NoAnswer(target.into())),
            _ => Err(NoAnswer(target.into())),
        }
    }

    /// Every destination resolved so far (for `/debug/config`).
    pub fn snapshot(&self) -> Vec<(String, Option<Resolution>)> {
        match self {
            Resolver::Fixed(t) => t
                .iter()
                .map(|(k, v)| (k.clone(), Some(Resolution::Meshed(v.clone()))))
                .collect(),
            Resolver::Controller { watches, .. } => watches
                .lock()
                .map(|m| {
                    m.iter()
                        .map(|(k, rx)| (k.clone(), rx.borrow().clone()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1 << attempt.min(8))
        .min(Duration::from_secs(10));
    base.mul_f64(0.5 + 0.5 * fastrand::f64())
}

async fn watch_destination(
    channel: Channel,
    target: String,
    context_namespace: String,
    tx: watch::Sender<Option<Resolution>>,
) {
    let mut client = DiscoveryClient::new(channel);
    let mut attempt = 0u32;
    loop {
        let req = WatchRequest {
            target: target.clone(),
            context_namespace: context_namespace.clone(),
        };
        match client.watch(req).await {
            Ok(resp) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(update)) => {
                            attempt = 0;
                            match destination::from_update(&update) {
                                Ok(None) => {
                                    tx.send_replace(Some(Resolution::Unknown));
                                }
                                Ok(Some(d)) => {
                                    tx.send_replace(Some(Resolution::Meshed(Arc::new(d))));
                                }
                                Err(e) => {
                                    tracing::warn!(%target, error = %e, "refused a malformed discovery update; keeping the last good one");
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%target, %status, "discovery stream ended");
                            break;
                        }
                    }
                }
            }
            Err(status) => tracing::debug!(%target, %status, "discovery watch failed"),
        }
        tokio::time::sleep(backoff(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

/// Follows this workload's inbound policy. Until the first answer, and with no controller, the
/// policy is the mesh default: STRICT, any authenticated client.
pub fn watch_policy(
    channel: Option<Channel>,
    ports: Vec<u16>,
) -> watch::Receiver<Arc<InboundPolicy>> {
    let (tx, rx) = watch::channel(Arc::new(InboundPolicy::default()));
    if let Some(channel) = channel {
        tokio::spawn(async move {
            let mut client = PolicyClient::new(channel);
            let mut attempt = 0u32;
            loop {
                let req = PolicyRequest {
                    ports: ports.iter().map(|p| u32::from(*p)).collect(),
                };
                match client.watch(req).await {
                    Ok(resp) => {
                        let mut stream = resp.into_inner();
                        while let Ok(Some(p)) = stream.message().await {
                            attempt = 0;
                            match InboundPolicy::try_from(&p) {
                                Ok(p) => {
                                    tx.send_replace(Arc::new(p));
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "refused a malformed policy; keeping the last good one")
                                }
                            }
                        }
                    }
                    Err(status) => tracing::debug!(%status, "policy watch failed"),
                }
                tokio::time::sleep(backoff(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
        });
    }
    rx
}
