//! A small plain-HTTP admin endpoint: `/metrics`, `/ready`, `/live`.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;

pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

fn respond(
    registry: &Registry,
    ready: &ReadyCheck,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is served here\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => Response::builder()
            .header("content-type", crate::metrics::CONTENT_TYPE)
            .body(Full::new(Bytes::from(crate::metrics::render(registry))))
            .unwrap_or_default(),
        "/live" => text(StatusCode::OK, "live\n".into()),
        "/ready" if ready() => text(StatusCode::OK, "ready\n".into()),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /ready, /live\n".into(),
        ),
    }
}

/// Serves the admin endpoint until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, ready: ReadyCheck) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of file descriptors and the like: keep serving after a pause, without
                // spinning on the error.
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        let ready = ready.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let resp = respond(&registry, &ready, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
