//! The identity service's metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Debug)]
pub struct IdentityMetrics {
    pub issued: Counter,
    pub refusals: Family<ReasonLabel, Counter>,
    pub latency: Histogram,
    pub issuer_reloads: Family<ResultLabel, Counter>,
    pub negative_cache_hits: Counter,
}

impl IdentityMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = IdentityMetrics {
            issued: Counter::default(),
            refusals: Family::default(),
            // 50 µs .. ~1.6 s
            latency: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            issuer_reloads: Family::default(),
            negative_cache_hits: Counter::default(),
        };
        registry.register(
            "musubi_identity_certificates_issued",
            "Workload certificates issued",
            m.issued.clone(),
        );
        registry.register(
            "musubi_identity_refusals",
            "Certify requests refused, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "musubi_identity_certify_duration_seconds",
            "Time to answer a Certify request, refused or not",
            m.latency.clone(),
        );
        registry.register(
            "musubi_identity_issuer_reloads",
            "Issuer certificate/key reloads from disk, by result (ok, refused, unreadable)",
            m.issuer_reloads.clone(),
        );
        registry.register(
            "musubi_identity_token_negative_cache_hits",
            "Certify requests refused from the cache of tokens the validator refused, without asking it again",
            m.negative_cache_hits.clone(),
        );
        m
    }

    pub fn refused(&self, reason: &str) {
        self.refusals
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }
}
