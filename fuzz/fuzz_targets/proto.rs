//! The controller's streams as the proxy receives them: bytes decoded as a discovery update
//! and as an inbound policy (prost), then converted to the proxy's domain types, which must
//! refuse anything malformed with an error, never a panic. Converted values are then used the
//! way the proxy uses them (authorization, the admin endpoint's JSON).
#![no_main]

use libfuzzer_sys::fuzz_target;
use musubi_identity::{SpiffeId, TrustDomain};
use musubi_proto::discovery::v1 as dpb;
use musubi_proto::policy::v1 as ppb;
use musubi_proxy::destination::from_update;
use musubi_proxy::policy::{InboundPolicy, Peer, authorize};
use musubi_proxy::route::{Head, RouteDecision};
use prost::Message as _;
use std::sync::LazyLock;

static TRUST_DOMAIN: LazyLock<TrustDomain> =
    LazyLock::new(|| TrustDomain::new("cluster.local").expect("a valid trust domain"));
static PEERS: LazyLock<[Peer; 3]> = LazyLock::new(|| {
    let id = |s: &str| Peer::Mesh(SpiffeId::parse(s).expect("a valid SPIFFE ID"));
    [
        id("spiffe://cluster.local/ns/shop/sa/web"),
        id("spiffe://other.domain/ns/shop/sa/web"),
        Peer::Unauthenticated,
    ]
});

fuzz_target!(|data: &[u8]| {
    if let Ok(update) = dpb::ServiceUpdate::decode(data) {
        service_update(&update);
    }
    if let Ok(policy) = ppb::InboundPolicy::decode(data) {
        inbound_policy(&policy);
    }
});

fn service_update(update: &dpb::ServiceUpdate) {
    let Ok(Some(dest)) = from_update(update) else {
        return;
    };
    let sent = update.service.as_ref().map_or(0, |s| s.endpoints.len());
    assert!(dest.endpoints.len() <= sent);
    for ep in &dest.endpoints {
        assert!(
            ep.app_port > 0 && ep.connect.port() > 0 && ep.weight > 0,
            "{ep:?}"
        );
    }
    serde_json::to_string(&dest).expect("a destination serializes");
    // Every rule sent is either compiled or left out with a reason, and routing over the table
    // (matching, precedence, the weighted draw) never fails.
    let sent = update.service.as_ref().map_or(0, |s| s.routes.len());
    let table = &dest.routes.table;
    assert_eq!(table.rules.len() + dest.routes.errors.len(), sent);
    let headers = {
        let mut h = http::HeaderMap::new();
        h.insert("x-canary", http::HeaderValue::from_static("true"));
        h.insert("content-type", http::HeaderValue::from_static("application/grpc"));
        h
    };
    for (path, query) in [("/", None), ("/orders/7", Some("id=7")), ("/musubi.test.v1.Echo/Unary", None)] {
        let head = Head {
            method: &http::Method::GET,
            path,
            query,
            headers: &headers,
            grpc: path.contains('.'),
        };
        if let RouteDecision::Matched { rule, .. } = table.select(&head) {
            let total = rule.total_weight();
            for draw in [0, total / 2, total.saturating_sub(1)] {
                if total > 0 {
                    assert!(rule.backend(draw).is_some(), "a draw below the total weight picks a backend");
                }
            }
            assert!(rule.backend(total).is_none());
        }
    }
}

fn inbound_policy(policy: &ppb::InboundPolicy) {
    let converted = InboundPolicy::from(policy);
    // What cannot be used is dropped, never invented: a port keeps at most the rules it was sent.
    for p in &policy.ports {
        if let Some(kept) = u16::try_from(p.port)
            .ok()
            .and_then(|port| converted.ports.get(&port))
            .and_then(|c| c.allow.as_ref())
        {
            // A port listed twice: the last entry wins, so compare with the longest.
            let sent = policy
                .ports
                .iter()
                .filter(|q| q.port == p.port)
                .map(|q| q.authorization.as_ref().map_or(0, |a| a.rules.len()))
                .max()
                .unwrap_or(0);
            assert!(kept.len() <= sent, "{kept:?} from {p:?}");
        }
    }
    let ports = converted.ports.keys().copied().chain([80, 65535]);
    for port in ports.take(64) {
        for peer in PEERS.iter() {
            let _ = authorize(&converted, port, peer, &TRUST_DOMAIN).label();
        }
    }
    serde_json::to_string(&converted).expect("a policy serializes");
}
