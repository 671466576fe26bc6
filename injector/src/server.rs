//! The webhook's HTTPS server: `POST /inject` (AdmissionReview v1), `GET /live`, `GET /ready`
//! and `GET /metrics`. Each connection and request is handled on its own task; a bad request
//! gets a 4xx with a message and the server keeps serving.

use crate::config::InjectConfig;
use crate::review::{self, MAX_REVIEW_BYTES};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use k8s_openapi::api::core::v1::Namespace;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Reads a namespace's annotations (the seam tests may replace; production asks the API).
pub trait Namespaces: Send + Sync + 'static {
    fn annotations<'a>(
        &'a self,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<BTreeMap<String, String>, String>> + Send + 'a>>;
}

/// Namespaces read from the API server.
pub struct ApiNamespaces(pub kube::Client);

impl Namespaces for ApiNamespaces {
    fn annotations<'a>(
        &'a self,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<BTreeMap<String, String>, String>> + Send + 'a>> {
        Box::pin(async move {
            let api = kube::Api::<Namespace>::all(self.0.clone());
            let ns = api.get(name).await.map_err(|e| e.to_string())?;
            Ok(ns.metadata.annotations.unwrap_or_default())
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

pub struct Webhook {
    pub config: InjectConfig,
    pub namespaces: Arc<dyn Namespaces>,
    reviews: Family<OutcomeLabel, Counter>,
    registry: Registry,
}

impl Webhook {
    pub fn new(config: InjectConfig, namespaces: Arc<dyn Namespaces>) -> Arc<Webhook> {
        let reviews = Family::<OutcomeLabel, Counter>::default();
        let mut registry = Registry::default();
        registry.register(
            "musubi_injector_reviews",
            "Admission reviews answered, by outcome (injected, skipped, denied, unreadable, malformed)",
            reviews.clone(),
        );
        Arc::new(Webhook {
            config,
            namespaces,
            reviews,
            registry,
        })
    }

    fn count(&self, outcome: &'static str) {
        self.reviews.get_or_create(&OutcomeLabel { outcome }).inc();
    }
}

type Body = Full<Bytes>;

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Serves one request.
pub async fn handle(hook: Arc<Webhook>, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live" | "/ready") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/metrics") => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &hook.registry) {
                Ok(()) => text(StatusCode::OK, out),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            }
        }
        (&Method::POST, "/inject") => inject(hook, req).await,
        (_, "/inject") => text(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn inject(hook: Arc<Webhook>, req: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            hook.count("malformed");
            return text(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}\n"),
            );
        }
    };
    let request = match review::decode(&body) {
        Ok(r) => r,
        Err(e) => {
            hook.count("malformed");
            tracing::warn!(error = %e, "refused a malformed admission review");
            return text(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
    };
    let ns_name = request.namespace.clone().unwrap_or_default();
    let ns = if ns_name.is_empty() {
        None
    } else {
        match hook.namespaces.annotations(&ns_name).await {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!(namespace = %ns_name, error = %e, "cannot read the namespace; treating it as not opted in");
                None
            }
        }
    };
    let answer = review::answer(&request, ns.as_ref(), &hook.config);
    hook.count(answer.outcome);
    tracing::info!(
        uid = %request.uid,
        namespace = %ns_name,
        outcome = answer.outcome,
        reason = %answer.reason,
        "admission review"
    );
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_vec(&answer.review).unwrap_or_default(),
    )));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Accepts TLS connections on `listener` until the returned future is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<tokio_rustls::rustls::ServerConfig>,
    hook: Arc<Webhook>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let hook = hook.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let svc = hyper::service::service_fn(move |req| {
                let hook = hook.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(hook, req).await) }
            });
            let io = hyper_util::rt::TokioIo::new(tls);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
