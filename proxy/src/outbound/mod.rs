//! Outbound: what the local application sends. In explicit mode the application uses the
//! outbound listener as an HTTP proxy (absolute-form requests, `Host`, or `CONNECT` for
//! opaque TCP); in transparent mode iptables redirects its connections here and the original
//! destination decides. Meshed destinations are reached over mTLS; others are passed through,
//! except this proxy's own listeners, which are refused as loops whatever the spelling.

use crate::control::Resolution;
use crate::ctx::{Ctx, pick};
use crate::destination::{Destination, Endpoint};
use crate::detect::{Detected, Outcome};
use crate::http::{self as h, Body, error_response};
use crate::listen::{Listener, Slot};
use crate::metrics::{Label, OUTBOUND, RequestStats, TcpLabels};
use crate::own::VetError;
use crate::transport::{Header, Prefixed, Protocol};
use bytes::BytesMut;
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

mod routed;
mod tee;

/// Accepts until draining starts.
pub async fn serve(ctx: Arc<Ctx>, listener: Listener) {
    loop {
        let (tcp, client, slot) = tokio::select! {
            a = listener.accept(&ctx.metrics) => a,
            _ = ctx.drain.signaled() => return,
        };
        let ctx = ctx.clone();
        let guard = ctx.drain.guard();
        tokio::spawn(async move {
            match ctx.config.mode {
                crate::config::CaptureMode::Explicit => {
                    serve_http(ctx, tcp, client, None, slot).await
                }
                crate::config::CaptureMode::Transparent => {
                    transparent(ctx, tcp, client, slot).await
                }
            }
            drop(guard);
        });
    }
}

/// A redirected connection (transparent mode): the original destination decides where it
/// goes; the first bytes decide whether it is HTTP (handled request by request) or opaque.
async fn transparent(ctx: Arc<Ctx>, mut tcp: TcpStream, client: SocketAddr, slot: Slot) {
    let Some(orig) = crate::orig_dst_addr(&tcp) else {
        ctx.metrics.refused(OUTBOUND, "no_original_destination");
        return;
    };
    if ctx.own.is_loop(orig) {
        ctx.metrics.refused(OUTBOUND, "loop");
        tracing::info!(%client, %orig, "refused: the destination is this proxy's own listener");
        return;
    }
    let target = orig.to_string();
    let resolution = match ctx.resolver.resolve(&target).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%client, %target, error = %e, "no discovery answer; closing");
            ctx.metrics.refused(OUTBOUND, "no_discovery");
            return;
        }
    };
    let declared_opaque = matches!(&resolution, Resolution::Meshed(d) if d.protocol == crate::destination::Protocol::Opaque);
    let mut buf = BytesMut::new();
    let protocol = if declared_opaque || ctx.config.opaque_ports.contains(&orig.port()) {
        Detected::Opaque
    } else {
        let deadline = tokio::time::Instant::now() + ctx.config.detect_timeout;
        match crate::detect::detect(&mut tcp, &mut buf, deadline).await {
            Ok((outcome, took)) => {
                let d = match outcome {
                    Outcome::Known(d) => d.outbound(),
                    Outcome::Timeout { .. } | Outcome::Eof => Detected::Opaque,
                };
                let labels = crate::metrics::DetectLabels {
                    direction: OUTBOUND,
                    protocol: d.as_str(),
                };
                ctx.metrics.detections.get_or_create(&labels).inc();
                ctx.metrics
                    .detect_seconds
                    .get_or_create(&labels)
                    .observe(took.as_secs_f64());
                d
            }
            Err(_) => return,
        }
    };
    let mut tcp = Prefixed::new(buf.freeze(), tcp);
    if protocol != Detected::Opaque {
        return serve_http(ctx, tcp, client, Some(target), slot).await;
    }
    match resolution {
        Resolution::Meshed(dest) => {
            let Some(ep) = pick(&dest).cloned() else {
                ctx.metrics.refused(OUTBOUND, "no_endpoints");
                return;
            };
            if ep.identity.is_none() {
                if !plaintext_allowed(&ctx, &ep, &dest.authority) {
                    return;
                }
                return opaque_plain(&ctx, &mut tcp, ep.connect).await;
            }
            let header = Header {
                port: ep.app_port,
                protocol: Protocol::Opaque,
                authority: Some(target),
            };
            match ctx.connector.connect(&ep, &header).await {
                Ok(mut upstream) => {
                    let labels = TcpLabels {
                        direction: OUTBOUND,
                        peer_identity: peer_label(&ep),
                        tls: "true",
                    };
                    copy_counted(&ctx, labels, &mut tcp, &mut upstream).await;
                }
                Err(e) => {
                    ctx.metrics.refused(OUTBOUND, e.label());
                    tracing::warn!(%client, endpoint = %ep.connect, error = %e, "cannot reach endpoint");
                }
            }
        }
        Resolution::Unknown => opaque_plain(&ctx, &mut tcp, orig).await,
    }
}

/// Opaque bytes in plaintext to a destination outside the mesh (or an unmeshed endpoint).
async fn opaque_plain<S>(ctx: &Ctx, tcp: &mut S, to: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match TcpStream::connect(to).await {
        Ok(mut upstream) => {
            let labels = TcpLabels {
                direction: OUTBOUND,
                peer_identity: Label::empty(),
                tls: "false",
            };
            copy_counted(ctx, labels, tcp, &mut upstream).await;
        }
        Err(e) => tracing::debug!(%to, error = %e, "passthrough connect failed"),
    }
}

/// An endpoint without identity is reached in plaintext only where its namespace allows it
/// (PERMISSIVE); under STRICT nothing meshed leaves in plaintext. Counts a refusal.
pub(crate) fn plaintext_allowed(ctx: &Ctx, ep: &Endpoint, authority: &str) -> bool {
    if !ep.plaintext_allowed {
        ctx.metrics.refused(OUTBOUND, "not_meshed");
        tracing::info!(endpoint = %ep.connect, %authority, "refused: the endpoint is not meshed and its namespace is STRICT");
    }
    ep.plaintext_allowed
}

pub(crate) fn not_meshed(ep: &Endpoint, dest: &Destination) -> Response<Body> {
    error_response(
        StatusCode::BAD_GATEWAY,
        &format!(
            "endpoint {} of {} is not meshed and mTLS is STRICT there",
            ep.connect, dest.authority
        ),
    )
}

/// Serves the application's HTTP connection (HTTP/1.1 or HTTP/2), request by request. With a
/// `target` (transparent mode), requests go to that original destination; without one, each
/// request's authority decides.
pub async fn serve_http<S>(
    ctx: Arc<Ctx>,
    io: S,
    client: SocketAddr,
    target: Option<String>,
    slot: Slot,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc_ctx = ctx.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = svc_ctx.clone();
        let target = target.clone();
        let slot = slot.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(ctx, req, target, slot).await) }
    });
    let limits = &ctx.config.limits;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = ctx.drain.signaled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%client, error = %e, "outbound connection ended with an error");
    }
}

async fn handle(
    ctx: Arc<Ctx>,
    mut req: Request<Incoming>,
    target: Option<String>,
    slot: Slot,
) -> Response<Body> {
    // Headers only proxies set: whatever the application sent is not ours to forward.
    for (name, label) in [
        (h::CLIENT_ID, h::CLIENT_ID_NAME),
        (h::ORIG_PROTO, h::ORIG_PROTO_NAME),
    ] {
        if req.headers_mut().remove(name).is_some() {
            ctx.metrics.removed_header(OUTBOUND, label);
        }
    }
    if req.method() == Method::CONNECT && target.is_none() {
        return connect_tunnel(ctx, req, slot).await;
    }
    let Some(authority) = h::authority(&req)
        .map(|a| h::with_port(&a, 80))
        .or_else(|| target.clone())
    else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "request names no authority (Host header or absolute URI)",
        );
    };
    let lookup = target.as_deref().unwrap_or(&authority);
    let resolution = match ctx.resolver.resolve(lookup).await {
        Ok(r) => r,
        Err(e) => return error_response(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    match resolution {
        Resolution::Unknown => {
            let connect_to = target.unwrap_or_else(|| authority.clone());
            passthrough(ctx, req.map(h::incoming), authority, connect_to).await
        }
        Resolution::Meshed(dest) if !dest.routes.table.is_empty() => {
            routed::serve(ctx, req, dest, authority, slot).await
        }
        Resolution::Meshed(dest) => {
            let Some(ep) = pick(&dest) else {
                ctx.metrics.refused(OUTBOUND, "no_endpoints");
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("{authority} has no ready endpoints"),
                );
            };
            let ep = ep.clone();
            if ep.identity.is_none() {
                if !plaintext_allowed(&ctx, &ep, &dest.authority) {
                    return not_meshed(&ep, &dest);
                }
                let to = ep.connect.to_string();
                return passthrough(ctx, req.map(h::incoming), authority, to).await;
            }
            if h::is_upgrade(&req) {
                upgrade(ctx, req.map(h::incoming), &dest, &ep, authority, slot).await
            } else {
                forward(ctx, req, &dest, &ep, authority).await
            }
        }
    }
}

/// The endpoint's identity as a metric label (empty outside the mesh).
pub(crate) fn peer_label(ep: &Endpoint) -> Label {
    ep.identity
        .as_ref()
        .map(|i| Label::from(i.shared()))
        .unwrap_or_else(Label::empty)
}

/// The metric label of a mesh service: its canonical authority (bounded by the cap).
pub(crate) fn service_label(ctx: &Ctx, dest: &Destination) -> Label {
    ctx.metrics.authorities.label(&dest.authority)
}

/// Sends a request of a service without routes to the endpoint it picked.
async fn forward(
    ctx: Arc<Ctx>,
    req: Request<Incoming>,
    dest: &Destination,
    ep: &Endpoint,
    authority: String,
) -> Response<Body> {
    let stats = RequestStats::start(
        &ctx.metrics,
        OUTBOUND,
        service_label(&ctx, dest),
        peer_label(ep),
        true,
    );
    match send(&ctx, req.map(h::incoming), ep, &authority).await {
        Ok(resp) => stats.respond(resp),
        Err(failed) => stats.respond_error(failed.resp, failed.error),
    }
}

/// The proxy's answer when a request got no response from the far side, with why (the
/// `error` metric label).
pub(crate) struct Failed {
    pub resp: Response<Body>,
    pub error: &'static str,
}

/// One request to an endpoint's proxy over the pooled HTTP/2 mTLS connection: sent as the far
/// proxy wants it (`:authority` = `authority`, the application's HTTP version in
/// `musubi-orig-proto`), answered as the application wants it.
pub(crate) async fn send(
    ctx: &Ctx,
    req: Request<Body>,
    ep: &Endpoint,
    authority: &str,
) -> Result<Response<Body>, Failed> {
    let (mut parts, body) = req.into_parts();
    let app_version = parts.version;
    if app_version != Version::HTTP_2
        && ep.transport == crate::destination::Transport::Musubi
        && let Ok(v) = h::version_name(app_version).parse()
    {
        parts.headers.insert(h::ORIG_PROTO, v);
    }
    h::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    parts.version = Version::HTTP_2;
    parts.uri = h::absolute_uri(&parts.uri, authority).map_err(|e| Failed {
        resp: error_response(StatusCode::BAD_REQUEST, &format!("bad request target: {e}")),
        error: "bad_request",
    })?;
    let req = Request::from_parts(parts, body);
    let mut sender = ctx.pool.sender(ep, authority).await.map_err(|e| {
        ctx.metrics.refused(OUTBOUND, e.label());
        tracing::warn!(%authority, endpoint = %ep.connect, error = %e, "cannot reach endpoint");
        Failed {
            resp: error_response(StatusCode::BAD_GATEWAY, &e.to_string()),
            error: "unreachable",
        }
    })?;
    match sender.send_request(req).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            h::strip_hop_by_hop(&mut parts.headers);
            parts.version = app_version;
            Ok(Response::from_parts(parts, h::incoming(body)))
        }
        Err(e) => Err(Failed {
            resp: error_response(StatusCode::BAD_GATEWAY, &format!("peer proxy: {e}")),
            error: "reset",
        }),
    }
}

/// Copies an upgraded connection both ways; the tunnel holds its connection's slot and a
/// drain guard, so draining waits for it like for any connection.
fn spawn_tunnel<A, B>(ctx: Arc<Ctx>, slot: Slot, a: A, b: B, labels: Option<TcpLabels>)
where
    A: std::future::Future<Output = Result<hyper::upgrade::Upgraded, hyper::Error>>
        + Send
        + 'static,
    B: std::future::Future<Output = Option<TunnelEnd>> + Send + 'static,
{
    let guard = ctx.drain.guard();
    tokio::spawn(async move {
        if let (Ok(client), Some(end)) = (a.await, b.await) {
            let mut client = TokioIo::new(client);
            match (end, labels) {
                (TunnelEnd::Upgraded(u), _) => {
                    let _ =
                        crate::transport::copy::bidirectional(&mut client, &mut TokioIo::new(u))
                            .await;
                }
                (TunnelEnd::Tls(mut s), Some(l)) => {
                    copy_counted(&ctx, l, &mut client, &mut *s).await
                }
                (TunnelEnd::Tcp(mut s), Some(l)) => {
                    copy_counted(&ctx, l, &mut client, &mut s).await
                }
                _ => {}
            }
        }
        drop((guard, slot));
    });
}

/// The far end of a tunnel.
enum TunnelEnd {
    Upgraded(hyper::upgrade::Upgraded),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Tcp(TcpStream),
}

/// HTTP/1.1 `Upgrade` (websockets): a dedicated mTLS connection carrying HTTP/1.1, upgraded
/// on both sides once the far application agrees.
pub(crate) async fn upgrade(
    ctx: Arc<Ctx>,
    mut req: Request<Body>,
    dest: &Destination,
    ep: &Endpoint,
    authority: String,
    slot: Slot,
) -> Response<Body> {
    let stats = RequestStats::start(
        &ctx.metrics,
        OUTBOUND,
        service_label(&ctx, dest),
        peer_label(ep),
        true,
    );
    let header = Header {
        port: ep.app_port,
        protocol: Protocol::Http1,
        authority: Some(authority.clone()),
    };
    let tls = match ctx.connector.connect(ep, &header).await {
        Ok(t) => t,
        Err(e) => {
            let resp = error_response(StatusCode::BAD_GATEWAY, &e.to_string());
            return stats.respond_error(resp, "unreachable");
        }
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tls)).await {
            Ok(x) => x,
            Err(e) => {
                let resp = error_response(StatusCode::BAD_GATEWAY, &format!("peer proxy: {e}"));
                return stats.respond_error(resp, "unreachable");
            }
        };
    tokio::spawn(conn.with_upgrades());
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    parts.uri = path.parse().unwrap_or_default();
    if !parts.headers.contains_key(http::header::HOST)
        && let Ok(v) = authority.parse()
    {
        parts.headers.insert(http::header::HOST, v);
    }
    let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            let resp = error_response(StatusCode::BAD_GATEWAY, &format!("peer proxy: {e}"));
            return stats.respond_error(resp, "reset");
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let server_upgrade = hyper::upgrade::on(&mut resp);
        let far = async move { server_upgrade.await.ok().map(TunnelEnd::Upgraded) };
        spawn_tunnel(ctx.clone(), slot, client_upgrade, far, None);
    }
    stats.respond(resp.map(h::incoming))
}

/// Resolves and vets a destination outside the mesh: this proxy's own listeners are loops.
async fn vet(ctx: &Ctx, authority: &str) -> Result<SocketAddr, Response<Body>> {
    crate::own::vet(&ctx.own, authority).await.map_err(|e| {
        let status = match e {
            VetError::Loop(_) => {
                ctx.metrics.refused(OUTBOUND, "loop");
                StatusCode::LOOP_DETECTED
            }
            VetError::Resolve(..) => StatusCode::BAD_GATEWAY,
        };
        error_response(status, &e.to_string())
    })
}

/// A destination outside the mesh: plain HTTP/1.1 to it, as the application asked.
pub(crate) async fn passthrough(
    ctx: Arc<Ctx>,
    req: Request<Body>,
    authority: String,
    connect_to: String,
) -> Response<Body> {
    let stats = RequestStats::start(
        &ctx.metrics,
        OUTBOUND,
        ctx.metrics.authorities.other(),
        Label::empty(),
        false,
    );
    let resp = passthrough_inner(&ctx, req, &authority, &connect_to).await;
    stats.respond(resp)
}

async fn passthrough_inner(
    ctx: &Ctx,
    req: Request<Body>,
    authority: &str,
    connect_to: &str,
) -> Response<Body> {
    if h::is_upgrade(&req) {
        return error_response(
            StatusCode::NOT_IMPLEMENTED,
            "upgrades to destinations outside the mesh are not supported yet",
        );
    }
    let addr = match vet(ctx, connect_to).await {
        Ok(a) => a,
        Err(resp) => return resp,
    };
    let (mut parts, body) = req.into_parts();
    h::strip_hop_by_hop(&mut parts.headers);
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    if !parts.headers.contains_key(http::header::HOST)
        && let Ok(v) = authority.parse()
    {
        parts.headers.insert(http::header::HOST, v);
    }
    parts.uri = match format!("http://{addr}{path}").parse() {
        Ok(u) => u,
        Err(e) => {
            return error_response(StatusCode::BAD_REQUEST, &format!("bad request target: {e}"));
        }
    };
    let app_version = parts.version;
    parts.version = Version::HTTP_11;
    match ctx.http1.request(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            h::strip_hop_by_hop(&mut parts.headers);
            parts.version = app_version;
            Response::from_parts(parts, h::incoming(body))
        }
        Err(e) => error_response(StatusCode::BAD_GATEWAY, &format!("{authority}: {e}")),
    }
}

/// `CONNECT host:port`: an opaque TCP tunnel, over mTLS when the destination is meshed.
async fn connect_tunnel(ctx: Arc<Ctx>, mut req: Request<Incoming>, slot: Slot) -> Response<Body> {
    let Some(target) = req.uri().authority().map(|a| a.to_string()) else {
        return error_response(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    let resolution = match ctx.resolver.resolve(&target).await {
        Ok(r) => r,
        Err(e) => return error_response(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let (end, labels) = match resolution {
        Resolution::Meshed(dest) => {
            let Some(ep) = pick(&dest).cloned() else {
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("{target} has no ready endpoints"),
                );
            };
            if ep.identity.is_none() {
                if !plaintext_allowed(&ctx, &ep, &dest.authority) {
                    return not_meshed(&ep, &dest);
                }
                match TcpStream::connect(ep.connect).await {
                    Ok(s) => (TunnelEnd::Tcp(s), plain_labels()),
                    Err(e) => {
                        return error_response(StatusCode::BAD_GATEWAY, &format!("{target}: {e}"));
                    }
                }
            } else {
                let header = Header {
                    port: ep.app_port,
                    protocol: Protocol::Opaque,
                    authority: Some(target.clone()),
                };
                match ctx.connector.connect(&ep, &header).await {
                    Ok(s) => (
                        TunnelEnd::Tls(Box::new(s)),
                        TcpLabels {
                            direction: OUTBOUND,
                            peer_identity: peer_label(&ep),
                            tls: "true",
                        },
                    ),
                    Err(e) => return error_response(StatusCode::BAD_GATEWAY, &e.to_string()),
                }
            }
        }
        Resolution::Unknown => {
            let addr = match vet(&ctx, &target).await {
                Ok(a) => a,
                Err(resp) => return resp,
            };
            match TcpStream::connect(addr).await {
                Ok(s) => (TunnelEnd::Tcp(s), plain_labels()),
                Err(e) => {
                    return error_response(StatusCode::BAD_GATEWAY, &format!("{target}: {e}"));
                }
            }
        }
    };
    let far = async move { Some(end) };
    spawn_tunnel(ctx, slot, on_upgrade, far, Some(labels));
    Response::new(h::full(""))
}

fn plain_labels() -> TcpLabels {
    TcpLabels {
        direction: OUTBOUND,
        peer_identity: Label::empty(),
        tls: "false",
    }
}

/// Copies both ways, keeping the TCP metrics.
pub async fn copy_counted<A, B>(ctx: &Ctx, labels: TcpLabels, a: &mut A, b: &mut B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    let m = &ctx.metrics;
    m.tcp_open.get_or_create(&labels).inc();
    m.tcp_active.get_or_create(&labels).inc();
    let result = crate::transport::copy::bidirectional(a, b).await;
    if let Ok((from_a, from_b)) = result {
        m.tcp_read_bytes.get_or_create(&labels).inc_by(from_a);
        m.tcp_write_bytes.get_or_create(&labels).inc_by(from_b);
    }
    m.tcp_active.get_or_create(&labels).dec();
    m.tcp_close.get_or_create(&labels).inc();
}
