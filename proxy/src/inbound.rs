//! Inbound: connections from other workloads (their proxies, over mesh mTLS) and, where policy
//! is PERMISSIVE, from plaintext clients. STRICT ports refuse anything that is not mesh mTLS.
//! Every request reaching the application carries the verified client identity in
//! `musubi-client-id` (any copy from outside is removed).

use crate::ctx::Ctx;
use crate::http::{self as h, Body, error_response};
use crate::metrics::{AuthzLabels, INBOUND, Label, ReasonLabels, RequestStats, TcpLabels};
use crate::outbound::copy_counted;
use crate::policy::{Decision, MtlsMode, Peer, authorize};
use crate::pool::{ALPN, ALPN_H2};
use crate::transport::{Header, Protocol};
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const PEEK_LIMIT: usize = 16 * 1024;

/// Accepts until draining starts. `tls` is the mesh server config (client SVID required).
pub async fn serve(ctx: Arc<Ctx>, listener: TcpListener, tls: Arc<ServerConfig>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = ctx.drain.signaled() => return,
        };
        let (tcp, client) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let tls = tls.clone();
        let guard = ctx.drain.guard();
        tokio::spawn(async move {
            connection(ctx, tcp, client, tls).await;
            drop(guard);
        });
    }
}

/// What the first bytes say the connection is.
#[derive(Debug, PartialEq, Eq)]
enum Hello {
    /// A TLS ClientHello offering Musubi's ALPN.
    Mesh,
    /// TLS offering `h2` but not Musubi's ALPN: another mTLS sidecar (Envoy) on a STRICT port,
    /// or the application's own TLS.
    H2,
    /// TLS, but not ours (the application's own TLS).
    OtherTls,
    Plaintext,
}

/// Peeks (without consuming) at the ClientHello to tell mesh TLS from anything else.
async fn classify_hello(tcp: &TcpStream, timeout: Duration) -> std::io::Result<Hello> {
    let mut buf = vec![0u8; PEEK_LIMIT];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(Hello::Plaintext),
        };
        if n == 0 {
            return Ok(Hello::Plaintext);
        }
        if buf[0] != 0x16 {
            return Ok(Hello::Plaintext);
        }
        let mut acceptor = rustls::server::Acceptor::default();
        let mut rd = &buf[..n];
        if acceptor.read_tls(&mut rd).is_err() {
            return Ok(Hello::OtherTls);
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let alpn: Vec<Vec<u8>> = accepted
                    .client_hello()
                    .alpn()
                    .map(|a| a.map(<[u8]>::to_vec).collect())
                    .unwrap_or_default();
                return Ok(if alpn.iter().any(|p| p == ALPN) {
                    Hello::Mesh
                } else if alpn.iter().any(|p| p == ALPN_H2) {
                    Hello::H2
                } else {
                    Hello::OtherTls
                });
            }
            Ok(None) if n < PEEK_LIMIT => {
                // Partial hello: wait for more bytes to arrive.
                tokio::time::timeout_at(deadline, tcp.readable()).await.ok();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            _ => return Ok(Hello::OtherTls),
        }
    }
}

/// The application port a plaintext or non-mesh connection is for.
fn plain_target_port(ctx: &Ctx, tcp: &TcpStream) -> Option<u16> {
    match ctx.config.mode {
        crate::config::CaptureMode::Explicit => ctx.config.app_ports.first().copied(),
        crate::config::CaptureMode::Transparent => crate::orig_dst_port(tcp),
    }
}

async fn connection(ctx: Arc<Ctx>, tcp: TcpStream, client: SocketAddr, tls: Arc<ServerConfig>) {
    let hello = match classify_hello(&tcp, ctx.config.detect_timeout).await {
        Ok(h) => h,
        Err(_) => return,
    };
    if hello == Hello::Mesh {
        return mesh(ctx, tcp, client, tls, None).await;
    }
    let Some(port) = plain_target_port(&ctx, &tcp) else {
        ctx.metrics.refused(INBOUND, "no_target_port");
        return;
    };
    // HTTP/2 over mTLS from a peer that is not a Musubi proxy (an Envoy sidecar): on a STRICT
    // port nothing but mesh mTLS is accepted anyway, so terminate it as mesh traffic.
    let strict = ctx.policy.borrow().port(port).mtls == MtlsMode::Strict;
    if hello == Hello::H2 && strict {
        let header = Header {
            port,
            protocol: Protocol::Http2,
            authority: None,
        };
        return mesh(ctx, tcp, client, tls, Some(header)).await;
    }
    let decision = authorize(
        &ctx.policy.borrow(),
        port,
        &Peer::Unauthenticated,
        &ctx.config.trust_domain,
    );
    count_authz(&ctx, port, decision);
    if decision != Decision::Allow {
        let reason = if hello == Hello::Plaintext {
            "plaintext_in_strict"
        } else {
            "non_mesh_tls_in_strict"
        };
        ctx.metrics.refused(
            INBOUND,
            if decision == Decision::DenyPlaintext {
                reason
            } else {
                "unauthorized"
            },
        );
        tracing::info!(%client, port, reason, "refused a connection without mesh mTLS");
        return;
    }
    if hello == Hello::Plaintext {
        plaintext(ctx, tcp, port).await;
    } else {
        opaque_to_app(&ctx, tcp, port, Label::empty(), false).await;
    }
}

fn count_authz(ctx: &Ctx, port: u16, decision: Decision) {
    ctx.metrics
        .authz
        .get_or_create(&AuthzLabels {
            port,
            decision: decision.label(),
        })
        .inc();
}

/// Terminates mesh mTLS; reads the transport header unless the peer is a plain HTTP/2 one
/// (`known` gives the header then).
async fn mesh(
    ctx: Arc<Ctx>,
    tcp: TcpStream,
    client: SocketAddr,
    tls: Arc<ServerConfig>,
    known: Option<Header>,
) {
    let accepted = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(tls).accept(tcp),
    )
    .await;
    let mut stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = match e.to_string() {
                t if t.contains("no certificates") => "no_client_certificate",
                t if t.contains("not in trust domain") => "foreign_trust_domain",
                t if t.contains("xpired") => "expired",
                t if t.contains("UnknownIssuer") || t.contains("BadSignature") => "unknown_ca",
                _ => "other",
            };
            ctx.metrics
                .tls_failures
                .get_or_create(&ReasonLabels {
                    direction: INBOUND,
                    reason,
                })
                .inc();
            tracing::info!(%client, error = %e, "inbound mTLS handshake failed");
            return;
        }
        Err(_) => {
            ctx.metrics
                .tls_failures
                .get_or_create(&ReasonLabels {
                    direction: INBOUND,
                    reason: "timeout",
                })
                .inc();
            return;
        }
    };
    ctx.metrics
        .tls_handshakes
        .get_or_create(&ReasonLabels {
            direction: INBOUND,
            reason: "ok",
        })
        .inc();
    let Some(peer) = musubi_identity::tls::peer_identity(stream.get_ref().1.peer_certificates())
    else {
        ctx.metrics.refused(INBOUND, "no_client_identity");
        return;
    };
    let read = async {
        match known {
            Some(h) => Ok(h),
            None => Header::read(&mut stream).await,
        }
    };
    let header = match tokio::time::timeout(ctx.config.detect_timeout, read).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            ctx.metrics.refused(INBOUND, "bad_transport_header");
            tracing::info!(%client, %peer, error = %e, "refused: bad transport header");
            return;
        }
        Err(_) => {
            ctx.metrics.refused(INBOUND, "transport_header_timeout");
            return;
        }
    };
    if !ctx.app_port_allowed(header.port) {
        ctx.metrics.refused(INBOUND, "port_not_allowed");
        tracing::info!(%client, %peer, port = header.port, "refused: not an application port of this workload");
        return;
    }
    match header.protocol {
        Protocol::Opaque => {
            let decision = authorize(
                &ctx.policy.borrow(),
                header.port,
                &Peer::Mesh(peer.clone()),
                &ctx.config.trust_domain,
            );
            count_authz(&ctx, header.port, decision);
            if decision != Decision::Allow {
                ctx.metrics.refused(INBOUND, "unauthorized");
                tracing::info!(%client, %peer, port = header.port, "denied opaque connection");
                return;
            }
            opaque_to_app(&ctx, stream, header.port, Label::from(peer.shared()), true).await;
        }
        Protocol::Http2 | Protocol::Http1 => {
            let svc_ctx = ctx.clone();
            let port = header.port;
            let caller = Caller::new(Peer::Mesh(peer));
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let ctx = svc_ctx.clone();
                let caller = caller.clone();
                async move { Ok::<_, std::convert::Infallible>(to_app(ctx, req, caller, port).await) }
            });
            let io = TokioIo::new(stream);
            let result = if header.protocol == Protocol::Http2 {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, svc);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = ctx.drain.signaled() => { conn.as_mut().graceful_shutdown(); conn.await }
                }
            } else {
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .with_upgrades();
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = ctx.drain.signaled() => { conn.as_mut().graceful_shutdown(); conn.await }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%client, error = %e, "inbound mesh connection ended with an error");
            }
        }
    }
}

async fn plaintext(ctx: Arc<Ctx>, tcp: TcpStream, port: u16) {
    let (detected, took) = match crate::detect::detect(&tcp, ctx.config.detect_timeout).await {
        Ok(d) => d,
        Err(_) => return,
    };
    let labels = crate::metrics::DetectLabels {
        direction: INBOUND,
        protocol: detected.as_str(),
    };
    ctx.metrics.detections.get_or_create(&labels).inc();
    ctx.metrics
        .detect_seconds
        .get_or_create(&labels)
        .observe(took.as_secs_f64());
    if detected == crate::detect::Detected::Opaque {
        return opaque_to_app(&ctx, tcp, port, Label::empty(), false).await;
    }
    let svc_ctx = ctx.clone();
    let caller = Caller::new(Peer::Unauthenticated);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = svc_ctx.clone();
        let caller = caller.clone();
        async move { Ok::<_, std::convert::Infallible>(to_app(ctx, req, caller, port).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
    tokio::pin!(conn);
    let _ = tokio::select! {
        r = conn.as_mut() => r,
        _ = ctx.drain.signaled() => { conn.as_mut().graceful_shutdown(); conn.await }
    };
}

async fn opaque_to_app<S>(ctx: &Ctx, mut downstream: S, port: u16, peer: Label, tls: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(mut app) = TcpStream::connect(("127.0.0.1", port)).await else {
        ctx.metrics.refused(INBOUND, "app_unreachable");
        return;
    };
    let _ = app.set_nodelay(true);
    let labels = TcpLabels {
        direction: INBOUND,
        peer_identity: peer,
        tls: if tls { "true" } else { "false" },
    };
    copy_counted(ctx, labels, &mut downstream, &mut app).await;
}

/// The caller on an inbound connection, with what every request on it needs computed once.
struct Caller {
    peer: Peer,
    /// Metric label: the SPIFFE ID, or empty.
    label: Label,
    /// The `musubi-client-id` value handed to the application.
    header: Option<HeaderValue>,
}

impl Caller {
    fn new(peer: Peer) -> Arc<Self> {
        let (label, header) = match &peer {
            Peer::Mesh(id) => (
                Label::from(id.shared()),
                HeaderValue::from_str(id.as_str()).ok(),
            ),
            Peer::Unauthenticated => (Label::empty(), None),
        };
        Arc::new(Caller {
            peer,
            label,
            header,
        })
    }
}

/// Forwards one request to the application on `port`, as the HTTP version the client app used.
async fn to_app(
    ctx: Arc<Ctx>,
    mut req: Request<Incoming>,
    caller: Arc<Caller>,
    port: u16,
) -> Response<Body> {
    let started = Instant::now();
    let peer = &caller.peer;
    let authority = h::authority(&req).unwrap_or_default();
    let stats = RequestStats::new(
        &ctx.metrics,
        INBOUND,
        &authority,
        caller.label.clone(),
        matches!(peer, Peer::Mesh(_)),
    );
    stats.count_request(&ctx.metrics);
    let decision = authorize(&ctx.policy.borrow(), port, peer, &ctx.config.trust_domain);
    count_authz(&ctx, port, decision);
    let resp = if decision != Decision::Allow {
        ctx.metrics.refused(INBOUND, "unauthorized");
        error_response(
            StatusCode::FORBIDDEN,
            &format!("{} may not call port {port}", describe(peer)),
        )
    } else {
        let upgrade = h::is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let orig = parts.headers.remove(h::ORIG_PROTO);
        let client_version = parts.version;
        parts.headers.remove(h::CLIENT_ID);
        if let Some(v) = &caller.header {
            parts.headers.insert(h::CLIENT_ID, v.clone());
        }
        let to_http1 = match orig.as_ref().and_then(|v| v.to_str().ok()) {
            Some("HTTP/1.0") | Some("HTTP/1.1") => true,
            Some(_) => false,
            None => client_version != Version::HTTP_2,
        };
        if !upgrade {
            h::strip_hop_by_hop(&mut parts.headers);
        }
        if to_http1
            && !parts.headers.contains_key(http::header::HOST)
            && let Ok(v) = authority.parse()
        {
            parts.headers.insert(http::header::HOST, v);
        }
        let sent = if to_http1 {
            // Origin form: the connection is to the application already.
            let path = parts.uri.path_and_query().cloned();
            parts.uri = Uri::from(path.unwrap_or_else(|| PathAndQuery::from_static("/")));
            parts.version = Version::HTTP_11;
            let req = Request::from_parts(parts, h::incoming(body));
            ctx.local.send(port, req).await.map_err(|e| e.to_string())
        } else {
            parts.uri =
                h::absolute_uri(&parts.uri, &format!("127.0.0.1:{port}")).unwrap_or_default();
            parts.version = Version::HTTP_2;
            let req = Request::from_parts(parts, h::incoming(body));
            match ctx.http2.request(req).await {
                Ok(resp) => Ok(resp.map(h::incoming)),
                Err(e) => Err(format!("application on port {port}: {e}")),
            }
        };
        match sent {
            Ok(mut resp) => {
                if let Some(client_upgrade) = client_upgrade
                    && resp.status() == StatusCode::SWITCHING_PROTOCOLS
                {
                    let app_upgrade = hyper::upgrade::on(&mut resp);
                    tokio::spawn(async move {
                        if let (Ok(c), Ok(a)) = (client_upgrade.await, app_upgrade.await) {
                            let _ = tokio::io::copy_bidirectional(
                                &mut TokioIo::new(c),
                                &mut TokioIo::new(a),
                            )
                            .await;
                        }
                    });
                    resp
                } else {
                    h::strip_hop_by_hop(resp.headers_mut());
                    *resp.version_mut() = client_version;
                    resp
                }
            }
            Err(e) => {
                ctx.metrics.refused(INBOUND, "app_unreachable");
                error_response(StatusCode::BAD_GATEWAY, &e)
            }
        }
    };
    stats.record(&ctx.metrics, started, &resp);
    resp
}

fn describe(peer: &Peer) -> String {
    match peer {
        Peer::Mesh(id) => id.to_string(),
        Peer::Unauthenticated => "an unauthenticated client".into(),
    }
}
