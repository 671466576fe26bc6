//! Metrics helpers shared by the identity service and the workload side.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::SystemTime;

type Deadline = Arc<dyn Fn() -> Option<SystemTime> + Send + Sync>;

/// A gauge computed at scrape time: seconds from now until a deadline (negative once it has
/// passed); absent when there is no deadline (e.g. no certificate yet).
#[derive(Clone)]
pub struct SecondsUntil {
    name: &'static str,
    help: &'static str,
    deadline: Deadline,
}

impl std::fmt::Debug for SecondsUntil {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecondsUntil")
            .field("name", &self.name)
            .finish()
    }
}

impl SecondsUntil {
    pub fn new(
        name: &'static str,
        help: &'static str,
        deadline: impl Fn() -> Option<SystemTime> + Send + Sync + 'static,
    ) -> Self {
        SecondsUntil {
            name,
            help,
            deadline: Arc::new(deadline),
        }
    }

    pub fn register(self, registry: &mut Registry) {
        registry.register_collector(Box::new(self));
    }
}

impl prometheus_client::collector::Collector for SecondsUntil {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(t) = (self.deadline)() {
            let secs = crate::cert::seconds_until(t, SystemTime::now());
            let gauge = ConstGauge::new(secs);
            let metric =
                encoder.encode_descriptor(self.name, self.help, None, MetricType::Gauge)?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// Registers `<prefix>_certificate_expiry_seconds` for the store's current SVID.
pub fn register_svid_expiry(
    registry: &mut Registry,
    name: &'static str,
    store: Arc<crate::CredentialStore>,
) {
    SecondsUntil::new(
        name,
        "Seconds until the current workload certificate expires",
        move || store.info().map(|i| i.not_after),
    )
    .register(registry);
}

/// Renders a registry as Prometheus/OpenMetrics text.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
