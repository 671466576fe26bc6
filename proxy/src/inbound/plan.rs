//! The server side's decisions, as pure functions: what a connection is (from its first
//! bytes and the port's mTLS mode), and what may reach the application from a byte stream
//! (from the port's declared protocol and what detection saw).
//!
//! The rule they enforce: **an HTTP request never reaches an application port through an
//! opaque path unless the port is declared opaque.** Anything that may be HTTP is served as
//! HTTP by this proxy — where `musubi-client-id` is removed and set from the verified peer —
//! so the header an application sees is always the proxy's own word. See docs/security.md.

use crate::detect::{Detected, Outcome};
use crate::policy::{MtlsMode, PortProtocol};

/// What the first bytes of an inbound connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hello {
    /// A TLS ClientHello offering Musubi's ALPN.
    Mesh,
    /// TLS offering `h2` but not Musubi's ALPN: another mTLS sidecar (Envoy) or the
    /// application's own TLS. `mesh_sni`: the client named the mesh server name in SNI.
    H2 {
        mesh_sni: bool,
    },
    /// TLS that is not the mesh's (the application's own).
    OtherTls,
    Plaintext,
}

/// What to do with a connection after its hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Mesh mTLS; the transport header follows.
    Mesh,
    /// mTLS from a peer that is not a Musubi proxy, speaking HTTP/2 (no transport header).
    MeshH2,
    /// The application's own TLS, passed to it untouched (PERMISSIVE only).
    AppTls,
    /// Plaintext (PERMISSIVE only).
    Plaintext,
    /// Refused before anything reaches the application.
    Refuse(&'static str),
}

/// An mTLS peer that is not Musubi is recognised by ALPN `h2` plus the mesh server name in
/// SNI; on a STRICT port nothing but mesh mTLS is accepted anyway, so `h2` alone is enough.
pub fn arrival(hello: Hello, mtls: MtlsMode) -> Arrival {
    match (hello, mtls) {
        (Hello::Mesh, _) => Arrival::Mesh,
        (Hello::H2 { mesh_sni: true }, _) => Arrival::MeshH2,
        (Hello::H2 { .. }, MtlsMode::Strict) => Arrival::MeshH2,
        (Hello::H2 { .. } | Hello::OtherTls, MtlsMode::Permissive) => Arrival::AppTls,
        (Hello::OtherTls, MtlsMode::Strict) => Arrival::Refuse("non_mesh_tls_in_strict"),
        (Hello::Plaintext, MtlsMode::Permissive) => Arrival::Plaintext,
        (Hello::Plaintext, MtlsMode::Strict) => Arrival::Refuse("plaintext_in_strict"),
    }
}

/// How to begin with a byte stream bound for an application port (an opaque mesh stream,
/// plaintext, the application's own TLS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Declared opaque: pass the bytes through.
    Raw,
    /// Declared HTTP: serve it as HTTP, whatever it looks like.
    Http,
    /// Look at the first bytes.
    Detect,
    /// Refused (the reason is a metric label).
    Refuse(&'static str),
}

/// `tls`: the stream is the application's own TLS, which this proxy cannot look into.
pub fn start(declared: PortProtocol, tls: bool) -> Start {
    match (declared, tls) {
        (PortProtocol::Opaque, _) => Start::Raw,
        // Encrypted bytes on an HTTP port: nothing an HTTP server can take, and nothing the
        // proxy can strip headers from.
        (PortProtocol::Http1 | PortProtocol::Http2, true) => Start::Refuse("tls_to_http_port"),
        (PortProtocol::Http1 | PortProtocol::Http2, false) => Start::Http,
        (PortProtocol::Detect, _) => Start::Detect,
    }
}

/// What to do after detection on a stream for a `Detect` port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Serve it as HTTP (the proxy parses it; hyper refuses what is not HTTP with a 400).
    Http,
    /// Not HTTP: pass the bytes through.
    Raw,
    /// The client said nothing: connect to the application and see who speaks first.
    ServerFirst,
    /// The client went away before saying anything useful.
    Close,
}

pub fn after_detection(outcome: Outcome) -> Plan {
    match outcome {
        Outcome::Known(Detected::Http1 | Detected::Http2 | Detected::HttpLike) => Plan::Http,
        Outcome::Known(Detected::Opaque) => Plan::Raw,
        // Some bytes, then silence: they could be the start of a request (a slow client).
        Outcome::Timeout { any: true } => Plan::Http,
        // Nothing at all: a server-speaks-first protocol (SMTP, MySQL), or a slow client.
        Outcome::Timeout { any: false } => Plan::ServerFirst,
        Outcome::Eof => Plan::Close,
    }
}

/// Who spoke first after a detection timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstSpeaker {
    /// The application: an HTTP server never speaks first, so this is not HTTP.
    App,
    /// The client, late: decide from its bytes as usual.
    Client,
}

pub fn server_first(spoke: FirstSpeaker) -> Option<Plan> {
    match spoke {
        FirstSpeaker::App => Some(Plan::Raw),
        FirstSpeaker::Client => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MtlsMode::*;

    #[test]
    fn arrival_table() {
        let cases = [
            (Hello::Mesh, Strict, Arrival::Mesh),
            (Hello::Mesh, Permissive, Arrival::Mesh),
            (Hello::H2 { mesh_sni: true }, Strict, Arrival::MeshH2),
            (Hello::H2 { mesh_sni: true }, Permissive, Arrival::MeshH2),
            (Hello::H2 { mesh_sni: false }, Strict, Arrival::MeshH2),
            (Hello::H2 { mesh_sni: false }, Permissive, Arrival::AppTls),
            (
                Hello::OtherTls,
                Strict,
                Arrival::Refuse("non_mesh_tls_in_strict"),
            ),
            (Hello::OtherTls, Permissive, Arrival::AppTls),
            (
                Hello::Plaintext,
                Strict,
                Arrival::Refuse("plaintext_in_strict"),
            ),
            (Hello::Plaintext, Permissive, Arrival::Plaintext),
        ];
        for (hello, mtls, want) in cases {
            assert_eq!(arrival(hello, mtls), want, "{hello:?} {mtls:?}");
        }
    }

    #[test]
    fn start_table() {
        use PortProtocol::*;
        let cases = [
            (Opaque, false, Start::Raw),
            (Opaque, true, Start::Raw),
            (Http1, false, Start::Http),
            (Http2, false, Start::Http),
            (Http1, true, Start::Refuse("tls_to_http_port")),
            (Http2, true, Start::Refuse("tls_to_http_port")),
            (Detect, false, Start::Detect),
            (Detect, true, Start::Detect),
        ];
        for (declared, tls, want) in cases {
            assert_eq!(start(declared, tls), want, "{declared:?} tls={tls}");
        }
    }

    #[test]
    fn nothing_that_may_be_http_passes_raw() {
        use Detected::*;
        let cases = [
            (Outcome::Known(Http1), Plan::Http),
            (Outcome::Known(Http2), Plan::Http),
            (Outcome::Known(HttpLike), Plan::Http),
            (Outcome::Known(Opaque), Plan::Raw),
            (Outcome::Timeout { any: true }, Plan::Http),
            (Outcome::Timeout { any: false }, Plan::ServerFirst),
            (Outcome::Eof, Plan::Close),
        ];
        for (outcome, want) in cases {
            assert_eq!(after_detection(outcome), want, "{outcome:?}");
        }
        assert_eq!(server_first(FirstSpeaker::App), Some(Plan::Raw));
        assert_eq!(server_first(FirstSpeaker::Client), None);
    }
}
