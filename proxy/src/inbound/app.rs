//! Requests to the application: authorized one by one, with `musubi-client-id` set from the
//! verified peer (every copy a client sent, in headers or trailers, removed first), in the
//! HTTP version the application's port is declared to speak.

use crate::ctx::Ctx;
use crate::http::{self as h, Body, error_response};
use crate::listen::Slot;
use crate::metrics::{INBOUND, Label, RequestStats};
use crate::policy::{Decision, Peer, PortProtocol, authorize};
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::sync::Arc;

/// The caller on an inbound connection, with what every request on it needs computed once.
pub struct Caller {
    pub peer: Peer,
    /// Metric label: the SPIFFE ID (capped), or empty.
    pub label: Label,
    /// The `musubi-client-id` value handed to the application.
    header: Option<HeaderValue>,
    /// The peer is a Musubi proxy speaking the mesh transport: its `musubi-orig-proto` says
    /// what its application spoke. From anyone else the header is removed and ignored.
    via_musubi: bool,
    /// The connection's place under the listener's cap; an upgraded tunnel keeps holding it.
    slot: Slot,
}

impl Caller {
    pub fn new(ctx: &Ctx, peer: Peer, via_musubi: bool, slot: Slot) -> Arc<Self> {
        let (label, header) = match &peer {
            Peer::Mesh(id) => (
                ctx.metrics.peers.label(id.as_str()),
                HeaderValue::from_str(id.as_str()).ok(),
            ),
            Peer::Unauthenticated => (Label::empty(), None),
        };
        Arc::new(Caller {
            peer,
            label,
            header,
            via_musubi,
            slot,
        })
    }
}

/// Whether a request goes to the application as HTTP/1.1 (else HTTP/2): what the port is
/// declared to speak; for a detected port, what the client application spoke (told by the
/// client proxy in `musubi-orig-proto`, else the version of this hop). Upgrades need HTTP/1.1.
pub fn to_http1(declared: PortProtocol, orig: Option<&str>, hop: Version, upgrade: bool) -> bool {
    if upgrade {
        return true;
    }
    match declared {
        PortProtocol::Http1 => true,
        PortProtocol::Http2 => false,
        PortProtocol::Detect | PortProtocol::Opaque => match orig {
            Some("HTTP/1.0" | "HTTP/1.1") => true,
            Some(_) => false,
            None => hop != Version::HTTP_2,
        },
    }
}

/// Forwards one request to the application on `port`.
pub async fn to_app(
    ctx: Arc<Ctx>,
    mut req: Request<Incoming>,
    caller: Arc<Caller>,
    port: u16,
) -> Response<Body> {
    let Some(policy) = ctx.policy() else {
        return error_response(StatusCode::SERVICE_UNAVAILABLE, "no inbound policy yet");
    };
    let authority = h::authority(&req);
    let label = authority
        .as_deref()
        .and_then(|a| policy.port(port).service_for(a))
        .map(|s| ctx.metrics.authorities.label(&s.canonical))
        .unwrap_or_else(|| ctx.metrics.authorities.other());
    let peer = &caller.peer;
    let stats = RequestStats::start(
        &ctx.metrics,
        INBOUND,
        label,
        caller.label.clone(),
        matches!(peer, Peer::Mesh(_)),
    );
    let decision = authorize(&policy, port, peer, &ctx.config.trust_domain);
    super::count_authz(&ctx, port, decision);
    if decision != Decision::Allow {
        ctx.metrics.refused(INBOUND, "unauthorized");
        let resp = error_response(
            StatusCode::FORBIDDEN,
            &format!("{} may not call port {port}", super::describe(peer)),
        );
        return stats.respond_error(resp, "unauthorized");
    }
    let declared = ctx.protocol(&policy, port);
    drop(policy);
    let upgrade = h::is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let orig = parts.headers.remove(h::ORIG_PROTO);
    if orig.is_some() && !caller.via_musubi {
        ctx.metrics.removed_header(INBOUND, h::ORIG_PROTO_NAME);
    }
    let orig = orig
        .as_ref()
        .filter(|_| caller.via_musubi)
        .and_then(|v| v.to_str().ok());
    let client_version = parts.version;
    let http1 = to_http1(declared, orig, client_version, upgrade);
    for _ in parts.headers.get_all(h::CLIENT_ID) {
        ctx.metrics.removed_header(INBOUND, h::CLIENT_ID_NAME);
    }
    parts.headers.remove(h::CLIENT_ID);
    if let Some(v) = &caller.header {
        parts.headers.insert(h::CLIENT_ID, v.clone());
    }
    if !upgrade {
        h::strip_hop_by_hop(&mut parts.headers);
    }
    let metrics = ctx.metrics.clone();
    let body =
        h::without_proxy_trailers(body, move |header| metrics.removed_header(INBOUND, header));
    let sent = if http1 {
        if !parts.headers.contains_key(http::header::HOST)
            && let Some(v) = authority.as_deref().and_then(|a| a.parse().ok())
        {
            parts.headers.insert(http::header::HOST, v);
        }
        // Origin form: the connection is to the application already.
        let path = parts.uri.path_and_query().cloned();
        parts.uri = Uri::from(path.unwrap_or_else(|| PathAndQuery::from_static("/")));
        parts.version = Version::HTTP_11;
        ctx.local
            .send(port, Request::from_parts(parts, body))
            .await
            .map_err(|e| e.to_string())
    } else {
        // The caller's authority travels as `:authority`; the connection is to 127.0.0.1.
        let authority = authority.unwrap_or_else(|| format!("127.0.0.1:{port}"));
        parts.headers.remove(http::header::HOST);
        match h::absolute_uri(&parts.uri, &authority) {
            Ok(uri) => {
                parts.uri = uri;
                parts.version = Version::HTTP_2;
                match ctx.http2.send(port, Request::from_parts(parts, body)).await {
                    Ok(resp) => Ok(resp.map(h::incoming)),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(format!("bad request authority {authority:?}: {e}")),
        }
    };
    match sent {
        Ok(mut resp) => {
            if let Some(client_upgrade) = client_upgrade
                && resp.status() == StatusCode::SWITCHING_PROTOCOLS
            {
                let app_upgrade = hyper::upgrade::on(&mut resp);
                // The tunnel outlives this request: it keeps the connection's slot and holds
                // off the end of draining like any connection.
                let guard = ctx.drain.guard();
                let slot = caller.slot.clone();
                tokio::spawn(async move {
                    if let (Ok(c), Ok(a)) = (client_upgrade.await, app_upgrade.await) {
                        let _ = crate::transport::copy::bidirectional(
                            &mut TokioIo::new(c),
                            &mut TokioIo::new(a),
                        )
                        .await;
                    }
                    drop((guard, slot));
                });
                stats.respond(resp)
            } else {
                h::strip_hop_by_hop(resp.headers_mut());
                *resp.version_mut() = client_version;
                stats.respond(resp)
            }
        }
        Err(e) => {
            ctx.metrics.refused(INBOUND, "app_unreachable");
            stats.respond_error(error_response(StatusCode::BAD_GATEWAY, &e), "unreachable")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_to_the_application_table() {
        use PortProtocol::*;
        let h1 = Version::HTTP_11;
        let h2 = Version::HTTP_2;
        let cases = [
            // Declared ports decide, whatever the caller spoke.
            (Http1, None, h2, false, true),
            (Http1, Some("HTTP/2"), h2, false, true),
            (Http2, None, h1, false, false),
            (Http2, Some("HTTP/1.1"), h2, false, false),
            // Detected ports follow the client application.
            (Detect, Some("HTTP/1.1"), h2, false, true),
            (Detect, Some("HTTP/1.0"), h2, false, true),
            (Detect, Some("HTTP/2"), h2, false, false),
            (Detect, None, h2, false, false),
            (Detect, None, h1, false, true),
            // Upgrades are HTTP/1.1 only.
            (Http2, None, h1, true, true),
        ];
        for (declared, orig, hop, upgrade, want) in cases {
            assert_eq!(
                to_http1(declared, orig, hop, upgrade),
                want,
                "{declared:?} {orig:?} {hop:?} upgrade={upgrade}"
            );
        }
    }
}
