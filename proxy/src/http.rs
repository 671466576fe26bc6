//! HTTP plumbing shared by inbound and outbound: one body type, hop-by-hop header handling,
//! and the headers Musubi adds between proxies.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

/// Any body error: hyper's, or the proxy's own (a route's timeout firing mid-body).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the proxy passes on. Its error carries the proxy's own errors too, so a timeout
/// that fires while a response streams ends that stream with a reason.
pub type Body = BoxBody<Bytes, BoxError>;

/// The verified client identity, added by the inbound proxy for the application. Any copy
/// arriving from outside is removed first.
pub const CLIENT_ID: HeaderName = HeaderName::from_static(CLIENT_ID_NAME);
pub const CLIENT_ID_NAME: &str = "musubi-client-id";
/// Set by the outbound proxy when the application spoke HTTP/1.x, so the inbound proxy gives the
/// server application HTTP/1.x too. Values: `HTTP/1.1`, `HTTP/1.0`.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static(ORIG_PROTO_NAME);
pub const ORIG_PROTO_NAME: &str = "musubi-orig-proto";
/// Set on responses the proxy itself generated (not the application), with the reason.
pub const PROXY_ERROR: HeaderName = HeaderName::from_static("musubi-proxy-error");

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn incoming(b: hyper::body::Incoming) -> Body {
    b.map_err(BoxError::from).boxed()
}

/// A request body with the headers only proxies may set removed from its trailers too (a
/// client could otherwise send `musubi-client-id` as a trailer); `removed` hears of each.
pub fn without_proxy_trailers(
    b: hyper::body::Incoming,
    removed: impl Fn(&'static str) + Send + Sync + 'static,
) -> Body {
    b.map_frame(move |frame| match frame.into_trailers() {
        Ok(mut trailers) => {
            if trailers.remove(CLIENT_ID).is_some() {
                removed(CLIENT_ID_NAME);
            }
            if trailers.remove(ORIG_PROTO).is_some() {
                removed(ORIG_PROTO_NAME);
            }
            hyper::body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    })
    .map_err(BoxError::from)
    .boxed()
}

/// A response made by the proxy, with a reason the caller can read.
pub fn error_response(status: StatusCode, reason: &str) -> Response<Body> {
    let mut resp = Response::new(full(format!("{reason}\n")));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(reason) {
        headers.insert(PROXY_ERROR, v);
    }
    resp
}

/// Connection-specific headers, which HTTP/2 forbids and proxies must not forward.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them: one pass over the names instead of a lookup per name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Headers named in `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

/// Always removed; `TE` is too, unless it says `trailers`.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::TE || HOP_BY_HOP.contains(name)
}

/// Whether a request asks to switch protocols (websockets and the like).
pub fn is_upgrade<B>(req: &http::Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

pub fn version_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/?",
    }
}

/// The authority a request is for: the URI's (absolute form, HTTP/2) or the Host header.
pub fn authority<B>(req: &http::Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.to_string());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
}

/// `http://<authority><path and query of uri>`, reusing the already parsed path.
pub fn absolute_uri(uri: &http::Uri, authority: &str) -> Result<http::Uri, http::Error> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority.parse::<http::uri::Authority>()?);
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Ok(http::Uri::from_parts(parts)?)
}

/// `host:port`, adding the scheme's default port when the authority has none.
pub fn with_port(authority: &str, default_port: u16) -> String {
    // Fast path, the common case: `name:port` or `[v6]:port` with a numeric port.
    if let Some((host, port)) = authority.rsplit_once(':')
        && !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok()
        && !host.is_empty()
        && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')))
    {
        return authority.to_string();
    }
    match authority.parse::<http::uri::Authority>() {
        Ok(a) if a.port_u16().is_some() => authority.to_string(),
        _ => format!("{authority}:{default_port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_table() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["x-keep"]);
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert!(
            h.contains_key(header::TE),
            "TE: trailers is what gRPC needs"
        );
    }

    #[test]
    fn with_port_table() {
        for (input, want) in [
            ("api", "api:80"),
            ("api:8080", "api:8080"),
            (
                "api.shop.svc.cluster.local:9090",
                "api.shop.svc.cluster.local:9090",
            ),
            ("10.0.0.1", "10.0.0.1:80"),
            ("10.0.0.1:81", "10.0.0.1:81"),
            ("[::1]", "[::1]:80"),
            ("[::1]:8080", "[::1]:8080"),
            ("api:", "api::80"),
            ("api:99999", "api:99999:80"),
        ] {
            assert_eq!(with_port(input, 80), want, "{input}");
        }
    }

    #[test]
    fn absolute_uri_table() {
        for (uri, authority, want) in [
            ("/a?b=1", "api:80", "http://api:80/a?b=1"),
            ("http://other:81/x", "api:80", "http://api:80/x"),
            ("/", "[::1]:8080", "http://[::1]:8080/"),
        ] {
            let got = absolute_uri(&uri.parse().unwrap(), authority).unwrap();
            assert_eq!(got.to_string(), want, "{uri} {authority}");
        }
        assert!(absolute_uri(&"/".parse().unwrap(), "bad authority").is_err());
    }

    #[test]
    fn upgrade_detection() {
        let req = http::Request::builder()
            .header("connection", "keep-alive, Upgrade")
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(is_upgrade(&req));
        let req = http::Request::builder()
            .header("upgrade", "websocket")
            .body(())
            .unwrap();
        assert!(!is_upgrade(&req));
    }
}
