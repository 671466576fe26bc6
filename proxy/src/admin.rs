//! The admin endpoint: `/metrics`, `/ready`, `/live`, and from loopback only `POST /shutdown`,
//! `/debug/config` and `/debug/identity` (the admin port listens on every address, for probes
//! and scrapes; what the proxy knows about the mesh is for the pod's own eyes).

use crate::control::Resolution;
use crate::ctx::Ctx;
use crate::listen::Listener;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use musubi_identity::CredentialStore;
use prometheus_client::registry::Registry;
use serde_json::json;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

/// What the admin endpoint serves from. `ctx` is set once the proxy holds its certificate.
pub struct Admin {
    pub registry: Registry,
    pub store: Arc<CredentialStore>,
    pub ctx: OnceLock<Arc<Ctx>>,
    pub drain: crate::drain::Drain,
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

impl Admin {
    /// Ready once the proxy holds its certificate and its first inbound policy, until it
    /// drains.
    pub fn ready(&self) -> bool {
        self.ctx.get().is_some_and(|c| c.policy().is_some())
            && self.store.info().is_some()
            && !self.drain.is_draining()
    }

    fn respond(&self, req: &Request<Incoming>, client: SocketAddr) -> Response<Full<Bytes>> {
        let local = is_loopback(client);
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                let mut r = Response::new(Full::new(Bytes::from(
                    musubi_identity::metrics::render(&self.registry),
                )));
                r.headers_mut().insert(
                    "content-type",
                    http::HeaderValue::from_static(musubi_identity::metrics::CONTENT_TYPE),
                );
                r
            }
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") if self.ready() => text(StatusCode::OK, "ready\n"),
            (&Method::GET, "/ready") => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            (&Method::POST, "/shutdown") if local => {
                self.drain.start();
                text(StatusCode::OK, "draining\n")
            }
            (_, "/shutdown") => text(
                StatusCode::FORBIDDEN,
                "POST /shutdown is accepted from localhost only\n",
            ),
            (_, path) if path.starts_with("/debug/") && !local => text(
                StatusCode::FORBIDDEN,
                "/debug/ is served to localhost only\n",
            ),
            (&Method::GET, "/debug/identity") => json_response(self.identity_json()),
            (&Method::GET, "/debug/config") => json_response(self.config_json()),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: /metrics /ready /live /debug/config /debug/identity, POST /shutdown\n",
            ),
        }
    }

    fn identity_json(&self) -> serde_json::Value {
        let svid = self.store.info();
        let bundle = self
            .ctx
            .get()
            .map(|c| c.bundle.fingerprints())
            .unwrap_or_default();
        json!({
            "spiffe_id": svid.as_ref().map(|s| s.id.to_string()),
            "not_before": svid.as_ref().map(|s| humantime::format_rfc3339_seconds(s.not_before).to_string()),
            "not_after": svid.as_ref().map(|s| humantime::format_rfc3339_seconds(s.not_after).to_string()),
            "certificate_sha256": svid.as_ref().map(|s| s.fingerprint.clone()),
            "trust_bundle_sha256": bundle,
        })
    }

    fn config_json(&self) -> serde_json::Value {
        let Some(ctx) = self.ctx.get() else {
            return json!({"ready": false});
        };
        let destinations: serde_json::Map<String, serde_json::Value> = ctx
            .resolver
            .snapshot()
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    None => json!("pending"),
                    Some(Resolution::Unknown) => json!("unknown (passthrough)"),
                    Some(Resolution::Meshed(d)) => serde_json::to_value(&*d).unwrap_or_default(),
                };
                (k, v)
            })
            .collect();
        let policy = ctx.policy();
        json!({
            "identity": ctx.config.id.to_string(),
            "mode": format!("{:?}", ctx.config.mode),
            "app_ports": ctx.config.app_ports,
            "inbound_policy": policy.map(|p| serde_json::to_value(&*p).unwrap_or_default()),
            "destinations": destinations,
        })
    }
}

/// Loopback, also as an IPv4-mapped address on a dual-stack listener (`::ffff:127.0.0.1`).
fn is_loopback(client: SocketAddr) -> bool {
    match client.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        v4 => v4.is_loopback(),
    }
}

/// Connections the admin listener holds at once (probes, scrapes, the CLI).
pub const MAX_CONNECTIONS: usize = 128;

pub async fn serve(admin: Arc<Admin>, listener: Listener, metrics: Arc<crate::metrics::Metrics>) {
    loop {
        let (tcp, client, slot) = listener.accept(&metrics).await;
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = admin.respond(&req, client);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_table() {
        for (addr, want) in [
            ("127.0.0.1:1", true),
            ("127.8.0.1:1", true),
            ("[::1]:1", true),
            ("[::ffff:127.0.0.1]:1", true),
            ("[::ffff:10.0.0.1]:1", false),
            ("10.0.0.1:1", false),
            ("[fd00::1]:1", false),
        ] {
            assert_eq!(is_loopback(addr.parse().unwrap()), want, "{addr}");
        }
    }
}
