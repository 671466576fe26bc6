//! The Envoy pair's configuration, equivalent to the Musubi pair: TLS 1.3 only, the same ECDSA
//! P-256 SVIDs from the same CA, SPIFFE URI SAN matching both ways, HTTP/2 between the proxies,
//! the same key-exchange group as rustls negotiates between Musubi proxies, one worker (set on
//! the command line), no access logs, no request ids, circuit breakers out of the way.

use super::routed;
use super::topology::Backend;

/// rustls (aws-lc-rs) prefers the X25519+ML-KEM-768 hybrid, so two Musubi proxies negotiate it;
/// Envoy is pinned to the same group.
pub const KX_GROUP: &str = "X25519MLKEM768";

const CLIENT_ID: &str = "spiffe://cluster.local/ns/bench/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/bench/sa/server";

fn tls_context(peer: &str, alpn: &str) -> String {
    format!(
        r#"common_tls_context:
            tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3, ecdh_curves: ["{KX_GROUP}"] }}
            alpn_protocols: [{alpn}]
            tls_certificates:
            - certificate_chain: {{ filename: "{{dir}}/svid.crt" }}
              private_key: {{ filename: "{{dir}}/svid.key" }}
            validation_context:
              trusted_ca: {{ filename: "{{dir}}/ca.crt" }}
              match_typed_subject_alt_names:
              - san_type: URI
                matcher: {{ exact: "{peer}" }}"#
    )
}

const BREAKERS: &str = "circuit_breakers: { thresholds: [{ max_connections: 1000000, max_pending_requests: 1000000, max_requests: 1000000, max_retries: 1000000 }] }";

fn cluster(name: &str, addr: &str, port: u16, h2: bool, tls: Option<String>) -> String {
    let proto = if h2 {
        r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }"#
    } else {
        ""
    };
    let tls = tls
        .map(|t| {
            format!(
                r#"
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {t}"#
            )
        })
        .unwrap_or_default();
    format!(
        r#"
  - name: {name}
    connect_timeout: 5s
    type: STATIC
    {BREAKERS}
    load_assignment:
      cluster_name: {name}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {addr}, port_value: {port} }} }} }} }}] }}]{proto}{tls}"#
    )
}

/// An HTTP connection manager whose virtual hosts are `hosts` (more specific domains) and then
/// `all` (every other authority) with `routes`.
fn hcm(name: &str, hosts: &str, routes: &str) -> String {
    format!(
        r#"
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: AUTO
          generate_request_id: false
          route_config:
            virtual_hosts:{hosts}
            - name: all
              domains: ["*"]
              routes:{routes}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router, suppress_envoy_headers: true }}"#
    )
}

fn tcp_proxy(name: &str, cluster: &str) -> String {
    format!(
        r#"
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}"#
    )
}

fn downstream_tls(peer: &str, alpn: &str) -> String {
    format!(
        r#"
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {}"#,
        tls_context(peer, alpn).replace("\n            ", "\n              ")
    )
}

const ROUTE_GRPC_THEN_HTTP: &str = r#"
              - match: { prefix: "/grpc.health.v1.Health/" }
                route: { cluster: backend_grpc, timeout: 0s }
              - match: { prefix: "/" }
                route: { cluster: backend_http, timeout: 0s }"#;

/// The client-side Envoy: plaintext HTTP and TCP in, mTLS to the server-side Envoy out. The
/// routed authority has its own virtual host and two clusters that reach the server-side Envoy
/// exactly as `server_http` does.
pub fn client(http: u16, tcp: u16, server_http: u16, server_tcp: u16) -> String {
    let to_server = |name: &str| {
        cluster(
            name,
            "127.0.0.14",
            server_http,
            true,
            Some(tls_context(SERVER_ID, "\"h2\"")),
        )
    };
    let split_clusters: String = routed::SPLIT
        .iter()
        .map(|(name, _)| to_server(&routed::envoy_cluster(name)))
        .collect();
    let routes = r#"
              - match: { prefix: "/" }
                route: { cluster: server_http, timeout: 0s }"#;
    format!(
        r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.13, port_value: 0 }} }}
static_resources:
  listeners:
  - name: http_out
    address: {{ socket_address: {{ address: 127.0.0.13, port_value: {http} }} }}
    filter_chains:
    - filters:{}
  - name: tcp_out
    address: {{ socket_address: {{ address: 127.0.0.13, port_value: {tcp} }} }}
    filter_chains:
    - filters:{}
  clusters:{}{}{split_clusters}
"#,
        hcm("http_out", &routed::envoy_virtual_host(), routes),
        tcp_proxy("tcp_out", "server_tcp"),
        to_server("server_http"),
        cluster(
            "server_tcp",
            "127.0.0.14",
            server_tcp,
            false,
            Some(tls_context(SERVER_ID, ""))
        ),
    )
}

/// The server-side Envoy: mTLS in (client identity matched), plaintext to the backend.
pub fn server(http: u16, tcp: u16, b: Backend) -> String {
    format!(
        r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.14, port_value: 0 }} }}
static_resources:
  listeners:
  - name: mesh_http
    address: {{ socket_address: {{ address: 127.0.0.14, port_value: {http} }} }}
    filter_chains:
    - filters:{}{}
  - name: mesh_tcp
    address: {{ socket_address: {{ address: 127.0.0.14, port_value: {tcp} }} }}
    filter_chains:
    - filters:{}{}
  clusters:{}{}{}
"#,
        hcm("mesh_http", "", ROUTE_GRPC_THEN_HTTP),
        downstream_tls(CLIENT_ID, "\"h2\""),
        tcp_proxy("mesh_tcp", "backend_tcp"),
        downstream_tls(CLIENT_ID, ""),
        cluster("backend_http", "127.0.0.1", b.http, false, None),
        cluster("backend_grpc", "127.0.0.1", b.grpc, true, None),
        cluster("backend_tcp", "127.0.0.1", b.tcp, false, None),
    )
}
