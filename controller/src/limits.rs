//! Caps on what one client can make the controller hold: concurrent streams per client (a
//! workload identity from one address, i.e. one pod: replicas of a Deployment share an
//! identity, not an address), and the size of what a request names. A stream holds its slot
//! until it ends, however it ends (the client cancels it, drops the connection, or the
//! controller stops).

use musubi_identity::SpiffeId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tonic::Status;

pub const DEFAULT_DISCOVERY_STREAMS_PER_CLIENT: usize = 1024;
pub const DEFAULT_POLICY_STREAMS_PER_CLIENT: usize = 8;
pub const DEFAULT_MAX_TARGET_BYTES: usize = 512;
/// A Kubernetes namespace name is at most 63 characters.
pub const MAX_NAMESPACE_BYTES: usize = 63;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// Concurrent `Discovery/Watch` streams per client.
    pub discovery_per_client: usize,
    /// Concurrent `Policy/Watch` streams per client.
    pub policy_per_client: usize,
    /// Longest `WatchRequest.target`, in bytes.
    pub max_target_bytes: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            discovery_per_client: DEFAULT_DISCOVERY_STREAMS_PER_CLIENT,
            policy_per_client: DEFAULT_POLICY_STREAMS_PER_CLIENT,
            max_target_bytes: DEFAULT_MAX_TARGET_BYTES,
        }
    }
}

impl StreamLimits {
    /// HTTP/2 concurrent streams per connection: above what one client may hold, so a client
    /// meets the per-client cap (and its clear refusal) before the connection's silent one.
    pub fn per_connection(&self) -> u32 {
        let n = self
            .discovery_per_client
            .saturating_add(self.policy_per_client)
            .saturating_add(16);
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamKind {
    Discovery,
    Policy,
}

impl StreamKind {
    pub fn label(self) -> &'static str {
        match self {
            StreamKind::Discovery => "discovery",
            StreamKind::Policy => "policy",
        }
    }
}

/// Why a stream was refused (a bounded label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    PerClientLimit,
    TargetTooLong,
    InvalidTarget,
    InvalidNamespace,
    Unauthenticated,
}

impl Refused {
    pub fn label(self) -> &'static str {
        match self {
            Refused::PerClientLimit => "per_client_limit",
            Refused::TargetTooLong => "target_too_long",
            Refused::InvalidTarget => "invalid_target",
            Refused::InvalidNamespace => "invalid_namespace",
            Refused::Unauthenticated => "unauthenticated",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub stream: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub stream: &'static str,
    pub reason: &'static str,
}

/// The streams' metrics (cheap to clone: shared families).
#[derive(Clone, Default)]
pub struct StreamMetrics {
    pub open: Family<StreamLabel, Gauge>,
    pub refused: Family<RefusedLabels, Counter>,
}

impl StreamMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "musubi_controller_streams_open",
            "Discovery and policy streams open now, by stream",
            self.open.clone(),
        );
        registry.register(
            "musubi_controller_streams_refused",
            "Streams refused, by stream and reason (per_client_limit, target_too_long, invalid_target, invalid_namespace, unauthenticated)",
            self.refused.clone(),
        );
    }

    pub fn count_refusal(&self, kind: StreamKind, why: Refused) {
        self.refused
            .get_or_create(&RefusedLabels {
                stream: kind.label(),
                reason: why.label(),
            })
            .inc();
    }
}

/// One client, as the caps count it.
pub type Client = (SpiffeId, Option<IpAddr>);

/// Who holds how many streams.
pub struct Slots {
    limits: StreamLimits,
    metrics: StreamMetrics,
    held: Mutex<HashMap<(StreamKind, Client), usize>>,
}

/// A stream's place; given back when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    key: (StreamKind, Client),
}

impl Slots {
    pub fn new(limits: StreamLimits, metrics: StreamMetrics) -> Arc<Slots> {
        Arc::new(Slots {
            limits,
            metrics,
            held: Mutex::new(HashMap::new()),
        })
    }

    pub fn limits(&self) -> &StreamLimits {
        &self.limits
    }

    pub fn metrics(&self) -> &StreamMetrics {
        &self.metrics
    }

    /// A slot for one more `kind` stream of `client`, or RESOURCE_EXHAUSTED saying the limit.
    pub fn acquire(self: &Arc<Self>, kind: StreamKind, client: Client) -> Result<Slot, Status> {
        let limit = match kind {
            StreamKind::Discovery => self.limits.discovery_per_client,
            StreamKind::Policy => self.limits.policy_per_client,
        };
        let key = (kind, client);
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let n = held.entry(key.clone()).or_insert(0);
            if *n >= limit {
                drop(held);
                self.metrics.count_refusal(kind, Refused::PerClientLimit);
                let from = key.1.1.map(|ip| format!(" from {ip}")).unwrap_or_default();
                return Err(Status::resource_exhausted(format!(
                    "{} already holds {limit} {} streams{from}, the limit per client; close some first",
                    key.1.0,
                    kind.label()
                )));
            }
            *n += 1;
        }
        self.metrics
            .open
            .get_or_create(&StreamLabel {
                stream: kind.label(),
            })
            .inc();
        Ok(Slot {
            slots: self.clone(),
            key,
        })
    }

    /// Streams `client` holds now.
    pub fn held(&self, kind: StreamKind, client: &Client) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(&(kind, client.clone())).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
        drop(held);
        self.slots
            .metrics
            .open
            .get_or_create(&StreamLabel {
                stream: self.key.0.label(),
            })
            .dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cap_each_client_and_come_back() {
        let metrics = StreamMetrics::default();
        let slots = Slots::new(
            StreamLimits {
                discovery_per_client: 2,
                policy_per_client: 1,
                ..StreamLimits::default()
            },
            metrics.clone(),
        );
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap();
        let a: Client = (id.clone(), Some("10.0.0.1".parse().unwrap()));
        let b: Client = (id.clone(), Some("10.0.0.2".parse().unwrap()));
        let d1 = slots.acquire(StreamKind::Discovery, a.clone()).unwrap();
        let _d2 = slots.acquire(StreamKind::Discovery, a.clone()).unwrap();
        let e = slots
            .acquire(StreamKind::Discovery, a.clone())
            .err()
            .unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("2 discovery streams"),
            "{}",
            e.message()
        );
        // Another replica (same identity, another address) has slots of its own; so do
        // policy streams.
        let _b1 = slots.acquire(StreamKind::Discovery, b.clone()).unwrap();
        let _p1 = slots.acquire(StreamKind::Policy, a.clone()).unwrap();
        assert!(slots.acquire(StreamKind::Policy, a.clone()).is_err());
        let open = |k: StreamKind| {
            metrics
                .open
                .get_or_create(&StreamLabel { stream: k.label() })
                .get()
        };
        assert_eq!(open(StreamKind::Discovery), 3);
        assert_eq!(open(StreamKind::Policy), 1);
        drop(d1);
        assert_eq!(slots.held(StreamKind::Discovery, &a), 1);
        assert_eq!(open(StreamKind::Discovery), 2);
        let _again = slots.acquire(StreamKind::Discovery, a.clone()).unwrap();
        let refused = metrics
            .refused
            .get_or_create(&RefusedLabels {
                stream: "discovery",
                reason: "per_client_limit",
            })
            .get();
        assert_eq!(refused, 1);
    }

    #[test]
    fn metric_names() {
        let metrics = StreamMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.count_refusal(StreamKind::Discovery, Refused::TargetTooLong);
        metrics
            .open
            .get_or_create(&StreamLabel { stream: "policy" })
            .inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "musubi_controller_streams_refused_total{stream=\"discovery\",reason=\"target_too_long\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("musubi_controller_streams_open{stream=\"policy\"} 1"),
            "{text}"
        );
    }
}
