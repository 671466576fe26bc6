//! Inbound: connections from other workloads (their proxies, over mesh mTLS) and, where policy
//! is PERMISSIVE, from plaintext clients. STRICT ports refuse anything that is not mesh mTLS.
//! The server's proxy decides what reaches its application ([`plan`]): only declared ports,
//! never the proxy's own, and nothing that may be HTTP through an opaque path, so every
//! request an application receives carries `musubi-client-id` as this proxy set it.

mod app;
pub mod plan;
mod stream;

use crate::ctx::Ctx;
use crate::listen::{Listener, Slot};
use crate::metrics::{AuthzLabels, INBOUND, ReasonLabels};
use crate::policy::{Decision, InboundPolicy, Peer, authorize};
use crate::pool::{ALPN, ALPN_H2};
use crate::transport::{FirstBytes, Header, Prefixed, Protocol, read_first};
use bytes::BytesMut;
use plan::{Arrival, Hello};
use rustls::ServerConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub use app::Caller;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most of a ClientHello read to classify it.
const HELLO_LIMIT: usize = 16 * 1024;

/// The mesh's TLS stream: the ClientHello was read ahead and is replayed to rustls.
pub type MeshTls = tokio_rustls::server::TlsStream<Prefixed<TcpStream>>;

/// Accepts until draining starts. `tls` is the mesh server config (client SVID required).
pub async fn serve(ctx: Arc<Ctx>, listener: Listener, tls: Arc<ServerConfig>) {
    loop {
        let (tcp, client, slot) = tokio::select! {
            a = listener.accept(&ctx.metrics) => a,
            _ = ctx.drain.signaled() => return,
        };
        let ctx = ctx.clone();
        let tls = tls.clone();
        let guard = ctx.drain.guard();
        tokio::spawn(async move {
            connection(ctx, tcp, client, tls, slot).await;
            drop(guard);
        });
    }
}

/// Reads the first bytes and tells mesh TLS from anything else.
fn classify_hello(buf: &[u8]) -> Option<Hello> {
    if buf.first() != Some(&0x16) {
        return Some(Hello::Plaintext);
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = buf;
    if acceptor.read_tls(&mut rd).is_err() {
        return Some(Hello::OtherTls);
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            let alpn: Vec<&[u8]> = hello.alpn().map(|a| a.collect()).unwrap_or_default();
            let mesh_sni = hello.server_name() == Some(crate::pool::MESH_SERVER_NAME);
            Some(if alpn.contains(&ALPN) {
                Hello::Mesh
            } else if alpn.contains(&ALPN_H2) {
                Hello::H2 { mesh_sni }
            } else {
                Hello::OtherTls
            })
        }
        Ok(None) => None,
        Err(_) => Some(Hello::OtherTls),
    }
}

/// The application port a plaintext or non-mesh connection is for.
fn plain_target_port(ctx: &Ctx, tcp: &TcpStream) -> Option<u16> {
    match ctx.config.mode {
        crate::config::CaptureMode::Explicit => ctx.config.app_ports.first().copied(),
        crate::config::CaptureMode::Transparent => crate::orig_dst_port(tcp),
    }
}

/// Checks that `port` may receive inbound traffic under `policy`, counting a refusal.
fn port_allowed(ctx: &Ctx, policy: &InboundPolicy, port: u16, who: &dyn std::fmt::Display) -> bool {
    if ctx.own.is_own_port(port) {
        ctx.metrics.refused(INBOUND, "loop");
        tracing::info!(%who, port, "refused: the target is this proxy's own port");
        return false;
    }
    if !ctx.declared(policy, port) {
        ctx.metrics.refused(INBOUND, "port_not_allowed");
        tracing::info!(%who, port, "refused: not a declared application port of this workload");
        return false;
    }
    true
}

async fn connection(
    ctx: Arc<Ctx>,
    mut tcp: TcpStream,
    client: SocketAddr,
    tls: Arc<ServerConfig>,
    slot: Slot,
) {
    let Some(policy) = ctx.policy() else {
        ctx.metrics.refused(INBOUND, "no_policy");
        tracing::info!(%client, "refused: no inbound policy from the controller yet");
        return;
    };
    let deadline = Instant::now() + ctx.config.detect_timeout;
    let mut buf = BytesMut::new();
    let hello = match read_first(&mut tcp, &mut buf, HELLO_LIMIT, deadline, classify_hello).await {
        Ok(FirstBytes::Decided(h)) => h,
        Ok(FirstBytes::Eof) | Err(_) => return,
        // Silence (a server-speaks-first client) or a cut hello.
        Ok(FirstBytes::Timeout | FirstBytes::Full) if buf.first() == Some(&0x16) => Hello::OtherTls,
        Ok(FirstBytes::Timeout | FirstBytes::Full) => Hello::Plaintext,
    };
    if hello == Hello::Mesh {
        return mesh(
            ctx,
            Prefixed::new(buf.freeze(), tcp),
            client,
            tls,
            None,
            slot,
        )
        .await;
    }
    let Some(port) = plain_target_port(&ctx, &tcp) else {
        ctx.metrics.refused(INBOUND, "no_target_port");
        return;
    };
    if !port_allowed(&ctx, &policy, port, &client) {
        return;
    }
    let arrival = plan::arrival(hello, policy.port(port).mtls);
    if arrival == Arrival::MeshH2 {
        let header = Header {
            port,
            protocol: Protocol::Http2,
            authority: None,
        };
        let io = Prefixed::new(buf.freeze(), tcp);
        return mesh(ctx, io, client, tls, Some(header), slot).await;
    }
    if let Arrival::Refuse(reason) = arrival {
        count_authz(&ctx, port, Decision::DenyPlaintext);
        ctx.metrics.refused(INBOUND, reason);
        tracing::info!(%client, port, reason, "refused a connection without mesh mTLS");
        return;
    }
    let decision = authorize(
        &policy,
        port,
        &Peer::Unauthenticated,
        &ctx.config.trust_domain,
    );
    count_authz(&ctx, port, decision);
    if decision != Decision::Allow {
        ctx.metrics.refused(INBOUND, "unauthorized");
        tracing::info!(%client, port, "refused an unauthenticated connection");
        return;
    }
    let caller = Caller::new(&ctx, Peer::Unauthenticated, false, slot);
    let app_tls = arrival == Arrival::AppTls;
    stream::serve(&ctx, &policy, tcp, buf, deadline, port, caller, app_tls).await;
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

fn tls_failure(ctx: &Ctx, reason: &'static str) {
    ctx.metrics
        .tls_failures
        .get_or_create(&ReasonLabels {
            direction: INBOUND,
            reason,
        })
        .inc();
}

/// Terminates mesh mTLS; reads the transport header unless the peer is a plain HTTP/2 one
/// (`known` gives the header then).
async fn mesh(
    ctx: Arc<Ctx>,
    tcp: Prefixed<TcpStream>,
    client: SocketAddr,
    tls: Arc<ServerConfig>,
    known: Option<Header>,
    slot: Slot,
) {
    let accepted = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(tls).accept(tcp),
    )
    .await;
    let mut stream: MeshTls = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = match e.to_string() {
                t if t.contains("no certificates") => "no_client_certificate",
                t if t.contains("not in trust domain") => "foreign_trust_domain",
                t if t.contains("xpired") => "expired",
                t if t.contains("UnknownIssuer") || t.contains("BadSignature") => "unknown_ca",
                _ => "other",
            };
            tls_failure(&ctx, reason);
            tracing::info!(%client, error = %e, "inbound mTLS handshake failed");
            return;
        }
        Err(_) => return tls_failure(&ctx, "timeout"),
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
    let via_musubi = known.is_none();
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
    // The policy as of now: it may have changed during the handshake.
    let Some(policy) = ctx.policy() else {
        ctx.metrics.refused(INBOUND, "no_policy");
        return;
    };
    let port = header.port;
    if !port_allowed(&ctx, &policy, port, &peer) {
        return;
    }
    let who = Peer::Mesh(peer);
    if header.protocol == Protocol::Opaque {
        let decision = authorize(&policy, port, &who, &ctx.config.trust_domain);
        count_authz(&ctx, port, decision);
        if decision != Decision::Allow {
            ctx.metrics.refused(INBOUND, "unauthorized");
            tracing::info!(%client, peer = %describe(&who), port, "denied opaque connection");
            return;
        }
        let caller = Caller::new(&ctx, who, false, slot);
        let deadline = Instant::now() + ctx.config.detect_timeout;
        return stream::serve(
            &ctx,
            &policy,
            stream,
            BytesMut::new(),
            deadline,
            port,
            caller,
            false,
        )
        .await;
    }
    // HTTP between proxies: requests are authorized one by one.
    let caller = Caller::new(&ctx, who, via_musubi, slot);
    let result = if header.protocol == Protocol::Http2 {
        stream::serve_h2(&ctx, stream, caller, port).await
    } else {
        stream::serve_h1(&ctx, stream, caller, port).await
    };
    if let Err(e) = result {
        tracing::debug!(%client, error = %e, "inbound mesh connection ended with an error");
    }
}

pub(crate) fn describe(peer: &Peer) -> String {
    match peer {
        Peer::Mesh(id) => id.to_string(),
        Peer::Unauthenticated => "an unauthenticated client".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_table() {
        assert_eq!(
            classify_hello(b"GET / HTTP/1.1\r\n"),
            Some(Hello::Plaintext)
        );
        assert_eq!(
            classify_hello(b"\x16\x03\x01\x00"),
            None,
            "a cut hello needs more"
        );
        assert_eq!(
            classify_hello(b"\x16\x03\x01\x00\x05garbage"),
            Some(Hello::OtherTls)
        );
    }
}
