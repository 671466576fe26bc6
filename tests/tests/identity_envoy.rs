//! Interop: a certificate issued by the Musubi identity service is accepted by Envoy as a
//! client certificate under `match_typed_subject_alt_names` (URI SAN), on a TLS 1.3 listener,
//! and a certificate for another identity is refused. Real Envoy, real handshakes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

use musubi_identity::tls::{self, ServerIdentity};
use musubi_tests::Identity;
use musubi_tests::envoy::Envoy;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CONFIG: &str = r#"
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
static_resources:
  listeners:
  - name: mesh_in
    address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:
            tls_params: { tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }
            alpn_protocols: ["http/1.1"]
            tls_certificates:
            - certificate_chain: { filename: "{dir}/envoy.crt" }
              private_key: { filename: "{dir}/envoy.key" }
            validation_context:
              trusted_ca: { filename: "{dir}/ca.crt" }
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: { exact: "spiffe://cluster.local/ns/shop/sa/web" }
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: mesh_in
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                direct_response: { status: 200, body: { inline_string: "hello from envoy" } }
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
"#;

async fn get(port: u16, cfg: Arc<rustls::ClientConfig>) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(tls::mesh_server_name(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    tls.write_all(b"GET / HTTP/1.1\r\nHost: envoy\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn envoy_accepts_issued_svid_and_refuses_other_identities() {
    let identity = Identity::start().await;
    let envoy_id = identity.id("edge", "envoy");
    let envoy_svid = identity.ca.svid(&envoy_id);
    let envoy = Envoy::start(
        CONFIG,
        &[
            ("envoy.crt", &envoy_svid.chain_pem()),
            ("envoy.key", &envoy_svid.key_pem()),
            ("ca.crt", &identity.ca.root.cert_pem),
        ],
    )
    .await;
    let port = envoy.listener_port("mesh_in").await;
    let alpn: &[&[u8]] = &[b"http/1.1"];

    // The web workload's certificate comes from the identity service over gRPC.
    let web = identity.svid("shop", "web").await;
    let cfg = tls::client_config(
        Some(web),
        &identity.ca.bundle,
        ServerIdentity::Exactly(envoy_id.clone()),
        alpn,
    )
    .unwrap();
    let resp = get(port, cfg)
        .await
        .unwrap_or_else(|e| panic!("request failed: {e}\n{}", envoy.log()));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("hello from envoy"), "{resp}");

    // Same CA, other identity: Envoy's SAN matcher refuses it.
    let other = identity.svid("shop", "other").await;
    let cfg = tls::client_config(
        Some(other),
        &identity.ca.bundle,
        ServerIdentity::Exactly(envoy_id.clone()),
        alpn,
    )
    .unwrap();
    let refused = get(port, cfg).await;
    assert!(
        !refused
            .as_deref()
            .unwrap_or("")
            .contains("hello from envoy"),
        "{refused:?}"
    );
    assert!(
        envoy.stat_sum("ssl.fail_verify_san").await >= 1,
        "{}",
        envoy.log()
    );

    // And our client refuses Envoy when it expects someone else.
    let web = identity.svid("shop", "web").await;
    let cfg = tls::client_config(
        Some(web),
        &identity.ca.bundle,
        ServerIdentity::Exactly(identity.id("shop", "api")),
        alpn,
    )
    .unwrap();
    let err = get(port, cfg)
        .await
        .expect_err("wrong server identity must fail");
    assert!(
        err.contains("expected spiffe://cluster.local/ns/shop/sa/api"),
        "{err}"
    );
}
