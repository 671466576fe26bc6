//! The HTTP path of a service with routes, as separate steps: route (which rule), filters
//! (headers, redirect, rewrite, mirrors, faults), backend choice (weights), send (to one of the
//! backend's endpoints, under the rule's timeouts). Each step is small; the decisions are the
//! pure `route` module's. This is the seam retries and rollouts build on.

use super::tee::{Deadline, tee};
use super::{Failed, peer_label, send, service_label};
use crate::control::Resolution;
use crate::ctx::{Ctx, pick};
use crate::destination::Destination;
use crate::http::{self as h, Body, error_response};
use crate::listen::Slot;
use crate::metrics::{Label, OUTBOUND, RequestStats, RouteLabels};
use crate::route::filters::{RedirectFrom, fault_outcome, location, modified_path};
use crate::route::{Abort, Backend, Filter, Head, HeaderModifier, RouteDecision, Rule};
use http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Serves one request of a service that has routes.
pub async fn serve(
    ctx: Arc<Ctx>,
    req: Request<Incoming>,
    dest: Arc<Destination>,
    authority: String,
    slot: Slot,
) -> Response<Body> {
    let arrived = Instant::now();
    let table = dest.routes.table.clone();
    let (rule, prefix) = match table.select(&Head::of(&req)) {
        RouteDecision::Matched { rule, prefix } => (rule, prefix.map(str::to_string)),
        RouteDecision::NoMatch | RouteDecision::Unrouted => {
            ctx.metrics.refused(OUTBOUND, "no_route");
            let stats = RequestStats::start(
                &ctx.metrics,
                OUTBOUND,
                service_label(&ctx, &dest),
                Label::empty(),
                true,
            );
            let reason = format!(
                "no route of {} matches {} {}",
                dest.authority,
                req.method(),
                req.uri().path()
            );
            return stats.respond_error(error_response(StatusCode::NOT_FOUND, &reason), "no_route");
        }
    };
    let grpc = rule.grpc || crate::route::matching::is_grpc(req.headers());
    let backend = rule.pick_backend();
    let labels = RouteLabels {
        route: ctx.metrics.route.names.label(&rule.route),
        backend: backend
            .map(|b| ctx.metrics.authorities.label(&b.authority))
            .unwrap_or_else(Label::empty),
    };
    let step = Step {
        ctx: &ctx,
        dest: &dest,
        rule,
        labels,
        grpc,
    };
    step.run(req, backend, prefix.as_deref(), authority, slot, arrived)
        .await
}

/// What every step of one routed request needs.
struct Step<'a> {
    ctx: &'a Arc<Ctx>,
    dest: &'a Arc<Destination>,
    rule: &'a Rule,
    labels: RouteLabels,
    grpc: bool,
}

/// The filters' effect on one request, gathered in rule order.
#[derive(Default)]
struct Applied {
    response_headers: Vec<HeaderModifier>,
    mirrors: Vec<String>,
    /// URLRewrite's hostname: the `:authority` (Host) the backend sees.
    host: Option<String>,
}

impl Step<'_> {
    fn stats(&self, peer: Label) -> RequestStats {
        let mut s = RequestStats::start(
            &self.ctx.metrics,
            OUTBOUND,
            service_label(self.ctx, self.dest),
            peer,
            true,
        );
        s.route(self.labels.clone());
        s
    }

    /// A response the proxy makes itself (no backend was reached), recorded with why.
    fn answer(
        &self,
        status: StatusCode,
        grpc_code: u16,
        reason: &str,
        error: &'static str,
    ) -> Response<Body> {
        let resp = self.made(status, grpc_code, reason);
        self.stats(Label::empty()).respond_error(resp, error)
    }

    /// The proxy's own response, as gRPC for a gRPC request.
    fn made(&self, status: StatusCode, grpc_code: u16, reason: &str) -> Response<Body> {
        if self.grpc {
            grpc_error(grpc_code, reason)
        } else {
            error_response(status, reason)
        }
    }

    fn event(&self, family: Events, kind: &'static str) {
        let r = &self.ctx.metrics.route;
        let f = match family {
            Events::Timeout => &r.timeouts,
            Events::Fault => &r.faults,
        };
        r.event(f, &self.labels.route, kind);
    }

    async fn run(
        &self,
        mut req: Request<Incoming>,
        backend: Option<&Backend>,
        prefix: Option<&str>,
        authority: String,
        slot: Slot,
        arrived: Instant,
    ) -> Response<Body> {
        let deadline = self.rule.timeouts.request.map(|t| arrived + t);
        let mut applied = Applied::default();
        for f in &self.rule.filters {
            match f {
                Filter::RequestHeaders(m) => m.apply(req.headers_mut()),
                Filter::ResponseHeaders(m) => applied.response_headers.push(m.clone()),
                Filter::Redirect(r) => return self.redirect(&req, r, prefix, &authority),
                Filter::Rewrite(rw) => {
                    if let Some(p) = &rw.path {
                        rewrite_path(&mut req, p, prefix);
                    }
                    if let Some(host) = &rw.hostname {
                        applied.host = Some(host.clone());
                    }
                }
                Filter::Mirror(m) => {
                    if m.fraction.hit(fastrand::f64()) {
                        applied.mirrors.push(m.authority.clone());
                    }
                }
                Filter::Fault(fault) => {
                    let (delay, abort) = fault_outcome(fault, fastrand::f64(), fastrand::f64());
                    if let Some(d) = delay {
                        self.event(Events::Fault, "delay");
                        if deadline.is_some_and(|dl| Instant::now() + d >= dl) {
                            if let Some(dl) = deadline {
                                tokio::time::sleep_until(dl).await;
                            }
                            let after = self.rule.timeouts.request;
                            return self.timed_out("request", after, None);
                        }
                        tokio::time::sleep(d).await;
                    }
                    if let Some(a) = abort {
                        self.event(Events::Fault, "abort");
                        return self.abort(a);
                    }
                }
            }
        }
        let Some(backend) = backend else {
            let reason = format!(
                "route {} rule {}: every backend has weight 0",
                self.rule.route, self.rule.rule
            );
            return self.answer(StatusCode::INTERNAL_SERVER_ERROR, 13, &reason, "no_backend");
        };
        if let Some(reason) = &backend.invalid {
            let reason = format!("backend {}: {reason}", backend.authority);
            return self.answer(
                StatusCode::INTERNAL_SERVER_ERROR,
                13,
                &reason,
                "invalid_backend",
            );
        }
        for f in &backend.filters {
            match f {
                Filter::RequestHeaders(m) => m.apply(req.headers_mut()),
                Filter::ResponseHeaders(m) => applied.response_headers.push(m.clone()),
                _ => {}
            }
        }
        let target = match self.backend_destination(backend).await {
            Ok(d) => d,
            Err(resp) => return resp,
        };
        let Some(ep) = pick(&target).cloned() else {
            self.ctx.metrics.refused(OUTBOUND, "no_endpoints");
            let reason = format!("backend {} has no ready endpoints", backend.authority);
            return self.answer(StatusCode::SERVICE_UNAVAILABLE, 14, &reason, "no_endpoints");
        };
        let forward_authority = match &applied.host {
            Some(host) => host.clone(),
            None => authority,
        };
        let req = req.map(h::incoming);
        if ep.identity.is_none() {
            if !super::plaintext_allowed(self.ctx, &ep, &target.authority) {
                let resp = super::not_meshed(&ep, &target);
                return self.stats(Label::empty()).respond_error(resp, "not_meshed");
            }
            let to = ep.connect.to_string();
            let resp = super::passthrough(self.ctx.clone(), req, forward_authority, to).await;
            return with_response_headers(resp, &applied.response_headers);
        }
        if h::is_upgrade(&req) {
            let ctx = self.ctx.clone();
            let resp = super::upgrade(ctx, req, &target, &ep, forward_authority, slot).await;
            return with_response_headers(resp, &applied.response_headers);
        }
        let req = self.mirror(
            req,
            &applied.mirrors,
            &authority_for_mirrors(&forward_authority),
        );
        let stats = self.stats(peer_label(&ep));
        let (fires, kind) = self.first_deadline(deadline);
        let sent = send(self.ctx, req, &ep, &forward_authority);
        let resp = match fires {
            None => sent.await,
            Some(at) => match tokio::time::timeout_at(at, sent).await {
                Ok(r) => r,
                Err(_) => return self.timed_out(kind, self.timeout_of(kind), Some(stats)),
            },
        };
        match resp {
            Ok(resp) => {
                let resp = with_response_headers(resp, &applied.response_headers);
                let resp = match fires {
                    Some(at) => self.deadline_body(resp, at, kind),
                    None => resp,
                };
                stats.respond(resp)
            }
            Err(Failed { resp, error }) => stats.respond_error(resp, error),
        }
    }

    /// The earlier of the request deadline and this attempt's backend deadline, and which.
    fn first_deadline(&self, request: Option<Instant>) -> (Option<Instant>, &'static str) {
        let backend = self
            .rule
            .timeouts
            .backend_request
            .map(|t| Instant::now() + t);
        match (request, backend) {
            (Some(r), Some(b)) if b < r => (Some(b), "backend_request"),
            (Some(r), _) => (Some(r), "request"),
            (None, Some(b)) => (Some(b), "backend_request"),
            (None, None) => (None, "request"),
        }
    }

    fn timeout_of(&self, kind: &str) -> Option<Duration> {
        match kind {
            "backend_request" => self.rule.timeouts.backend_request,
            _ => self.rule.timeouts.request,
        }
    }

    /// 504 (gRPC: DEADLINE_EXCEEDED) saying which timeout fired; counted.
    fn timed_out(
        &self,
        kind: &'static str,
        after: Option<Duration>,
        stats: Option<RequestStats>,
    ) -> Response<Body> {
        self.event(Events::Timeout, kind);
        let name = if kind == "request" {
            "request"
        } else {
            "backendRequest"
        };
        let reason = format!(
            "route {} rule {}: timeouts.{name} ({}) fired before the response",
            self.rule.route,
            self.rule.rule,
            after
                .map(|d| humantime::format_duration(d).to_string())
                .unwrap_or_default()
        );
        let resp = self.made(StatusCode::GATEWAY_TIMEOUT, 4, &reason);
        let stats = stats.unwrap_or_else(|| self.stats(Label::empty()));
        stats.respond_error(resp, "timeout")
    }

    /// The rest of the response must arrive before the deadline too; if it fires mid-body the
    /// stream ends with the reason and the timeout is counted.
    fn deadline_body(
        &self,
        resp: Response<Body>,
        at: Instant,
        kind: &'static str,
    ) -> Response<Body> {
        let ctx = self.ctx.clone();
        let route = self.labels.route.clone();
        let reason = format!(
            "route {} rule {}: a timeout fired while the response was streaming",
            self.rule.route, self.rule.rule
        );
        resp.map(move |body| {
            Deadline::wrap(
                body,
                at,
                reason,
                Box::new(move || {
                    ctx.metrics
                        .route
                        .event(&ctx.metrics.route.timeouts, &route, kind)
                }),
            )
        })
    }

    fn abort(&self, a: Abort) -> Response<Body> {
        let resp = match a {
            Abort::Http(status) => error_response(status, "fault injected by the route"),
            Abort::Grpc(code) => grpc_error(code, "fault injected by the route"),
        };
        self.stats(Label::empty()).respond_error(resp, "fault")
    }

    fn redirect(
        &self,
        req: &Request<Incoming>,
        r: &crate::route::Redirect,
        prefix: Option<&str>,
        authority: &str,
    ) -> Response<Body> {
        let (host, port) = split_host_port(authority);
        let from = RedirectFrom {
            scheme: "http",
            host,
            port,
            path: req.uri().path(),
            query: req.uri().query(),
            matched_prefix: prefix,
        };
        let mut resp = Response::new(h::full(""));
        *resp.status_mut() = r.status;
        if let Ok(v) = HeaderValue::from_str(&location(r, &from)) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        self.stats(Label::empty()).respond(resp)
    }

    /// The backend's service: the routed service itself, or another one watched by name.
    async fn backend_destination(&self, b: &Backend) -> Result<Arc<Destination>, Response<Body>> {
        if b.authority == self.dest.authority {
            return Ok(self.dest.clone());
        }
        match self.ctx.resolver.resolve(&b.authority).await {
            Ok(Resolution::Meshed(d)) => Ok(d),
            Ok(Resolution::Unknown) => {
                let reason = format!("backend {} is not a mesh service", b.authority);
                Err(self.answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    13,
                    &reason,
                    "invalid_backend",
                ))
            }
            Err(e) => Err(self.answer(
                StatusCode::SERVICE_UNAVAILABLE,
                14,
                &e.to_string(),
                "no_discovery",
            )),
        }
    }

    /// Starts each mirror's copy of the request (fire and forget); returns the primary.
    fn mirror(&self, req: Request<Body>, mirrors: &[String], authority: &str) -> Request<Body> {
        if mirrors.is_empty() {
            return req;
        }
        let (parts, body) = req.into_parts();
        let (body, copies) = tee(body, mirrors.len());
        for (to, (copy, was_cut)) in mirrors.iter().zip(copies) {
            let mut mparts = http::request::Builder::new()
                .method(parts.method.clone())
                .uri(parts.uri.clone())
                .version(parts.version);
            if let Some(hs) = mparts.headers_mut() {
                *hs = parts.headers.clone();
            }
            let Ok(mreq) = mparts.body(copy) else {
                continue;
            };
            let ctx = self.ctx.clone();
            let route = self.labels.route.clone();
            let to = to.clone();
            let authority = authority.to_string();
            tokio::spawn(async move {
                let kind = send_mirror(&ctx, mreq, &to, &authority).await;
                let kind = if was_cut() { "cut" } else { kind };
                ctx.metrics
                    .route
                    .event(&ctx.metrics.route.mirrors, &route, kind);
            });
        }
        Request::from_parts(parts, body)
    }
}

enum Events {
    Timeout,
    Fault,
}

/// Sends a mirrored copy and reads its response to the end, discarding it.
async fn send_mirror(ctx: &Ctx, req: Request<Body>, to: &str, authority: &str) -> &'static str {
    use http_body_util::BodyExt;
    let dest = match ctx.resolver.resolve(to).await {
        Ok(Resolution::Meshed(d)) => d,
        _ => return "unavailable",
    };
    let Some(ep) = pick(&dest).filter(|e| e.identity.is_some()).cloned() else {
        return "unavailable";
    };
    match send(ctx, req, &ep, authority).await {
        Ok(resp) => {
            let _ = resp.into_body().collect().await;
            "sent"
        }
        Err(_) => "unavailable",
    }
}

/// The mirror keeps the caller's Host: the primary's `:authority`, unmangled.
fn authority_for_mirrors(a: &str) -> String {
    a.to_string()
}

fn rewrite_path<B>(req: &mut Request<B>, m: &crate::route::PathModifier, prefix: Option<&str>) {
    let path = modified_path(req.uri().path(), m, prefix);
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(p) = pq.parse() {
        parts.path_and_query = Some(p);
        if let Ok(u) = http::Uri::from_parts(parts) {
            *req.uri_mut() = u;
        }
    }
}

fn with_response_headers(mut resp: Response<Body>, mods: &[HeaderModifier]) -> Response<Body> {
    for m in mods {
        m.apply(resp.headers_mut());
    }
    resp
}

/// `host:port` into its parts (IPv6 keeps its brackets).
fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && (!host.contains(':') || host.ends_with(']')) => {
            (host, port.parse().ok())
        }
        _ => (authority, None),
    }
}

/// A Trailers-Only gRPC response with `code` (DEADLINE_EXCEEDED is 4, UNAVAILABLE 14).
pub fn grpc_error(code: u16, message: &str) -> Response<Body> {
    let mut resp = Response::new(h::full(""));
    let hs = resp.headers_mut();
    hs.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    hs.insert("grpc-status", HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        hs.insert("grpc-message", v);
    }
    if let Ok(v) = HeaderValue::from_str(message) {
        hs.insert(h::PROXY_ERROR, v);
    }
    resp
}

/// gRPC's `grpc-message` encoding: printable ASCII except `%` as is, the rest `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_table() {
        for (a, want) in [
            ("api.shop:80", ("api.shop", Some(80))),
            ("api.shop", ("api.shop", None)),
            ("[::1]:8080", ("[::1]", Some(8080))),
            ("[::1]", ("[::1]", None)),
        ] {
            assert_eq!(split_host_port(a), want, "{a}");
        }
    }

    #[test]
    fn grpc_errors_are_trailers_only() {
        let r = grpc_error(4, "timeouts.request (10s) fired: 100%");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(
            r.headers()["grpc-message"],
            "timeouts.request (10s) fired: 100%25"
        );
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn path_rewrites_keep_the_query() {
        let mut req = Request::builder()
            .uri("http://api/v1/users?id=3")
            .body(())
            .unwrap();
        rewrite_path(
            &mut req,
            &crate::route::PathModifier::ReplacePrefixMatch("/v2".into()),
            Some("/v1"),
        );
        assert_eq!(req.uri().to_string(), "http://api/v2/users?id=3");
    }
}
