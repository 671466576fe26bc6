//! Streams from the controller: discovery (per destination) and inbound policy. Each is a
//! watch that keeps the last good snapshot when the controller is unreachable, reconnects with
//! backoff, and takes the controller's fresh snapshot on reconnect.

use crate::destination::{self, Destination};
use crate::metrics::{EvictionLabels, Metrics};
use crate::policy::InboundPolicy;
use hyper_util::rt::TokioIo;
use musubi_identity::tls::{self, ServerIdentity};
use musubi_identity::{CredentialStore, SpiffeId, TrustBundle};
use musubi_proto::discovery::v1::{WatchRequest, discovery_client::DiscoveryClient};
use musubi_proto::policy::v1::{PolicyRequest, policy_client::PolicyClient};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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

/// One destination being watched.
struct Watch {
    rx: watch::Receiver<Option<Resolution>>,
    last_used: Instant,
    task: tokio::task::AbortHandle,
}

/// The destinations watched through the controller, at most `max` at once: every distinct
/// authority (explicit mode) or original `ip:port` (transparent mode) would otherwise add a
/// watch for the life of the process, so a port scan from the application could open 65k
/// controller streams. The least recently used watch makes room for a new one, and a watch
/// unused for `idle` is dropped; either comes back on the next request for it.
pub struct Watches {
    map: Mutex<HashMap<String, Watch>>,
    max: usize,
    idle: Duration,
    metrics: Arc<Metrics>,
}

impl Watches {
    fn evict(&self, map: &mut HashMap<String, Watch>, key: &str, reason: &'static str) {
        if let Some(w) = map.remove(key) {
            w.task.abort();
            self.metrics
                .discovery_evictions
                .get_or_create(&EvictionLabels { reason })
                .inc();
        }
    }

    /// Drops the watches not used for `idle`.
    fn sweep(&self, now: Instant) {
        let Ok(mut map) = self.map.lock() else { return };
        let stale: Vec<String> = map
            .iter()
            .filter(|(_, w)| now.duration_since(w.last_used) >= self.idle)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.evict(&mut map, &k, "idle");
        }
        self.metrics.discovery_watches.set(map.len() as i64);
    }
}

/// The key of the least recently used entry: what makes room for a new one.
fn least_recently_used<'a>(entries: impl Iterator<Item = (&'a String, Instant)>) -> Option<String> {
    entries.min_by_key(|(_, t)| *t).map(|(k, _)| k.clone())
}

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
    /// Watches destinations through `channel`, at most `max` at once, each dropped after
    /// `idle` without use.
    pub fn controller(
        channel: Channel,
        context_namespace: String,
        max: usize,
        idle: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let watches = Arc::new(Watches {
            map: Mutex::new(HashMap::new()),
            max: max.max(1),
            idle,
            metrics,
        });
        let sweeper = Arc::downgrade(&watches);
        let every = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(60));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(w) = sweeper.upgrade() else { return };
                w.sweep(Instant::now());
            }
        });
        Resolver::Controller {
            channel,
            context_namespace,
            watches,
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
            let mut map = watches.map.lock().map_err(|_| NoAnswer(target.into()))?;
            let now = Instant::now();
            match map.get_mut(target) {
                Some(w) => {
                    w.last_used = now;
                    w.rx.clone()
                }
                None => {
                    if map.len() >= watches.max
                        && let Some(oldest) =
                            least_recently_used(map.iter().map(|(k, w)| (k, w.last_used)))
                    {
                        watches.evict(&mut map, &oldest, "capacity");
                    }
                    let (tx, rx) = watch::channel(None);
                    let task = tokio::spawn(watch_destination(
                        channel.clone(),
                        target.to_string(),
                        ns.clone(),
                        tx,
                    ));
                    map.insert(
                        target.to_string(),
                        Watch {
                            rx: rx.clone(),
                            last_used: now,
                            task: task.abort_handle(),
                        },
                    );
                    watches.metrics.discovery_watches.set(map.len() as i64);
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
                .map
                .lock()
                .map(|m| {
                    m.iter()
                        .map(|(k, w)| (k.clone(), w.rx.borrow().clone()))
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
                                    for e in d.routes.errors.iter() {
                                        tracing::warn!(%target, error = %e, "left out a route rule that does not compile; the others route");
                                    }
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

/// Follows this workload's inbound policy. `None` until the controller's first answer: inbound
/// serves nothing before it (fail closed); after it, the last policy survives controller
/// outages. Without a controller the policy is the mesh default (STRICT, any authenticated
/// client) from the start.
pub fn watch_policy(
    channel: Option<Channel>,
    ports: Vec<u16>,
    metrics: Arc<Metrics>,
) -> watch::Receiver<Option<Arc<InboundPolicy>>> {
    let Some(channel) = channel else {
        return watch::channel(Some(Arc::new(InboundPolicy::default()))).1;
    };
    let (tx, rx) = watch::channel(None);
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
                        let policy = InboundPolicy::from(&p);
                        for e in &policy.dropped {
                            tracing::warn!(error = %e, "dropped an authorization rule the proxy cannot use; the port allows fewer clients");
                        }
                        metrics
                            .policy_rules_dropped
                            .inc_by(policy.dropped.len() as u64);
                        if tx.borrow().is_none() {
                            tracing::info!(
                                version = policy.version,
                                "received the first inbound policy"
                            );
                        }
                        tx.send_replace(Some(Arc::new(policy)));
                    }
                }
                Err(status) => {
                    if tx.borrow().is_none() {
                        tracing::warn!(%status, "no inbound policy yet; inbound connections are refused until it arrives");
                    } else {
                        tracing::debug!(%status, "policy watch failed");
                    }
                }
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_entry_makes_room() {
        let t0 = Instant::now();
        let keys = ["a:80".to_string(), "b:80".to_string(), "c:80".to_string()];
        let entries = [
            (&keys[0], t0 + Duration::from_secs(5)),
            (&keys[1], t0),
            (&keys[2], t0 + Duration::from_secs(9)),
        ];
        assert_eq!(
            least_recently_used(entries.iter().map(|(k, t)| (*k, *t))),
            Some("b:80".to_string())
        );
        assert_eq!(least_recently_used(std::iter::empty()), None);
    }
}
