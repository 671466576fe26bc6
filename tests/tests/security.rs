//! The mesh as an attacker tries it: forged caller identities on every path into an
//! application, loops through the proxy's own listeners, traffic before policy, and floods of
//! what a remote party can make the proxy hold. Real proxies, a real identity service and real
//! applications on 127.0.0.1; each test asserts what the attacker sees and the counter that
//! records the refusal.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::{TokioExecutor, TokioIo};
use musubi_identity::tls::{self, ServerIdentity};
use musubi_proxy::config;
use musubi_proxy::policy::{InboundPolicy, MtlsMode, PortPolicy};
use musubi_proxy::pool::ALPN;
use musubi_proxy::transport::{Header, Protocol};
use musubi_tests::mesh::{Controller, Proxy, Setup, WebApi, pair, proxy};
use musubi_tests::{Identity, apps, eventually, metric_value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const FORGED: &str = "spiffe://cluster.local/ns/prod/sa/admin";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const WAIT: Duration = Duration::from_secs(10);

/// web → api (an HTTP app that reports the `musubi-client-id` it receives).
async fn mesh(server_env: Vec<(&'static str, String)>, policy: Option<InboundPolicy>) -> WebApi {
    WebApi::start(Setup {
        policy,
        env: server_env,
        ..Setup::default()
    })
    .await
}

/// Waits until `server` has given up waiting for a connection's first bytes.
async fn detection_timed_out(server: &Proxy) {
    eventually("the server proxy's detection timed out", WAIT, || async {
        metric_value(
            &server.metrics().await,
            "musubi_proxy_protocol_detections_total",
            "protocol=\"timeout\"",
        )
        .filter(|v| *v >= 1.0)
    })
    .await;
}

fn permissive() -> InboundPolicy {
    InboundPolicy {
        default: PortPolicy {
            mtls: MtlsMode::Permissive,
            ..PortPolicy::STRICT
        },
        ..InboundPolicy::default()
    }
}

/// Writes `bytes`, then reads until the peer closes (or `WAIT` passes).
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> String {
    io.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, io.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes `bytes`, then reads one response head.
async fn head_of<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> String {
    io.write_all(bytes).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        match tokio::time::timeout(WAIT, io.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// `CONNECT target` through a proxy's outbound listener: the tunnel, once it says 200.
async fn connect(outbound: SocketAddr, target: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(outbound).await.unwrap();
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tcp
}

fn forged_request(eol: &str, path: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1{eol}Host: api.shop{eol}musubi-client-id: {FORGED}{eol}Connection: close{eol}{eol}"
    )
    .into_bytes()
}

async fn removed(p: &Proxy, direction: &str) -> f64 {
    metric_value(
        &p.metrics().await,
        "musubi_proxy_removed_headers_total",
        &format!("direction=\"{direction}\",header=\"musubi-client-id\""),
    )
    .unwrap_or(0.0)
}

async fn refused(p: &Proxy, direction: &str, reason: &str) -> f64 {
    metric_value(
        &p.metrics().await,
        "musubi_proxy_refused_total",
        &format!("direction=\"{direction}\",reason=\"{reason}\""),
    )
    .unwrap_or(0.0)
}

/// The application never sees the forged identity: it sees the caller's real one, or the
/// proxy answered for it.
fn assert_not_forged(answer: &str, real: &str) {
    assert!(
        !answer.contains(FORGED),
        "the forged identity reached the app: {answer}"
    );
    assert!(
        answer.contains(&format!("client-id={real} ")) || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_forged_client_id_through_a_connect_tunnel_is_replaced() {
    let m = mesh(vec![], None).await;
    let mut tunnel = connect(m.client.running.outbound, "api.shop:80").await;
    let answer = exchange(&mut tunnel, &forged_request("\r\n", "/tunnel")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_not_forged(&answer, WEB);
    assert_eq!(removed(&m.server, "inbound").await, 1.0);
    // In any casing, and more than once.
    let mut tunnel = connect(m.client.running.outbound, "api.shop:80").await;
    let request = format!(
        "GET /casing HTTP/1.1\r\nHost: api.shop\r\nMUSUBI-Client-Id: {FORGED}\r\nmusubi-client-ID: {FORGED}\r\nConnection: close\r\n\r\n"
    );
    let answer = exchange(&mut tunnel, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_not_forged(&answer, WEB);
    assert_eq!(removed(&m.server, "inbound").await, 3.0);
}

#[tokio::test]
async fn bare_lf_and_over_long_request_lines_are_served_as_http_not_passed_through() {
    let m = mesh(vec![], None).await;
    let mut tunnel = connect(m.client.running.outbound, "api.shop:80").await;
    let answer = exchange(&mut tunnel, &forged_request("\n", "/bare-lf")).await;
    assert_not_forged(&answer, WEB);
    let long = format!("/{}", "a".repeat(9000));
    let mut tunnel = connect(m.client.running.outbound, "api.shop:80").await;
    let answer = exchange(&mut tunnel, &forged_request("\r\n", &long)).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "{}",
        &answer[..200.min(answer.len())]
    );
    assert_not_forged(&answer, WEB);
    let metrics = m.server.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "musubi_proxy_protocol_detections_total",
            "protocol=\"http_like\""
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_request_sent_after_the_detection_timeout_is_still_served_as_http() {
    let m = mesh(vec![(config::DETECT_TIMEOUT, "200ms".into())], None).await;
    let mut tunnel = connect(m.client.running.outbound, "api.shop:80").await;
    // Say nothing until the server proxy has given up waiting for the first bytes.
    detection_timed_out(&m.server).await;
    let answer = exchange(&mut tunnel, &forged_request("\r\n", "/late")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_not_forged(&answer, WEB);
}

#[tokio::test]
async fn server_speaks_first_protocols_still_work_on_detected_ports() {
    let identity = Identity::start().await;
    let echo = apps::tcp_echo().await;
    let server = Setup {
        env: vec![(config::DETECT_TIMEOUT, "200ms".into())],
        ..Setup::default()
    };
    let (_server, client) = pair(&identity, "db", echo.port(), "db.shop:5433", server).await;
    // The client waits for the server's greeting, as SMTP or MySQL clients do.
    let mut tunnel = connect(client.running.outbound, "db.shop:5433").await;
    let mut greeting = [0u8; 5];
    tokio::time::timeout(WAIT, tunnel.read_exact(&mut greeting))
        .await
        .expect("greeting")
        .unwrap();
    assert_eq!(&greeting, b"echo:");
    tunnel.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hello");
}

/// A meshed workload that bypasses its own proxy: it holds a real certificate (its own) and
/// talks to the server proxy directly, saying whatever it likes.
async fn rogue_peer(m: &WebApi, header: Header) -> tokio_rustls::client::TlsStream<TcpStream> {
    let store = m.identity.svid("shop", "web").await;
    let cfg = tls::client_config(
        Some(store),
        &m.identity.ca.bundle,
        ServerIdentity::Exactly(m.server.id.clone()),
        &[ALPN],
    )
    .unwrap();
    let tcp = TcpStream::connect(m.server.running.inbound).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(tls::mesh_server_name(), tcp)
        .await
        .unwrap();
    tls.write_all(&header.encode()).await.unwrap();
    tls
}

fn header(port: u16, protocol: Protocol) -> Header {
    Header {
        port,
        protocol,
        authority: None,
    }
}

#[tokio::test]
async fn a_mesh_peer_cannot_forge_the_header_over_http2_http1_opaque_or_trailers() {
    let m = mesh(vec![], None).await;
    let port = m.app.port();
    // HTTP/2 between proxies, with the header and a trailer carrying forged identities.
    let tls = rogue_peer(&m, header(port, Protocol::Http2)).await;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut trailers = HeaderMap::new();
    trailers.insert("musubi-client-id", FORGED.parse().unwrap());
    let frames = vec![
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(Bytes::from_static(b"x"))),
        Ok(hyper::body::Frame::trailers(trailers)),
    ];
    let req = Request::post("http://api.shop/h2")
        .header("musubi-client-id", FORGED)
        .header("te", "trailers")
        .body(StreamBody::new(tokio_stream::iter(frames)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains(&format!("client-id={WEB} ")), "{body}");
    assert!(
        body.contains("trailer-client-id=- "),
        "the trailer reached the app: {body}"
    );
    assert!(!body.contains(FORGED), "{body}");

    // One HTTP/1.1 connection between proxies (the upgrade path).
    let mut tls = rogue_peer(&m, header(port, Protocol::Http1)).await;
    let answer = exchange(&mut tls, &forged_request("\r\n", "/h1")).await;
    assert_not_forged(&answer, WEB);

    // "Opaque" bytes that are an HTTP request.
    let mut tls = rogue_peer(&m, header(port, Protocol::Opaque)).await;
    let answer = exchange(&mut tls, &forged_request("\r\n", "/opaque")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_not_forged(&answer, WEB);
    assert!(removed(&m.server, "inbound").await >= 4.0);
}

#[tokio::test]
async fn a_permissive_port_gives_plaintext_callers_no_identity_on_any_path() {
    let m = mesh(
        vec![(config::DETECT_TIMEOUT, "200ms".into())],
        Some(permissive()),
    )
    .await;
    let inbound = m.server.running.inbound;
    for (what, request) in [
        ("crlf", forged_request("\r\n", "/plain")),
        ("bare lf", forged_request("\n", "/plain")),
        (
            "empty lines first",
            [b"\r\n\r\n".as_slice(), &forged_request("\r\n", "/x")].concat(),
        ),
    ] {
        let mut tcp = TcpStream::connect(inbound).await.unwrap();
        let answer = exchange(&mut tcp, &request).await;
        assert!(!answer.contains(FORGED), "{what}: {answer}");
        assert!(
            answer.contains("client-id=- ") || answer.starts_with("HTTP/1.1 400"),
            "{what}: {answer}"
        );
    }
    // Late, after the detection timeout.
    let mut tcp = TcpStream::connect(inbound).await.unwrap();
    detection_timed_out(&m.server).await;
    let answer = exchange(&mut tcp, &forged_request("\r\n", "/late")).await;
    assert!(answer.contains("client-id=- "), "{answer}");
}

#[tokio::test]
async fn the_transport_header_cannot_name_an_undeclared_or_own_port() {
    let m = mesh(vec![], None).await;
    // A listener only for the pod itself (an agent on 127.0.0.1): not a declared port.
    let private = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let private_port = private.local_addr().unwrap().port();
    let mut tls = rogue_peer(&m, header(private_port, Protocol::Opaque)).await;
    let answer = exchange(&mut tls, b"GET /v1/secret HTTP/1.1\r\nHost: vault\r\n\r\n").await;
    assert!(answer.is_empty(), "{answer}");
    assert_eq!(refused(&m.server, "inbound", "port_not_allowed").await, 1.0);
    let accepted = tokio::time::timeout(Duration::from_millis(100), private.accept()).await;
    assert!(accepted.is_err(), "the private listener was reached");
    for own in [
        m.server.running.inbound.port(),
        m.server.running.outbound.port(),
        m.server.running.admin.port(),
    ] {
        let mut tls = rogue_peer(&m, header(own, Protocol::Http2)).await;
        let answer = exchange(&mut tls, b"").await;
        assert!(answer.is_empty(), "{answer}");
    }
    assert_eq!(refused(&m.server, "inbound", "loop").await, 3.0);
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test]
async fn requests_and_connects_to_the_proxys_own_listeners_are_refused_as_loops() {
    let m = mesh(vec![], None).await;
    let c = &m.client.running;
    let fds = open_fds();
    let mut n = 0.0;
    for port in [c.outbound.port(), c.inbound.port(), c.admin.port()] {
        for host in ["127.0.0.1", "localhost", "0.0.0.0", "[::1]", "127.1.2.3"] {
            let target = format!("{host}:{port}");
            let mut tcp = TcpStream::connect(c.outbound).await.unwrap();
            let answer = exchange(
                &mut tcp,
                format!(
                    "GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
            assert!(answer.starts_with("HTTP/1.1 508"), "{target}: {answer}");
            let mut tcp = TcpStream::connect(c.outbound).await.unwrap();
            let answer = head_of(
                &mut tcp,
                format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
            )
            .await;
            assert!(
                answer.starts_with("HTTP/1.1 508"),
                "CONNECT {target}: {answer}"
            );
            n += 2.0;
        }
    }
    assert_eq!(refused(&m.client, "outbound", "loop").await, n);
    assert!(
        open_fds() <= fds + 8,
        "file descriptors grew from {fds} to {}",
        open_fds()
    );
}

#[tokio::test]
async fn nothing_is_served_before_the_first_policy_and_the_controller_down_at_start() {
    let identity = Identity::start().await;
    let app = apps::http().await;
    // Where the controller will be; nothing listens there yet.
    let spot = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = spot.local_addr().unwrap();
    drop(spot);
    let controller_id = identity.id("musubi", "musubi-controller");
    let server = proxy(
        &identity,
        "shop",
        "api",
        Setup {
            app_ports: vec![app.port()],
            controller: Some((addr, controller_id)),
            no_wait: true,
            ..Setup::default()
        },
    )
    .await;
    eventually("the proxy holds its certificate", WAIT, || async {
        server.running.store.info().map(|_| ())
    })
    .await;
    let ready = musubi_tests::http_get(&server.admin(), "/ready").await;
    assert!(ready.contains("not ready"), "{ready}");
    let mut tcp = TcpStream::connect(server.running.inbound).await.unwrap();
    let answer = exchange(&mut tcp, &forged_request("\r\n", "/early")).await;
    assert!(answer.is_empty(), "{answer}");
    assert_eq!(refused(&server, "inbound", "no_policy").await, 1.0);

    // The controller comes up: policy arrives, the proxy is ready and serves.
    let yaml = format!(
        "mtls: PERMISSIVE\nworkloads:\n  - namespace: shop\n    serviceAccount: api\n    ports:\n      - port: {}\n",
        app.port()
    );
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _controller = Controller::start_on(&identity, &yaml, listener).await;
    assert!(musubi_proxy::run::wait_ready(server.running.admin, Duration::from_secs(30)).await);
    let mut tcp = TcpStream::connect(server.running.inbound).await.unwrap();
    let answer = exchange(&mut tcp, &forged_request("\r\n", "/later")).await;
    assert!(answer.contains("client-id=- "), "{answer}");
}

#[tokio::test]
async fn destination_watches_are_bounded() {
    let identity = Identity::start().await;
    let controller = Controller::start(&identity, "services: []\n").await;
    let client = proxy(
        &identity,
        "shop",
        "web",
        Setup {
            controller: Some(controller.endpoint()),
            env: vec![(config::MAX_DESTINATIONS, "8".into())],
            ..Setup::default()
        },
    )
    .await;
    // Fifty distinct destinations, as a port scan would make: closed local ports.
    for i in 0..50u16 {
        let target = format!("127.0.0.1:{}", 1 + i);
        let mut tcp = TcpStream::connect(client.running.outbound).await.unwrap();
        let answer = exchange(
            &mut tcp,
            format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    }
    let metrics = client.metrics().await;
    let watches = metric_value(&metrics, "musubi_proxy_discovery_watches", "").unwrap();
    assert!(watches <= 8.0, "{watches} watches");
    assert_eq!(
        metric_value(
            &metrics,
            "musubi_proxy_discovery_evictions_total",
            "reason=\"capacity\""
        ),
        Some(42.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn junk_authorities_do_not_get_series_of_their_own() {
    let m = mesh(vec![], Some(permissive())).await;
    for i in 0..300 {
        let junk = format!("junk-{i}.example:80");
        let mut tcp = TcpStream::connect(m.server.running.inbound).await.unwrap();
        let answer = exchange(
            &mut tcp,
            format!("GET / HTTP/1.1\r\nHost: {junk}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let metrics = m.server.metrics().await;
    let series = metrics
        .lines()
        .filter(|l| l.starts_with("musubi_proxy_requests_total{"))
        .count();
    assert!(series <= 2, "{series} request series:\n{metrics}");
    assert!(!metrics.contains("junk-"), "{metrics}");
    assert_eq!(
        metric_value(
            &metrics,
            "musubi_proxy_requests_total",
            "authority=\"other\""
        ),
        Some(300.0)
    );
}

#[tokio::test]
async fn a_slowloris_client_is_closed_after_the_header_timeout() {
    let m = mesh(
        vec![(config::HEADER_READ_TIMEOUT, "300ms".into())],
        Some(permissive()),
    )
    .await;
    let mut tcp = TcpStream::connect(m.server.running.inbound).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: api\r\nX-Slow: ")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection")
        .ok();
    let out = String::from_utf8_lossy(&out);
    assert!(!out.contains("client-id="), "{out}");
    eventually("the timeout is counted", WAIT, || async {
        Some(refused(&m.server, "inbound", "header_timeout").await).filter(|v| *v == 1.0)
    })
    .await;
}

#[tokio::test]
async fn connections_over_the_inbound_cap_are_closed() {
    let m = mesh(vec![(config::INBOUND_MAX_CONNECTIONS, "2".into())], None).await;
    let inbound = m.server.running.inbound;
    // Two silent connections hold both slots (for the detection timeout).
    let _a = TcpStream::connect(inbound).await.unwrap();
    let _b = TcpStream::connect(inbound).await.unwrap();
    let mut third = TcpStream::connect(inbound).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(WAIT, third.read(&mut b))
        .await
        .expect("closed at once");
    assert_eq!(n.unwrap_or(0), 0);
    assert_eq!(refused(&m.server, "inbound", "connection_limit").await, 1.0);
}
