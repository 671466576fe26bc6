//! One HTTP request's metrics: counted when it arrives, its response recorded once, whatever
//! happens to it. A gRPC status sent in trailers (after a normal header block) is read from the
//! trailers; a request whose response never comes (the client gave up, the peer reset the
//! stream) is still recorded, with a reason in the `error` label.

use super::{
    Label, LatencyLabels, Metrics, RequestLabels, ResponseLabels, RouteFamilies, status_label,
};
use crate::http::{Body, BoxError};
use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// The route and backend a routed request went to (label values from configuration, capped).
#[derive(Clone, Debug)]
pub struct RouteLabels {
    pub route: Label,
    pub backend: Label,
}

/// The labels of one request, and whether its response has been recorded yet. Dropped before
/// that (the request's future was cancelled), it records the request as `cancelled`.
pub struct RequestStats {
    metrics: Arc<Metrics>,
    direction: &'static str,
    authority: Label,
    peer: Label,
    tls: &'static str,
    route: Option<RouteLabels>,
    started: Instant,
    done: bool,
}

impl RequestStats {
    /// Counts the request. `authority` is already a bounded label (see
    /// [`Metrics::authorities`]); `peer` is the other side's SPIFFE ID (empty when none).
    pub fn start(
        metrics: &Arc<Metrics>,
        direction: &'static str,
        authority: Label,
        peer: Label,
        tls: bool,
    ) -> Self {
        let tls = if tls { "true" } else { "false" };
        metrics
            .requests
            .get_or_create(&RequestLabels {
                direction,
                authority: authority.clone(),
                peer_identity: peer.clone(),
                tls,
            })
            .inc();
        RequestStats {
            metrics: metrics.clone(),
            direction,
            authority,
            peer,
            tls,
            route: None,
            started: Instant::now(),
            done: false,
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// The routed request's route and backend: counted in the per-route series from now on.
    pub fn route(&mut self, labels: RouteLabels) {
        self.metrics
            .route
            .requests
            .get_or_create(&(labels.route.clone(), labels.backend.clone()).into())
            .inc();
        self.route = Some(labels);
    }

    /// Records a response from the far side (or one the proxy made, see [`Self::respond_error`]).
    /// A gRPC response whose status is still to come in trailers is recorded when they arrive.
    pub fn respond(self, resp: Response<Body>) -> Response<Body> {
        self.finish(resp, "")
    }

    /// Records a response the proxy made because there was none from the far side, with why.
    pub fn respond_error(self, resp: Response<Body>, error: &'static str) -> Response<Body> {
        self.finish(resp, error)
    }

    fn finish(mut self, resp: Response<Body>, error: &'static str) -> Response<Body> {
        let latency = self.started.elapsed().as_secs_f64();
        let status = resp.status().as_u16();
        if error.is_empty() && status_in_trailers(&resp) {
            let (parts, body) = resp.into_parts();
            let body = Classified {
                inner: body,
                pending: Some(Pending {
                    stats: self,
                    status,
                    latency,
                }),
            };
            return Response::from_parts(parts, body.boxed());
        }
        let grpc = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok());
        self.record(Some(status), grpc, error, latency);
        resp
    }

    fn record(
        &mut self,
        status: Option<u16>,
        grpc: Option<&str>,
        error: &'static str,
        latency: f64,
    ) {
        self.done = true;
        let classification = match status {
            Some(s) if error.is_empty() => classify(s, grpc),
            _ => "failure",
        };
        let status_code = status.map(status_label).unwrap_or("");
        let m = &self.metrics;
        m.responses
            .get_or_create(&ResponseLabels {
                direction: self.direction,
                authority: self.authority.clone(),
                peer_identity: self.peer.clone(),
                tls: self.tls,
                status_code,
                classification,
                error,
            })
            .inc();
        m.latency
            .get_or_create(&LatencyLabels {
                direction: self.direction,
                authority: self.authority.clone(),
                classification,
            })
            .observe(latency);
        if let Some(r) = &self.route {
            m.route
                .record(r, status_code, classification, error, latency);
        }
    }
}

impl Drop for RequestStats {
    fn drop(&mut self) {
        if !self.done {
            let latency = self.started.elapsed().as_secs_f64();
            self.record(None, None, "cancelled", latency);
        }
    }
}

/// A gRPC response with a normal header block: its status comes at the end, in trailers.
fn status_in_trailers(resp: &Response<Body>) -> bool {
    use hyper::body::Body as _;
    !resp.headers().contains_key("grpc-status")
        && !resp.body().is_end_stream()
        && resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"))
}

struct Pending {
    stats: RequestStats,
    status: u16,
    /// To the response headers, as for every other response.
    latency: f64,
}

/// A gRPC response body that records the response when its trailers say how it ended.
struct Classified {
    inner: Body,
    pending: Option<Pending>,
}

impl Classified {
    fn settle(&mut self, grpc: Option<&str>, error: &'static str) {
        if let Some(mut p) = self.pending.take() {
            // A stream that ended without a status is an error (gRPC: INTERNAL).
            let grpc = if error.is_empty() {
                Some(grpc.unwrap_or("13"))
            } else {
                None
            };
            p.stats.record(Some(p.status), grpc, error, p.latency);
        }
    }
}

impl hyper::body::Body for Classified {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    let grpc = t.get("grpc-status").and_then(|v| v.to_str().ok());
                    let grpc = grpc.map(str::to_string);
                    self.settle(grpc.as_deref(), "");
                }
            }
            Poll::Ready(Some(Err(_))) => self.settle(None, "reset"),
            Poll::Ready(None) => self.settle(None, ""),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `success` for anything but a 5xx or a gRPC error status.
pub fn classify(status: u16, grpc_status: Option<&str>) -> &'static str {
    match grpc_status {
        Some(s) if s != "0" => "failure",
        _ if status >= 500 => "failure",
        _ => "success",
    }
}

/// For [`RouteFamilies`]: the per-route request labels.
impl From<(Label, Label)> for super::RouteRequestLabels {
    fn from((route, backend): (Label, Label)) -> Self {
        super::RouteRequestLabels { route, backend }
    }
}

impl RouteFamilies {
    fn record(
        &self,
        r: &RouteLabels,
        status_code: &'static str,
        classification: &'static str,
        error: &'static str,
        latency: f64,
    ) {
        self.responses
            .get_or_create(&super::RouteResponseLabels {
                route: r.route.clone(),
                backend: r.backend.clone(),
                status_code,
                classification,
                error,
            })
            .inc();
        self.latency
            .get_or_create(&super::RouteLatencyLabels {
                route: r.route.clone(),
                backend: r.backend.clone(),
                classification,
            })
            .observe(latency);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::full;
    use http::HeaderMap;
    use http_body_util::StreamBody;
    use prometheus_client::registry::Registry;

    #[test]
    fn classification_table() {
        assert_eq!(classify(200, None), "success");
        assert_eq!(classify(404, None), "success");
        assert_eq!(classify(503, None), "failure");
        assert_eq!(classify(200, Some("0")), "success");
        assert_eq!(classify(200, Some("14")), "failure");
    }

    fn metrics() -> (Arc<Metrics>, Registry) {
        let mut registry = Registry::default();
        (Arc::new(Metrics::new(&mut registry)), registry)
    }

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
        out
    }

    fn stats(m: &Arc<Metrics>) -> RequestStats {
        RequestStats::start(m, "outbound", Label::new("api:80"), Label::empty(), true)
    }

    /// A gRPC response: headers, one message, then trailers with `grpc-status`.
    fn grpc_response(status: &'static str) -> Response<Body> {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", status.parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\0"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
        Response::builder()
            .header("content-type", "application/grpc")
            .body(body)
            .unwrap()
    }

    fn line_with(text: &str, needles: &[&str]) -> bool {
        text.lines().any(|l| {
            l.starts_with("musubi_proxy_responses_total") && needles.iter().all(|n| l.contains(n))
        })
    }

    #[tokio::test]
    async fn grpc_status_in_trailers_is_classified_by_the_trailers() {
        for (status, want) in [("0", "success"), ("14", "failure")] {
            let (m, registry) = metrics();
            let resp = stats(&m).respond(grpc_response(status));
            assert!(
                !text(&registry).contains("musubi_proxy_responses_total{"),
                "nothing is recorded before the trailers"
            );
            resp.into_body().collect().await.unwrap();
            let t = text(&registry);
            assert!(
                line_with(
                    &t,
                    &[&format!("classification=\"{want}\""), "status_code=\"200\""]
                ),
                "grpc-status {status}: {t}"
            );
        }
    }

    #[tokio::test]
    async fn a_grpc_stream_without_a_status_or_cut_short_is_a_failure() {
        let (m, registry) = metrics();
        let resp = Response::builder()
            .header("content-type", "application/grpc")
            .body(
                StreamBody::new(futures_util::stream::iter(vec![Ok::<_, BoxError>(
                    Frame::data(Bytes::from_static(b"x")),
                )]))
                .boxed(),
            )
            .unwrap();
        stats(&m).respond(resp).into_body().collect().await.unwrap();
        assert!(line_with(
            &text(&registry),
            &["classification=\"failure\"", "error=\"\""]
        ));

        let (m, registry) = metrics();
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![Err("stream reset".into())];
        let resp = Response::builder()
            .header("content-type", "application/grpc")
            .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
            .unwrap();
        assert!(stats(&m).respond(resp).into_body().collect().await.is_err());
        assert!(line_with(
            &text(&registry),
            &["classification=\"failure\"", "error=\"reset\""]
        ));

        let (m, registry) = metrics();
        drop(stats(&m).respond(grpc_response("0")));
        assert!(
            line_with(&text(&registry), &["error=\"cancelled\""]),
            "a dropped stream"
        );
    }

    #[test]
    fn a_request_without_a_response_is_recorded_as_cancelled() {
        let (m, registry) = metrics();
        drop(stats(&m));
        let t = text(&registry);
        assert!(
            line_with(
                &t,
                &[
                    "status_code=\"\"",
                    "classification=\"failure\"",
                    "error=\"cancelled\""
                ]
            ),
            "{t}"
        );
        assert!(t.contains("musubi_proxy_response_latency_seconds_count{direction=\"outbound\",authority=\"api:80\",classification=\"failure\"} 1"), "{t}");
    }

    #[test]
    fn plain_and_trailers_only_responses_are_recorded_at_once() {
        let (m, registry) = metrics();
        stats(&m).respond(Response::new(full("ok")));
        let trailers_only = Response::builder()
            .header("content-type", "application/grpc")
            .header("grpc-status", "5")
            .body(full(""))
            .unwrap();
        stats(&m).respond(trailers_only);
        let proxy_made = Response::builder().status(504).body(full("")).unwrap();
        stats(&m).respond_error(proxy_made, "timeout");
        let t = text(&registry);
        assert!(
            line_with(&t, &["status_code=\"200\"", "classification=\"success\""]),
            "{t}"
        );
        assert!(
            line_with(&t, &["status_code=\"200\"", "classification=\"failure\""]),
            "{t}"
        );
        assert!(
            line_with(&t, &["status_code=\"504\"", "error=\"timeout\""]),
            "{t}"
        );
    }
}
