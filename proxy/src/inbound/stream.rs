//! A byte stream bound for an application port (an opaque mesh stream, plaintext, the
//! application's own TLS): carried out as [`super::plan`] decides, and the HTTP servers the
//! inbound side runs, with their limits.

use super::app::{self, Caller};
use super::plan::{self, FirstSpeaker, Plan, Start};
use crate::ctx::Ctx;
use crate::detect::{self, Outcome};
use crate::metrics::{DetectLabels, INBOUND, TcpLabels};
use crate::outbound::copy_counted;
use crate::policy::{InboundPolicy, Peer};
use crate::transport::Prefixed;
use bytes::{BufMut, BytesMut};
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Serves one stream for `port`. `buf` holds bytes already read from it (the caller's
/// detection); `deadline` bounds detection; `app_tls`: the stream is the application's own
/// TLS.
#[allow(clippy::too_many_arguments)]
pub async fn serve<S: Io>(
    ctx: &Arc<Ctx>,
    policy: &InboundPolicy,
    mut io: S,
    mut buf: BytesMut,
    deadline: Instant,
    port: u16,
    caller: Arc<Caller>,
    app_tls: bool,
) {
    let declared = ctx.protocol(policy, port);
    match plan::start(declared, app_tls) {
        Start::Refuse(reason) => {
            ctx.metrics.refused(INBOUND, reason);
            tracing::info!(
                port,
                reason,
                "refused a stream the application cannot be given"
            );
        }
        Start::Raw => raw(ctx, Prefixed::new(buf.freeze(), io), None, port, &caller).await,
        Start::Http => serve_auto(ctx, Prefixed::new(buf.freeze(), io), caller, port).await,
        Start::Detect => {
            let outcome = match detected(ctx, &mut io, &mut buf, deadline).await {
                Some(o) => o,
                None => return,
            };
            match plan::after_detection(outcome) {
                Plan::Http => serve_auto(ctx, Prefixed::new(buf.freeze(), io), caller, port).await,
                Plan::Raw => raw(ctx, Prefixed::new(buf.freeze(), io), None, port, &caller).await,
                Plan::Close => {}
                Plan::ServerFirst => server_first(ctx, io, buf, port, caller).await,
            }
        }
    }
}

/// Detection, counted.
async fn detected<S: Io>(
    ctx: &Ctx,
    io: &mut S,
    buf: &mut BytesMut,
    deadline: Instant,
) -> Option<Outcome> {
    let (outcome, took) = detect::detect(io, buf, deadline).await.ok()?;
    let protocol = match outcome {
        Outcome::Known(d) => d.as_str(),
        Outcome::Timeout { .. } => "timeout",
        Outcome::Eof => "eof",
    };
    let labels = DetectLabels {
        direction: INBOUND,
        protocol,
    };
    ctx.metrics.detections.get_or_create(&labels).inc();
    ctx.metrics
        .detect_seconds
        .get_or_create(&labels)
        .observe(took.as_secs_f64());
    Some(outcome)
}

/// The client said nothing within the detection timeout. Server-speaks-first protocols (SMTP,
/// MySQL) work this way; an HTTP server never speaks first. So connect to the application
/// and wait for whoever speaks: the application → pass the bytes through; the client → decide
/// from its bytes after all (an HTTP request sent late is still served as HTTP).
async fn server_first<S: Io>(
    ctx: &Arc<Ctx>,
    mut io: S,
    mut buf: BytesMut,
    port: u16,
    caller: Arc<Caller>,
) {
    let Some(app) = connect_app(ctx, port).await else {
        return;
    };
    buf.reserve(512);
    let mut limited = (&mut buf).limit(detect::MAX_PEEK);
    let spoke = tokio::select! {
        r = app.readable() => r.ok().map(|_| FirstSpeaker::App),
        r = io.read_buf(&mut limited) => match r {
            Ok(n) if n > 0 => Some(FirstSpeaker::Client),
            _ => None,
        },
    };
    let plan = match spoke {
        None => return,
        Some(s) => match plan::server_first(s) {
            Some(p) => p,
            None => {
                let deadline = Instant::now() + ctx.config.detect_timeout;
                let Some(outcome) = detected(ctx, &mut io, &mut buf, deadline).await else {
                    return;
                };
                plan::after_detection(outcome)
            }
        },
    };
    match plan {
        Plan::Raw => {
            raw(
                ctx,
                Prefixed::new(buf.freeze(), io),
                Some(app),
                port,
                &caller,
            )
            .await
        }
        Plan::Http => {
            drop(app);
            serve_auto(ctx, Prefixed::new(buf.freeze(), io), caller, port).await;
        }
        Plan::Close | Plan::ServerFirst => {}
    }
}

async fn connect_app(ctx: &Ctx, port: u16) -> Option<TcpStream> {
    match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(app) => {
            let _ = app.set_nodelay(true);
            Some(app)
        }
        Err(e) => {
            ctx.metrics.refused(INBOUND, "app_unreachable");
            tracing::debug!(port, error = %e, "application not reachable");
            None
        }
    }
}

/// Bytes through, untouched, to the application's port.
async fn raw<S: Io>(
    ctx: &Ctx,
    mut downstream: Prefixed<S>,
    app: Option<TcpStream>,
    port: u16,
    caller: &Caller,
) {
    let app = match app {
        Some(a) => Some(a),
        None => connect_app(ctx, port).await,
    };
    let Some(mut app) = app else { return };
    let labels = TcpLabels {
        direction: INBOUND,
        peer_identity: caller.label.clone(),
        tls: if matches!(caller.peer, Peer::Mesh(_)) {
            "true"
        } else {
            "false"
        },
    };
    copy_counted(ctx, labels, &mut downstream, &mut app).await;
}

fn service(
    ctx: &Arc<Ctx>,
    caller: Arc<Caller>,
    port: u16,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = http::Response<crate::http::Body>,
    Error = std::convert::Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static {
    let ctx = ctx.clone();
    hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        let caller = caller.clone();
        async move { Ok(app::to_app(ctx, req, caller, port).await) }
    })
}

/// HTTP/1 or HTTP/2, whichever the stream speaks (plaintext, or an opaque mesh stream that
/// carries HTTP: a CONNECT tunnel, for one).
async fn serve_auto<S: Io>(ctx: &Arc<Ctx>, io: S, caller: Arc<Caller>, port: u16) {
    let limits = &ctx.config.limits;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service(ctx, caller, port));
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = ctx.drain.signaled() => { conn.as_mut().graceful_shutdown(); conn.await }
    };
    if let Err(e) = result {
        let timeout = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout);
        count_end(ctx, timeout);
    }
}

/// Counts a client that did not send its request head in time (slowloris).
fn count_end(ctx: &Ctx, header_timeout: bool) {
    if header_timeout {
        ctx.metrics.refused(INBOUND, "header_timeout");
    }
}

/// HTTP/2 between proxies (or from an mTLS HTTP/2 peer).
pub async fn serve_h2<S: Io>(
    ctx: &Arc<Ctx>,
    io: S,
    caller: Arc<Caller>,
    port: u16,
) -> Result<(), hyper::Error> {
    let limits = &ctx.config.limits;
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        .serve_connection(TokioIo::new(io), service(ctx, caller, port));
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        _ = ctx.drain.signaled() => { conn.as_mut().graceful_shutdown(); conn.await }
    }
}

/// One HTTP/1.1 connection between proxies (an `Upgrade` request, such as a websocket).
pub async fn serve_h1<S: Io>(
    ctx: &Arc<Ctx>,
    io: S,
    caller: Arc<Caller>,
    port: u16,
) -> Result<(), hyper::Error> {
    let limits = &ctx.config.limits;
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes)
        .serve_connection(TokioIo::new(io), service(ctx, caller, port))
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = ctx.drain.signaled() => { conn.as_mut().graceful_shutdown(); conn.await }
    };
    if let Err(e) = &result {
        count_end(ctx, e.is_timeout());
    }
    result
}
