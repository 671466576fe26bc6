//! The proxy's metrics: the dashboard contract. Every name and label is documented in
//! `docs/metrics.md`; keep the two in step.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

mod request;
pub use request::{RequestStats, RouteLabels, classify};

pub const INBOUND: &str = "inbound";
pub const OUTBOUND: &str = "outbound";

/// A label value shared between requests: cloning it counts a reference, it copies nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Label(Arc<str>);

impl Label {
    pub fn new(s: &str) -> Self {
        Label(Arc::from(s))
    }

    pub fn empty() -> Self {
        Label(Arc::from(""))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<Arc<str>> for Label {
    fn from(s: Arc<str>) -> Self {
        Label(s)
    }
}

impl PartialEq<&str> for Label {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(&self.0)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: &'static str,
    pub authority: Label,
    pub peer_identity: Label,
    pub tls: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub direction: &'static str,
    pub authority: Label,
    pub peer_identity: Label,
    pub tls: &'static str,
    pub status_code: &'static str,
    pub classification: &'static str,
    /// Why there is no response from the far side: empty when there is one; `reset` (the
    /// peer reset the stream), `cancelled` (the client gave up first), `timeout`, `unreachable`.
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: &'static str,
    pub authority: Label,
    pub classification: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteRequestLabels {
    pub route: Label,
    pub backend: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteResponseLabels {
    pub route: Label,
    pub backend: Label,
    pub status_code: &'static str,
    pub classification: &'static str,
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLatencyLabels {
    pub route: Label,
    pub backend: Label,
    pub classification: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteEventLabels {
    pub route: Label,
    /// timeouts: `request` or `backend_request`; faults: `delay` or `abort`; mirrors: `sent`,
    /// `unavailable` (the mirror had no endpoint) or `cut` (it fell behind the primary's body).
    pub kind: &'static str,
}

/// Per-route series (outbound). Route and backend names come from configuration; both are
/// capped all the same ([`MAX_ROUTES`], [`MAX_AUTHORITIES`]).
#[derive(Debug)]
pub struct RouteFamilies {
    pub requests: Family<RouteRequestLabels, Counter>,
    pub responses: Family<RouteResponseLabels, Counter>,
    pub latency: Family<RouteLatencyLabels, Histogram>,
    pub timeouts: Family<RouteEventLabels, Counter>,
    pub faults: Family<RouteEventLabels, Counter>,
    pub mirrors: Family<RouteEventLabels, Counter>,
    pub names: LabelCap,
}

impl RouteFamilies {
    pub fn event(
        &self,
        family: &Family<RouteEventLabels, Counter>,
        route: &Label,
        kind: &'static str,
    ) {
        family
            .get_or_create(&RouteEventLabels {
                route: route.clone(),
                kind,
            })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: &'static str,
    pub peer_identity: Label,
    pub tls: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    pub direction: &'static str,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub port: u16,
    pub decision: &'static str,
}

/// The value used for everything a capped label does not name: destinations outside the mesh,
/// authorities that are not a service of this workload, values past a cap.
pub const OTHER: &str = "other";

/// Caps the number of distinct values of a label; the rest become `other`.
#[derive(Debug)]
pub struct LabelCap {
    seen: Mutex<HashSet<Arc<str>>>,
    max: usize,
    other: Label,
}

impl LabelCap {
    pub fn new(max: usize) -> Self {
        LabelCap {
            seen: Mutex::new(HashSet::new()),
            max,
            other: Label::new(OTHER),
        }
    }

    pub fn other(&self) -> Label {
        self.other.clone()
    }

    pub fn label(&self, authority: &str) -> Label {
        let Ok(mut seen) = self.seen.lock() else {
            return self.other.clone();
        };
        if let Some(known) = seen.get(authority) {
            return Label(known.clone());
        }
        if seen.len() < self.max {
            let label: Arc<str> = Arc::from(authority);
            seen.insert(label.clone());
            return Label(label);
        }
        self.other.clone()
    }
}

#[derive(Debug)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub responses: Family<ResponseLabels, Counter>,
    pub latency: Family<LatencyLabels, Histogram>,
    pub tcp_open: Family<TcpLabels, Counter>,
    pub tcp_close: Family<TcpLabels, Counter>,
    pub tcp_active: Family<TcpLabels, Gauge>,
    pub tcp_read_bytes: Family<TcpLabels, Counter>,
    pub tcp_write_bytes: Family<TcpLabels, Counter>,
    pub tls_handshakes: Family<ReasonLabels, Counter>,
    pub tls_failures: Family<ReasonLabels, Counter>,
    pub detections: Family<DetectLabels, Counter>,
    pub detect_seconds: Family<DetectLabels, Histogram>,
    pub authz: Family<AuthzLabels, Counter>,
    pub refused: Family<ReasonLabels, Counter>,
    pub accept_errors: Family<ReasonLabels, Counter>,
    pub discovery_watches: Gauge,
    pub discovery_evictions: Family<EvictionLabels, Counter>,
    pub policy_rules_dropped: Counter,
    pub removed_headers: Family<HeaderLabels, Counter>,
    /// Authorities that are mesh services (outbound) or services of this workload (inbound).
    pub authorities: LabelCap,
    /// Verified client identities (inbound): only mesh members hold one, but keep it bounded.
    pub peers: LabelCap,
    pub route: RouteFamilies,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HeaderLabels {
    pub direction: &'static str,
    pub header: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvictionLabels {
    pub reason: &'static str,
}

/// Distinct values of the capped labels, per proxy (see docs/metrics.md for the worst case).
pub const MAX_AUTHORITIES: usize = 256;
pub const MAX_PEERS: usize = 512;
pub const MAX_ROUTES: usize = 512;

fn latency_histogram() -> Histogram {
    // 0.1 ms .. ~26 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

fn detect_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.00001, 4.0, 12))
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            tcp_open: Family::default(),
            tcp_close: Family::default(),
            tcp_active: Family::default(),
            tcp_read_bytes: Family::default(),
            tcp_write_bytes: Family::default(),
            tls_handshakes: Family::default(),
            tls_failures: Family::default(),
            detections: Family::default(),
            detect_seconds: Family::new_with_constructor(detect_histogram),
            authz: Family::default(),
            refused: Family::default(),
            accept_errors: Family::default(),
            discovery_watches: Gauge::default(),
            discovery_evictions: Family::default(),
            policy_rules_dropped: Counter::default(),
            removed_headers: Family::default(),
            authorities: LabelCap::new(MAX_AUTHORITIES),
            peers: LabelCap::new(MAX_PEERS),
            route: RouteFamilies {
                requests: Family::default(),
                responses: Family::default(),
                latency: Family::new_with_constructor(latency_histogram),
                timeouts: Family::default(),
                faults: Family::default(),
                mirrors: Family::default(),
                names: LabelCap::new(MAX_ROUTES),
            },
        };
        let r = registry;
        r.register(
            "musubi_proxy_requests",
            "HTTP requests received",
            m.requests.clone(),
        );
        r.register(
            "musubi_proxy_responses",
            "HTTP responses sent, by status code and classification",
            m.responses.clone(),
        );
        r.register(
            "musubi_proxy_response_latency_seconds",
            "Time from receiving a request to receiving its response headers",
            m.latency.clone(),
        );
        r.register(
            "musubi_proxy_tcp_open",
            "TCP connections opened",
            m.tcp_open.clone(),
        );
        r.register(
            "musubi_proxy_tcp_close",
            "TCP connections closed",
            m.tcp_close.clone(),
        );
        r.register(
            "musubi_proxy_tcp_active",
            "TCP connections open now",
            m.tcp_active.clone(),
        );
        r.register(
            "musubi_proxy_tcp_read_bytes",
            "Bytes read from the peer of a proxied TCP connection",
            m.tcp_read_bytes.clone(),
        );
        r.register(
            "musubi_proxy_tcp_write_bytes",
            "Bytes written to the peer of a proxied TCP connection",
            m.tcp_write_bytes.clone(),
        );
        r.register(
            "musubi_proxy_tls_handshakes",
            "Completed mesh TLS handshakes",
            m.tls_handshakes.clone(),
        );
        r.register(
            "musubi_proxy_tls_handshake_failures",
            "Failed mesh TLS handshakes, by reason",
            m.tls_failures.clone(),
        );
        r.register(
            "musubi_proxy_protocol_detections",
            "Protocol detection outcomes",
            m.detections.clone(),
        );
        r.register(
            "musubi_proxy_protocol_detection_seconds",
            "Time protocol detection took",
            m.detect_seconds.clone(),
        );
        r.register(
            "musubi_proxy_authz",
            "Inbound authorization decisions",
            m.authz.clone(),
        );
        r.register(
            "musubi_proxy_refused",
            "Connections or requests refused by the proxy, by reason",
            m.refused.clone(),
        );
        r.register(
            "musubi_proxy_accept_errors",
            "Failed accepts on a listener, by reason (resources_exhausted: out of file descriptors or memory)",
            m.accept_errors.clone(),
        );
        r.register(
            "musubi_proxy_discovery_watches",
            "Destinations watched through the controller now",
            m.discovery_watches.clone(),
        );
        r.register(
            "musubi_proxy_discovery_evictions",
            "Destination watches dropped, by reason (capacity, idle)",
            m.discovery_evictions.clone(),
        );
        r.register(
            "musubi_proxy_policy_rules_dropped",
            "Authorization rules from the controller that could not be used and were dropped",
            m.policy_rules_dropped.clone(),
        );
        r.register(
            "musubi_proxy_removed_headers",
            "Headers only proxies may set, removed from what a client sent (a forged musubi-client-id, for one)",
            m.removed_headers.clone(),
        );
        let rt = &m.route;
        r.register(
            "musubi_proxy_route_requests",
            "Outbound HTTP requests a route matched, by route and the backend it chose",
            rt.requests.clone(),
        );
        r.register(
            "musubi_proxy_route_responses",
            "Responses to routed requests, by route, backend, status code and classification",
            rt.responses.clone(),
        );
        r.register(
            "musubi_proxy_route_response_latency_seconds",
            "Time from a routed request's arrival to its response headers",
            rt.latency.clone(),
        );
        r.register(
            "musubi_proxy_route_timeouts",
            "Route timeouts that fired (kind: request, backend_request)",
            rt.timeouts.clone(),
        );
        r.register(
            "musubi_proxy_route_faults",
            "Faults a route injected (kind: delay, abort)",
            rt.faults.clone(),
        );
        r.register(
            "musubi_proxy_route_mirrors",
            "Requests a route mirrored (kind: sent, unavailable, cut)",
            rt.mirrors.clone(),
        );
        m
    }

    pub fn removed_header(&self, direction: &'static str, header: &'static str) {
        self.removed_headers
            .get_or_create(&HeaderLabels { direction, header })
            .inc();
    }

    pub fn accept_error(&self, direction: &'static str, reason: &'static str) {
        self.accept_errors
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    pub fn refused(&self, direction: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }
}

/// Status codes as label values: the registered codes as themselves, any other code (a peer
/// may send anything from 100 to 999) as its class, so the label has a bounded set of values.
pub fn status_label(status: u16) -> &'static str {
    const CODES: [u16; 62] = [
        100, 101, 102, 103, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303,
        304, 305, 307, 308, 400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413,
        414, 415, 416, 417, 418, 421, 422, 423, 424, 425, 426, 428, 429, 431, 451, 500, 501, 502,
        503, 504, 505, 506, 507, 508, 510, 511,
    ];
    const NAMES: [&str; 62] = [
        "100", "101", "102", "103", "200", "201", "202", "203", "204", "205", "206", "207", "208",
        "226", "300", "301", "302", "303", "304", "305", "307", "308", "400", "401", "402", "403",
        "404", "405", "406", "407", "408", "409", "410", "411", "412", "413", "414", "415", "416",
        "417", "418", "421", "422", "423", "424", "425", "426", "428", "429", "431", "451", "500",
        "501", "502", "503", "504", "505", "506", "507", "508", "510", "511",
    ];
    const CLASSES: [&str; 10] = [
        "0xx", "1xx", "2xx", "3xx", "4xx", "5xx", "6xx", "7xx", "8xx", "9xx",
    ];
    match CODES.binary_search(&status) {
        Ok(i) => NAMES[i],
        Err(_) => CLASSES[usize::from(status / 100).min(9)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_bounded() {
        for (code, want) in [
            (200, "200"),
            (404, "404"),
            (599, "5xx"),
            (299, "2xx"),
            (999, "9xx"),
        ] {
            assert_eq!(status_label(code), want, "{code}");
        }
        let distinct: HashSet<&str> = (100..1000).map(status_label).collect();
        assert!(distinct.len() < 80, "{}", distinct.len());
    }

    #[test]
    fn labels_are_capped() {
        let cap = LabelCap::new(2);
        assert_eq!(cap.label("a:80"), "a:80");
        assert_eq!(cap.label("b:80"), "b:80");
        assert_eq!(cap.label("c:80"), "other");
        assert_eq!(cap.label("a:80"), "a:80");
    }
}
