//! The mesh end to end: applications talking through a pair of real proxies over mTLS with
//! certificates from a real identity service.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use musubi_proxy::destination::{Destination, Endpoint, Protocol, Transport};
use musubi_proxy::policy::{InboundPolicy, MtlsMode, PortPolicy, PortProtocol, Rule};
use musubi_tests::mesh::{Setup, WebApi, destination, destination_as, pair, proxy};
use musubi_tests::{Identity, apps, metric_value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn http1(outbound: SocketAddr, uri: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
    let tcp = TcpStream::connect(outbound).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::get(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = send
        .send_request(req.body(Full::<Bytes>::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn http2(outbound: SocketAddr, uri: &str) -> (StatusCode, String) {
    let tcp = TcpStream::connect(outbound).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get(uri)
                .body(Full::<Bytes>::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// web (client proxy) → api (server proxy) → HTTP app, with `api.shop:80` resolving to the server.
async fn mesh(policy: Option<InboundPolicy>) -> WebApi {
    WebApi::start(Setup {
        policy,
        ..Setup::default()
    })
    .await
}

#[tokio::test]
async fn http1_crosses_the_mesh_as_http1_with_the_client_identity() {
    let m = mesh(None).await;
    let (status, body) = http1(
        m.client.running.outbound,
        "http://api.shop:80/hello",
        &[(
            "musubi-client-id",
            "spiffe://cluster.local/ns/shop/sa/forged",
        )],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("version=HTTP/1.1 "), "{body}");
    assert!(
        body.contains("client-id=spiffe://cluster.local/ns/shop/sa/web "),
        "forged header must be replaced: {body}"
    );
    assert!(body.contains("host=api.shop:80"), "{body}");
    assert!(body.contains("path=/hello"), "{body}");

    // Origin-form with a Host header works too.
    let (status, body) = http1(
        m.client.running.outbound,
        "/by-host",
        &[("host", "api.shop")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("path=/by-host"), "{body}");

    // Metrics moved on both sides.
    let client_metrics = m.client.metrics().await;
    assert!(
        metric_value(
            &client_metrics,
            "musubi_proxy_responses_total",
            "direction=\"outbound\""
        )
        .unwrap()
            >= 1.0,
        "{client_metrics}"
    );
    let server_metrics = m.server.metrics().await;
    assert!(
        metric_value(
            &server_metrics,
            "musubi_proxy_requests_total",
            "peer_identity=\"spiffe://cluster.local/ns/shop/sa/web\""
        )
        .unwrap()
            >= 1.0,
        "{server_metrics}"
    );
    assert!(
        metric_value(
            &server_metrics,
            "musubi_proxy_response_latency_seconds_count",
            "direction=\"inbound\""
        )
        .unwrap()
            >= 1.0
    );
    assert!(
        metric_value(
            &server_metrics,
            "musubi_proxy_certificate_expiry_seconds",
            ""
        )
        .unwrap()
            > 0.0
    );
}

#[tokio::test]
async fn http2_crosses_the_mesh_as_http2() {
    let m = mesh(None).await;
    let (status, body) = http2(m.client.running.outbound, "http://api.shop:80/h2").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("version=HTTP/2.0 "), "{body}");
    assert!(
        body.contains("client-id=spiffe://cluster.local/ns/shop/sa/web "),
        "{body}"
    );
    assert!(
        body.contains(" host=api.shop:80 "),
        "the application sees the authority the caller addressed: {body}"
    );
}

/// An HTTP/2 caller of an HTTP/1.1-only application (`protocol: http`): the server proxy
/// speaks what the port is declared to speak, not what the caller spoke.
#[tokio::test]
async fn an_http2_caller_reaches_an_http1_only_application() {
    let identity = Identity::start().await;
    let app = apps::http1_only().await;
    let mut policy = InboundPolicy::default();
    policy.ports.insert(
        app.port(),
        PortPolicy {
            protocol: PortProtocol::Http1,
            ..PortPolicy::STRICT
        },
    );
    let server = Setup {
        policy: Some(policy),
        ..Setup::default()
    };
    let (_server, client) = pair(&identity, "api", app.port(), "api.shop:80", server).await;
    let (status, body) = http2(client.running.outbound, "http://api.shop:80/h2-caller").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("version=HTTP/1.1 "), "{body}");
    assert!(body.contains(" host=api.shop:80 "), "{body}");
    // A plaintext HTTP/2 caller at an exposed (PERMISSIVE) entry too.
    let mut policy = InboundPolicy {
        default: PortPolicy {
            mtls: MtlsMode::Permissive,
            ..PortPolicy::STRICT
        },
        ..InboundPolicy::default()
    };
    policy.ports.insert(
        app.port(),
        PortPolicy {
            mtls: MtlsMode::Permissive,
            protocol: PortProtocol::Http1,
            ..PortPolicy::STRICT
        },
    );
    let entry = proxy(
        &identity,
        "shop",
        "api",
        Setup {
            app_ports: vec![app.port()],
            policy: Some(policy),
            ..Setup::default()
        },
    )
    .await;
    let (status, body) = http2(entry.running.inbound, "http://api.shop/entry").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.starts_with("version=HTTP/1.1 "), "{body}");
}

/// An endpoint without identity is reached in plaintext only where discovery says its
/// namespace allows it; otherwise the client proxy refuses with 502 and counts it.
#[tokio::test]
async fn unmeshed_endpoints_are_reached_in_plaintext_only_where_allowed() {
    let identity = Identity::start().await;
    let app = apps::http().await;
    let unmeshed = |allowed: bool| {
        Arc::new(Destination {
            authority: "legacy.shop.svc.cluster.local:80".into(),
            protocol: Protocol::Detect,
            endpoints: vec![Endpoint {
                connect: app.addr,
                app_port: app.port(),
                identity: None,
                weight: 1,
                transport: Transport::Musubi,
                plaintext_allowed: allowed,
            }],
            routes: Default::default(),
            version: 1,
        })
    };
    let client = proxy(
        &identity,
        "shop",
        "web",
        Setup {
            destinations: HashMap::from([
                ("legacy.shop:80".to_string(), unmeshed(true)),
                ("strict.shop:80".to_string(), unmeshed(false)),
            ]),
            ..Setup::default()
        },
    )
    .await;
    let (status, body) = http1(client.running.outbound, "http://legacy.shop:80/p", &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("client-id=- "), "{body}");
    let (status, body) = http1(client.running.outbound, "http://strict.shop:80/p", &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("is not meshed and mTLS is STRICT"), "{body}");
    assert_eq!(
        metric_value(
            &client.metrics().await,
            "musubi_proxy_refused_total",
            "reason=\"not_meshed\""
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn upgrade_and_opaque_tunnels_carry_bytes_both_ways() {
    let m = mesh(None).await;
    // HTTP/1.1 Upgrade (as websockets do): 101, then raw bytes echoed by the server app.
    let mut tcp = TcpStream::connect(m.client.running.outbound).await.unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: api.shop:80\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp.write_all(b"ping over the upgraded connection")
        .await
        .unwrap();
    let mut buf = [0u8; 33];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping over the upgraded connection");
    // Draining waits for the tunnel on both proxies, which keeps carrying bytes meanwhile.
    let (client_drain, server_drain) = (
        m.client.running.drain.clone(),
        m.server.running.drain.clone(),
    );
    client_drain.start();
    server_drain.start();
    assert!(client_drain.active() >= 1 && server_drain.active() >= 1);
    tcp.write_all(b"ping over the upgraded connection")
        .await
        .unwrap();
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping over the upgraded connection");
    drop(tcp);
    tokio::time::timeout(Duration::from_secs(10), client_drain.idle())
        .await
        .expect("the client proxy's tunnel ends with its connection");
    tokio::time::timeout(Duration::from_secs(10), server_drain.idle())
        .await
        .expect("the server proxy's tunnel ends with its connection");

    // CONNECT: opaque TCP over mTLS to a TCP echo app behind the same server proxy. Its
    // port is declared opaque: the server proxy passes bytes to it untouched only then.
    let echo = apps::tcp_echo().await;
    let mut opaque = InboundPolicy::default();
    opaque.ports.insert(
        echo.port(),
        PortPolicy {
            protocol: PortProtocol::Opaque,
            ..PortPolicy::STRICT
        },
    );
    let server = Setup {
        policy: Some(opaque),
        ..Setup::default()
    };
    let (server, client) = pair(&m.identity, "db", echo.port(), "db.shop:5432", server).await;
    let mut tcp = TcpStream::connect(client.running.outbound).await.unwrap();
    tcp.write_all(b"CONNECT db.shop:5432 HTTP/1.1\r\nHost: db.shop:5432\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 200"));
    tcp.write_all(b"opaque bytes").await.unwrap();
    let mut buf = [0u8; 17];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"echo:opaque bytes");
    drop(tcp);
    let metrics = server.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "musubi_proxy_tcp_open_total",
            "direction=\"inbound\""
        )
        .unwrap()
            >= 1.0,
        "{metrics}"
    );
}

/// The bytes between proxies are mTLS: the inbound port refuses plaintext and TLS without a
/// client certificate (STRICT), and counts it.
#[tokio::test]
async fn strict_inbound_refuses_plaintext_and_certificateless_tls() {
    let m = mesh(None).await;
    let inbound = m.server.running.inbound;
    let mut plain = TcpStream::connect(inbound).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = plain.read_to_end(&mut out).await;
    assert!(
        out.is_empty(),
        "plaintext got an answer: {}",
        String::from_utf8_lossy(&out)
    );

    // TLS with the mesh ALPN but no client certificate.
    let cfg = musubi_identity::tls::client_config(
        None,
        &m.identity.ca.bundle,
        musubi_identity::tls::ServerIdentity::Exactly(m.server.id.clone()),
        &[musubi_proxy::pool::ALPN],
    )
    .unwrap();
    let tcp = TcpStream::connect(inbound).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(musubi_identity::tls::mesh_server_name(), tcp)
        .await
        .unwrap();
    let _ = tls.write_all(b"hello").await;
    let mut out = Vec::new();
    assert!(tls.read_to_end(&mut out).await.is_err() || out.is_empty());

    let metrics = m.server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "musubi_proxy_refused_total",
            "reason=\"plaintext_in_strict\""
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "musubi_proxy_tls_handshake_failures_total",
            "reason=\"no_client_certificate\""
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn permissive_port_accepts_plaintext_without_an_identity() {
    let policy = InboundPolicy {
        default: PortPolicy {
            mtls: MtlsMode::Permissive,
            ..PortPolicy::STRICT
        },
        ..InboundPolicy::default()
    };
    let m = mesh(Some(policy)).await;
    let (status, body) = http1(
        m.server.running.inbound,
        "/plain",
        &[
            ("host", "api"),
            ("musubi-client-id", "spiffe://cluster.local/ns/x/sa/forged"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("client-id=- "),
        "plaintext must not carry an identity: {body}"
    );
}

#[tokio::test]
async fn authorization_denies_with_403() {
    let m0 = mesh(None).await;
    let mut policy = InboundPolicy::default();
    policy.ports.insert(
        m0.app.port(),
        PortPolicy {
            mtls: MtlsMode::Strict,
            allow: Some(vec![Rule::Identity(
                "spiffe://cluster.local/ns/shop/sa/admin".into(),
            )]),
            ..PortPolicy::STRICT
        },
    );
    let server = proxy(
        &m0.identity,
        "shop",
        "api",
        Setup {
            app_ports: vec![m0.app.port()],
            policy: Some(policy),
            ..Setup::default()
        },
    )
    .await;
    let client = proxy(
        &m0.identity,
        "shop",
        "web",
        Setup {
            destinations: HashMap::from([(
                "api.shop:80".to_string(),
                destination("api.shop:80", &server, m0.app.port()),
            )]),
            ..Setup::default()
        },
    )
    .await;
    let (status, body) = http1(client.running.outbound, "http://api.shop:80/secret", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains("spiffe://cluster.local/ns/shop/sa/web may not call"),
        "{body}"
    );
    let metrics = server.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "musubi_proxy_authz_total",
            "decision=\"deny_unauthorized\""
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn client_refuses_an_endpoint_with_the_wrong_identity() {
    let m = mesh(None).await;
    let impostor_claim = m.identity.id("shop", "payments");
    let client = proxy(
        &m.identity,
        "shop",
        "web",
        Setup {
            destinations: HashMap::from([(
                "payments.shop:80".to_string(),
                destination_as("payments.shop:80", &m.server, m.app.port(), impostor_claim),
            )]),
            ..Setup::default()
        },
    )
    .await;
    let (status, body) = http1(client.running.outbound, "http://payments.shop:80/", &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body.contains("expected spiffe://cluster.local/ns/shop/sa/payments"),
        "{body}"
    );
    let metrics = client.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "musubi_proxy_tls_handshake_failures_total",
            "reason=\"wrong_identity\""
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// SIGTERM to a real proxy process while requests are in flight: it stops being ready, stops
/// accepting, sends GOAWAY on HTTP/2 and `Connection: close` on HTTP/1, lets the in-flight
/// requests finish, then exits 0. The requests are held by the application until the signal
/// has been seen to take effect, so nothing depends on timing.
#[tokio::test]
async fn sigterm_drains_in_flight_requests_and_refuses_new_ones() {
    use musubi_tests::mesh::proxy_process;
    let identity = Identity::start().await;
    let (app, mut hold) = apps::holding().await;
    let server = proxy_process(&identity, "shop", "api", &[app.port()], &[]).await;
    let client = proxy(
        &identity,
        "shop",
        "web",
        Setup {
            destinations: HashMap::from([(
                "api.shop:80".to_string(),
                Arc::new(Destination {
                    authority: "api.shop:80".into(),
                    protocol: Protocol::Detect,
                    endpoints: vec![Endpoint {
                        connect: server.inbound,
                        app_port: app.port(),
                        identity: Some(server.id.clone()),
                        weight: 1,
                        transport: Transport::Musubi,
                        plaintext_allowed: false,
                    }],
                    routes: Default::default(),
                    version: 1,
                }),
            )]),
            ..Setup::default()
        },
    )
    .await;
    let outbound = client.running.outbound;
    // In flight over HTTP/2 between the proxies.
    let h2 = tokio::spawn(async move { http1(outbound, "http://api.shop:80/hold", &[]).await });
    hold.arrived.recv().await.unwrap();
    // In flight on an HTTP/1.1 mesh connection (the upgrade transport), from a peer of our own.
    let store = identity.svid("shop", "web").await;
    let mesh_tls = || {
        musubi_identity::tls::client_config(
            Some(store.clone()),
            &identity.ca.bundle,
            musubi_identity::tls::ServerIdentity::Exactly(server.id.clone()),
            &[musubi_proxy::pool::ALPN],
        )
        .unwrap()
    };
    let inbound = server.inbound;
    let port = app.port();
    let peer = |protocol| {
        let cfg = mesh_tls();
        async move {
            let tcp = TcpStream::connect(inbound).await.unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(musubi_identity::tls::mesh_server_name(), tcp)
                .await
                .unwrap();
            let header = musubi_proxy::transport::Header {
                port,
                protocol,
                authority: None,
            };
            tls.write_all(&header.encode()).await.unwrap();
            tls
        }
    };
    let mut h1 = peer(musubi_proxy::transport::Protocol::Http1).await;
    h1.write_all(b"GET /hold HTTP/1.1\r\nHost: api.shop\r\n\r\n")
        .await
        .unwrap();
    hold.arrived.recv().await.unwrap();
    // An idle HTTP/2 connection, to see its GOAWAY.
    let idle = peer(musubi_proxy::transport::Protocol::Http2).await;
    let (mut idle_send, idle_conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(idle),
    )
    .await
    .unwrap();
    let idle_conn = tokio::spawn(idle_conn);
    idle_send.ready().await.unwrap();

    nix::sys::signal::kill(server.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    let admin = server.admin.to_string();
    musubi_tests::eventually(
        "the proxy says it is draining",
        Duration::from_secs(10),
        || {
            let admin = admin.clone();
            async move {
                let ready = musubi_tests::http_get(&admin, "/ready").await;
                ready.contains("not ready").then_some(())
            }
        },
    )
    .await;
    musubi_tests::eventually(
        "new connections are refused",
        Duration::from_secs(10),
        || async { TcpStream::connect(server.inbound).await.err().map(|_| ()) },
    )
    .await;
    tokio::time::timeout(Duration::from_secs(10), idle_conn)
        .await
        .expect("the idle HTTP/2 connection is closed by GOAWAY")
        .unwrap()
        .unwrap();
    assert!(idle_send.is_closed());

    // Only now do the held requests finish; both complete.
    hold.release.send_replace(true);
    let (status, body) = h2.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("path=/hold"), "{body}");
    let mut answer = Vec::new();
    h1.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    let mut child = server.child;
    let status = musubi_tests::eventually("the proxy exits", Duration::from_secs(15), || {
        let done = child.0.try_wait().ok().flatten();
        async move { done }
    })
    .await;
    assert!(status.success(), "{status}");
}
