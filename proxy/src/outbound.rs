//! Outbound: what the local application sends. In explicit mode the application uses the
//! outbound listener as an HTTP proxy (absolute-form requests, `Host`, or `CONNECT` for
//! opaque TCP); in transparent mode iptables redirects its connections here and the original
//! destination decides. Meshed destinations are reached over mTLS; others are passed through.

use crate::control::Resolution;
use crate::ctx::{Ctx, pick};
use crate::destination::{Destination, Endpoint};
use crate::http::{self as h, Body, error_response};
use crate::metrics::{Label, OUTBOUND, RequestStats, TcpLabels};
use crate::transport::{Header, Protocol};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::{TcpListener, TcpStream};

/// Accepts until draining starts.
pub async fn serve(ctx: Arc<Ctx>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = ctx.drain.signaled() => return,
        };
        let (tcp, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let guard = ctx.drain.guard();
        tokio::spawn(async move {
            match ctx.config.mode {
                crate::config::CaptureMode::Explicit => serve_http(ctx, tcp, client, None).await,
                crate::config::CaptureMode::Transparent => transparent(ctx, tcp, client).await,
            }
            drop(guard);
        });
    }
}

/// A redirected connection (transparent mode): the original destination decides where it
/// goes; the first bytes decide whether it is HTTP (handled request by request) or opaque.
async fn transparent(ctx: Arc<Ctx>, tcp: TcpStream, client: SocketAddr) {
    let Some(orig) = crate::orig_dst_addr(&tcp) else {
        ctx.metrics.refused(OUTBOUND, "no_original_destination");
        return;
    };
    if ctx.own_ports.contains(&orig.port()) && orig.ip().is_loopback() {
        ctx.metrics.refused(OUTBOUND, "loop");
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
    let protocol = if declared_opaque || ctx.config.opaque_ports.contains(&orig.port()) {
        crate::detect::Detected::Opaque
    } else {
        match crate::detect::detect(&tcp, ctx.config.detect_timeout).await {
            Ok((d, took)) => {
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
    if protocol != crate::detect::Detected::Opaque {
        return serve_http(ctx, tcp, client, Some(target)).await;
    }
    let mut tcp = tcp;
    match resolution {
        Resolution::Meshed(dest) => {
            let Some(ep) = pick(&dest).cloned() else {
                ctx.metrics.refused(OUTBOUND, "no_endpoints");
                return;
            };
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
        Resolution::Unknown => match TcpStream::connect(orig).await {
            Ok(mut upstream) => {
                let labels = TcpLabels {
                    direction: OUTBOUND,
                    peer_identity: Label::empty(),
                    tls: "false",
                };
                copy_counted(&ctx, labels, &mut tcp, &mut upstream).await;
            }
            Err(e) => tracing::debug!(%orig, error = %e, "passthrough connect failed"),
        },
    }
}

/// Serves the application's HTTP connection (HTTP/1.1 or HTTP/2), request by request. With a
/// `target` (transparent mode), requests go to that original destination; without one, each
/// request's authority decides.
pub async fn serve_http(ctx: Arc<Ctx>, tcp: TcpStream, client: SocketAddr, target: Option<String>) {
    let svc_ctx = ctx.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = svc_ctx.clone();
        let target = target.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(ctx, req, target).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
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

async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>, target: Option<String>) -> Response<Body> {
    if req.method() == Method::CONNECT && target.is_none() {
        return connect_tunnel(ctx, req).await;
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
            passthrough(ctx, req, authority, connect_to).await
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
            if h::is_upgrade(&req) {
                upgrade(ctx, req, &dest, &ep, authority).await
            } else {
                forward(ctx, req, &ep, authority).await
            }
        }
    }
}

/// The endpoint's identity as a metric label (empty outside the mesh).
fn peer_label(ep: &Endpoint) -> Label {
    ep.identity
        .as_ref()
        .map(|i| Label::from(i.shared()))
        .unwrap_or_else(Label::empty)
}

/// Sends a request over the pooled HTTP/2 mTLS connection to the endpoint's proxy.
async fn forward(
    ctx: Arc<Ctx>,
    req: Request<Incoming>,
    ep: &Endpoint,
    authority: String,
) -> Response<Body> {
    let started = Instant::now();
    let stats = RequestStats::new(&ctx.metrics, OUTBOUND, &authority, peer_label(ep), true);
    stats.count_request(&ctx.metrics);
    let (mut parts, body) = req.into_parts();
    let app_version = parts.version;
    if app_version != Version::HTTP_2
        && ep.transport == crate::destination::Transport::Musubi
        && let Ok(v) = h::version_name(app_version).parse()
    {
        parts.headers.insert(h::ORIG_PROTO, v);
    }
    parts.headers.remove(h::CLIENT_ID);
    h::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    parts.version = Version::HTTP_2;
    parts.uri = match h::absolute_uri(&parts.uri, &authority) {
        Ok(u) => u,
        Err(e) => {
            return error_response(StatusCode::BAD_REQUEST, &format!("bad request target: {e}"));
        }
    };
    let req = Request::from_parts(parts, h::incoming(body));
    let resp = match ctx.pool.sender(ep, &authority).await {
        Err(e) => {
            ctx.metrics.refused(OUTBOUND, e.label());
            tracing::warn!(%authority, endpoint = %ep.connect, error = %e, "cannot reach endpoint");
            error_response(StatusCode::BAD_GATEWAY, &e.to_string())
        }
        Ok(mut sender) => match sender.send_request(req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                h::strip_hop_by_hop(&mut parts.headers);
                parts.version = app_version;
                Response::from_parts(parts, h::incoming(body))
            }
            Err(e) => error_response(StatusCode::BAD_GATEWAY, &format!("peer proxy: {e}")),
        },
    };
    stats.record(&ctx.metrics, started, &resp);
    resp
}

/// HTTP/1.1 `Upgrade` (websockets): a dedicated mTLS connection carrying HTTP/1.1, upgraded
/// on both sides once the far application agrees.
async fn upgrade(
    ctx: Arc<Ctx>,
    mut req: Request<Incoming>,
    _dest: &Destination,
    ep: &Endpoint,
    authority: String,
) -> Response<Body> {
    let started = Instant::now();
    let stats = RequestStats::new(&ctx.metrics, OUTBOUND, &authority, peer_label(ep), true);
    stats.count_request(&ctx.metrics);
    let header = Header {
        port: ep.app_port,
        protocol: Protocol::Http1,
        authority: Some(authority.clone()),
    };
    let tls = match ctx.connector.connect(ep, &header).await {
        Ok(t) => t,
        Err(e) => return error_response(StatusCode::BAD_GATEWAY, &e.to_string()),
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tls)).await {
            Ok(x) => x,
            Err(e) => return error_response(StatusCode::BAD_GATEWAY, &format!("peer proxy: {e}")),
        };
    tokio::spawn(conn.with_upgrades());
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    parts.headers.remove(h::CLIENT_ID);
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
    let mut resp = match sender
        .send_request(Request::from_parts(parts, h::incoming(body)))
        .await
    {
        Ok(r) => r,
        Err(e) => return error_response(StatusCode::BAD_GATEWAY, &format!("peer proxy: {e}")),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let server_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(c), Ok(s)) = (client_upgrade.await, server_upgrade.await) {
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(s)).await;
            }
        });
    }
    let (parts, body) = resp.into_parts();
    let resp = Response::from_parts(parts, h::incoming(body));
    stats.record(&ctx.metrics, started, &resp);
    resp
}

/// A destination outside the mesh: plain HTTP/1.1 to it, as the application asked.
async fn passthrough(
    ctx: Arc<Ctx>,
    req: Request<Incoming>,
    authority: String,
    connect_to: String,
) -> Response<Body> {
    let started = Instant::now();
    let stats = RequestStats::new(&ctx.metrics, OUTBOUND, &authority, Label::empty(), false);
    stats.count_request(&ctx.metrics);
    if h::is_upgrade(&req) {
        return error_response(
            StatusCode::NOT_IMPLEMENTED,
            "upgrades to destinations outside the mesh are not supported yet",
        );
    }
    let (mut parts, body) = req.into_parts();
    h::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(h::CLIENT_ID);
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
    parts.uri = match format!("http://{connect_to}{path}").parse() {
        Ok(u) => u,
        Err(e) => {
            return error_response(StatusCode::BAD_REQUEST, &format!("bad request target: {e}"));
        }
    };
    let app_version = parts.version;
    parts.version = Version::HTTP_11;
    let resp = match ctx
        .http1
        .request(Request::from_parts(parts, h::incoming(body)))
        .await
    {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            h::strip_hop_by_hop(&mut parts.headers);
            parts.version = app_version;
            Response::from_parts(parts, h::incoming(body))
        }
        Err(e) => error_response(StatusCode::BAD_GATEWAY, &format!("{authority}: {e}")),
    };
    stats.record(&ctx.metrics, started, &resp);
    resp
}

/// `CONNECT host:port`: an opaque TCP tunnel, over mTLS when the destination is meshed.
async fn connect_tunnel(ctx: Arc<Ctx>, mut req: Request<Incoming>) -> Response<Body> {
    let Some(target) = req.uri().authority().map(|a| a.to_string()) else {
        return error_response(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    let resolution = match ctx.resolver.resolve(&target).await {
        Ok(r) => r,
        Err(e) => return error_response(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    match resolution {
        Resolution::Meshed(dest) => {
            let Some(ep) = pick(&dest).cloned() else {
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("{target} has no ready endpoints"),
                );
            };
            let header = Header {
                port: ep.app_port,
                protocol: Protocol::Opaque,
                authority: Some(target.clone()),
            };
            let upstream = match ctx.connector.connect(&ep, &header).await {
                Ok(s) => s,
                Err(e) => return error_response(StatusCode::BAD_GATEWAY, &e.to_string()),
            };
            let id = peer_label(&ep);
            tokio::spawn(tunnel(ctx, on_upgrade, upstream, id, true));
        }
        Resolution::Unknown => {
            let upstream = match TcpStream::connect(&target).await {
                Ok(s) => s,
                Err(e) => {
                    return error_response(StatusCode::BAD_GATEWAY, &format!("{target}: {e}"));
                }
            };
            tokio::spawn(tunnel(ctx, on_upgrade, upstream, Label::empty(), false));
        }
    }
    Response::new(h::full(""))
}

async fn tunnel<S>(
    ctx: Arc<Ctx>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    mut upstream: S,
    peer: Label,
    tls: bool,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(client) = on_upgrade.await else { return };
    let labels = TcpLabels {
        direction: OUTBOUND,
        peer_identity: peer,
        tls: if tls { "true" } else { "false" },
    };
    copy_counted(&ctx, labels, &mut TokioIo::new(client), &mut upstream).await;
}

/// Buffer per direction for opaque streams: 64 KiB lets one read fill a whole TLS record
/// (16 KiB) several times over instead of cutting the stream into 8 KiB pieces.
const COPY_BUF: usize = 64 * 1024;

/// Copies both ways, keeping the TCP metrics.
pub async fn copy_counted<A, B>(ctx: &Ctx, labels: TcpLabels, a: &mut A, b: &mut B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let m = &ctx.metrics;
    m.tcp_open.get_or_create(&labels).inc();
    m.tcp_active.get_or_create(&labels).inc();
    let result = tokio::io::copy_bidirectional_with_sizes(a, b, COPY_BUF, COPY_BUF).await;
    if let Ok((from_a, from_b)) = result {
        m.tcp_read_bytes.get_or_create(&labels).inc_by(from_a);
        m.tcp_write_bytes.get_or_create(&labels).inc_by(from_b);
    }
    m.tcp_active.get_or_create(&labels).dec();
    m.tcp_close.get_or_create(&labels).inc();
}
