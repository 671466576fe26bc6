//! Interop with Envoy as the peer sidecar, both directions: a Musubi proxy calls an Envoy that
//! requires a client certificate and matches its SPIFFE SAN; an Envoy calls a Musubi proxy with
//! its own SVID, matching the Musubi proxy's SPIFFE SAN. Same trust bundle, real handshakes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use musubi_proxy::destination::{Destination, Endpoint, Protocol, Transport};
use musubi_proxy::policy::{InboundPolicy, MtlsMode, PortPolicy};
use musubi_tests::envoy::Envoy;
use musubi_tests::mesh::{Setup, proxy};
use musubi_tests::{Identity, apps};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

const TLS_PARAMS: &str =
    "{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }";

async fn get(addr: SocketAddr, uri: &str) -> (StatusCode, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(uri)
        .header("host", "api.shop")
        .body(Full::<Bytes>::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn musubi_proxy_calls_envoy_over_mtls() {
    let identity = Identity::start().await;
    let envoy_id = identity.id("edge", "envoy");
    let svid = identity.ca.svid(&envoy_id);
    let config = format!(
        r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: mesh_in
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_params: {TLS_PARAMS}
            alpn_protocols: ["h2"]
            tls_certificates:
            - certificate_chain: {{ filename: "{{dir}}/envoy.crt" }}
              private_key: {{ filename: "{{dir}}/envoy.key" }}
            validation_context:
              trusted_ca: {{ filename: "{{dir}}/ca.crt" }}
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {{ exact: "spiffe://cluster.local/ns/shop/sa/web" }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: mesh_in
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                direct_response: {{ status: 200, body: {{ inline_string: "hello from envoy" }} }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
"#
    );
    let envoy = Envoy::start(
        &config,
        &[
            ("envoy.crt", &svid.chain_pem()),
            ("envoy.key", &svid.key_pem()),
            ("ca.crt", &identity.ca.root.cert_pem),
        ],
    )
    .await;
    let port = envoy.listener_port("mesh_in").await;
    let dest = |id| {
        Arc::new(Destination {
            authority: "envoy.edge:80".into(),
            protocol: Protocol::Detect,
            endpoints: vec![Endpoint {
                connect: SocketAddr::from(([127, 0, 0, 1], port)),
                app_port: 80,
                identity: Some(id),
                weight: 1,
                transport: Transport::H2Mtls,
                plaintext_allowed: false,
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
                ("envoy.edge:80".to_string(), dest(envoy_id.clone())),
                (
                    "impostor.edge:80".to_string(),
                    dest(identity.id("edge", "someone-else")),
                ),
            ]),
            ..Setup::default()
        },
    )
    .await;
    let (status, body) = get(client.running.outbound, "http://envoy.edge:80/").await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", envoy.log());
    assert_eq!(body, "hello from envoy");
    // The same Envoy under an identity discovery did not promise: refused in the handshake.
    let (status, body) = get(client.running.outbound, "http://impostor.edge:80/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body.contains("expected spiffe://cluster.local/ns/edge/sa/someone-else"),
        "{body}"
    );
}

#[tokio::test]
async fn envoy_calls_musubi_proxy_over_mtls() {
    let identity = Identity::start().await;
    let app = apps::http().await;
    let server = proxy(
        &identity,
        "shop",
        "api",
        Setup {
            app_ports: vec![app.port()],
            ..Setup::default()
        },
    )
    .await;
    // The same behind a PERMISSIVE port: there an mTLS peer that is not Musubi names the mesh
    // server name in SNI, or its TLS is the application's own business.
    let permissive = proxy(
        &identity,
        "shop",
        "api",
        Setup {
            app_ports: vec![app.port()],
            policy: Some(InboundPolicy {
                default: PortPolicy {
                    mtls: MtlsMode::Permissive,
                    ..PortPolicy::STRICT
                },
                ..InboundPolicy::default()
            }),
            ..Setup::default()
        },
    )
    .await;
    let envoy_id = identity.id("edge", "envoy");
    let svid = identity.ca.svid(&envoy_id);
    let upstream_to = |name: &str, san: &str, port: u16, sni: &str| {
        format!(
            r#"
  - name: {name}
    type: STATIC
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_params: {TLS_PARAMS}
          alpn_protocols: ["h2"]
          tls_certificates:
          - certificate_chain: {{ filename: "{{dir}}/envoy.crt" }}
            private_key: {{ filename: "{{dir}}/envoy.key" }}
          validation_context:
            trusted_ca: {{ filename: "{{dir}}/ca.crt" }}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{ exact: "{san}" }}
{sni}"#
        )
    };
    let upstream =
        |name: &str, san: &str| upstream_to(name, san, server.running.inbound.port(), "");
    let config = format!(
        r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: app_out
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: app_out
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/wrong" }}
                route: {{ cluster: wrong_san }}
              - match: {{ prefix: "/permissive-sni" }}
                route: {{ cluster: permissive_sni }}
              - match: {{ prefix: "/permissive-no-sni" }}
                route: {{ cluster: permissive_no_sni }}
              - match: {{ prefix: "/" }}
                route: {{ cluster: musubi_api }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:{}{}{}{}"#,
        upstream("musubi_api", "spiffe://cluster.local/ns/shop/sa/api"),
        upstream("wrong_san", "spiffe://cluster.local/ns/shop/sa/not-api"),
        upstream_to(
            "permissive_sni",
            "spiffe://cluster.local/ns/shop/sa/api",
            permissive.running.inbound.port(),
            "        sni: musubi.mesh\n",
        ),
        upstream_to(
            "permissive_no_sni",
            "spiffe://cluster.local/ns/shop/sa/api",
            permissive.running.inbound.port(),
            "",
        ),
    );
    let envoy = Envoy::start(
        &config,
        &[
            ("envoy.crt", &svid.chain_pem()),
            ("envoy.key", &svid.key_pem()),
            ("ca.crt", &identity.ca.root.cert_pem),
        ],
    )
    .await;
    let port = envoy.listener_port("app_out").await;
    let (status, body) = get(SocketAddr::from(([127, 0, 0, 1], port)), "/from-envoy").await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", server.metrics().await);
    assert!(
        body.contains("client-id=spiffe://cluster.local/ns/edge/sa/envoy "),
        "{body}"
    );
    assert!(body.contains("path=/from-envoy"), "{body}");
    // Envoy refuses our proxy when it expects another identity.
    let (status, _) = get(SocketAddr::from(([127, 0, 0, 1], port)), "/wrong").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // PERMISSIVE, SNI musubi.mesh: terminated as mesh mTLS, the app sees Envoy's identity.
    let entry = SocketAddr::from(([127, 0, 0, 1], port));
    let (status, body) = get(entry, "/permissive-sni").await;
    assert_eq!(status, StatusCode::OK, "{body}\n{}", envoy.log());
    assert!(
        body.contains("client-id=spiffe://cluster.local/ns/edge/sa/envoy "),
        "{body}"
    );
    // PERMISSIVE without it: the TLS is passed to the (plaintext) app untouched, which cannot
    // make sense of it; no identity is handed out.
    let (status, body) = get(entry, "/permissive-no-sni").await;
    assert_ne!(status, StatusCode::OK, "{body}");
    assert!(!body.contains("client-id="), "{body}");
}
