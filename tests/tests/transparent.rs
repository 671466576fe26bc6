//! Transparent mode inside network namespaces with init rules: two pod namespaces (client and
//! server), each with `musubi-proxy init` rules and a real `musubi-proxy` process in
//! transparent mode running as the proxy UID (2102), plus a third namespace for the control
//! plane (identity service and controller, served from this process). The applications know
//! nothing about the mesh: a plain HTTP client asks for `http://<server pod IP>:8080/`.
//!
//! ```text
//!   client pod 10.78.0.1 ──veth── 10.78.0.2 server pod
//!     10.78.1.1                     10.78.2.1
//!        │ veth                        │ veth
//!     10.78.1.2 ── control plane ── 10.78.2.2   (identity, controller; "outside the mesh")
//! ```
//!
//! Skips (with a printed reason) unless run as root with `ip netns` and iptables available.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use musubi_identity::testing::TestCa;
use musubi_identity::token::local::LocalIssuer;
use musubi_proxy::config;
use musubi_tests::mesh::Controller;
use musubi_tests::netns::{self, Child, Netns};
use musubi_tests::{Identity, TOKEN_ISSUER, apps};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PROXY_UID: &str = "2102";
const CLIENT_IP: &str = "10.78.0.1";
const SERVER_IP: &str = "10.78.0.2";
const CLIENT_IP6: &str = "fd00:78::1";
const SERVER_IP6: &str = "fd00:78::2";

fn mesh_yaml() -> String {
    format!(
        r#"
services:
  - name: api
    namespace: shop
    port: 8080
    protocol: http
    endpoints:
      - {{ address: {SERVER_IP}, port: 8080, serviceAccount: api }}
      - {{ address: "{SERVER_IP6}", port: 8080, serviceAccount: api }}
workloads:
  - namespace: shop
    serviceAccount: api
    ports:
      - port: 8080
        allow:
          - identity: spiffe://cluster.local/ns/shop/sa/web
"#
    )
}

fn readable(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Writes the pod's iptables rules with `musubi-proxy init` (defaults: proxy UID 2102).
fn init(pod: &Netns) {
    let bin = netns::proxy_binary();
    let out = pod.exec(&[bin.to_str().unwrap(), "init"]);
    assert!(
        out.status.success(),
        "init in {}: {}",
        pod.name,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `musubi-proxy` process in transparent mode inside `pod`, as the proxy UID.
struct PodProxy {
    _child: Child,
    log: std::path::PathBuf,
}

impl PodProxy {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[allow(clippy::too_many_arguments)]
fn start_proxy(
    pod: &Netns,
    dir: &Path,
    identity: &Identity,
    control_ip: &str,
    identity_port: u16,
    controller: &Controller,
    sa: &str,
) -> PodProxy {
    let anchors = dir.join("anchors.pem");
    std::fs::write(&anchors, identity.ca.bundle.to_pem()).unwrap();
    readable(&anchors, 0o644);
    let token = dir.join(format!("{sa}.token"));
    let jwt = identity
        .tokens
        .mint("shop", sa, Duration::from_secs(3600))
        .unwrap();
    std::fs::write(&token, jwt).unwrap();
    readable(&token, 0o644);
    let log = dir.join(format!("{sa}.log"));
    let bin = netns::proxy_binary();
    let mut cmd = pod.command(&[
        "setpriv",
        "--reuid",
        PROXY_UID,
        "--regid",
        PROXY_UID,
        "--clear-groups",
        bin.to_str().unwrap(),
    ]);
    // The default listen addresses: inbound and admin dual-stack, outbound on 127.0.0.1 and
    // [::1] (where iptables and ip6tables redirect).
    cmd.env(config::CAPTURE_MODE, "transparent")
        .env(config::TRUST_ANCHORS, &anchors)
        .env(config::NAMESPACE, "shop")
        .env(config::SERVICE_ACCOUNT, sa)
        .env(config::TOKEN_FILE, &token)
        .env(
            config::IDENTITY_ADDR,
            format!("{control_ip}:{identity_port}"),
        )
        .env(config::IDENTITY_NAMESPACE, "musubi")
        .env(
            config::CONTROLLER_ADDR,
            format!("{control_ip}:{}", controller.addr.port()),
        )
        .env(config::CONTROLLER_IDENTITY, controller.id.to_string())
        .env(config::DRAIN_TIMEOUT, "1s")
        .env("MUSUBI_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let child = Child(cmd.spawn().expect("spawn musubi-proxy"));
    PodProxy { _child: child, log }
}

/// Waits for the proxy's admin `/ready` inside its namespace.
async fn wait_ready(pod: &Arc<Netns>, proxy: &PodProxy) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ns = pod.clone();
        let got = tokio::task::spawn_blocking(move || ns.http_get("127.0.0.1:4191", "/ready"))
            .await
            .unwrap();
        if matches!(&got, Ok((status, _)) if status.contains(" 200")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "proxy in {} never became ready ({got:?}); log:\n{}",
            pod.name,
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_mode_inside_a_network_namespace_with_init_rules() {
    if netns::skip("transparent_mode_inside_a_network_namespace_with_init_rules") {
        return;
    }
    let client = Arc::new(Netns::new("cli"));
    let server = Arc::new(Netns::new("srv"));
    let control = Arc::new(Netns::new("ctl"));
    let v6 = netns::ipv6();
    let (client_addrs, server_addrs) = if v6 {
        (
            vec![format!("{CLIENT_IP}/24"), format!("{CLIENT_IP6}/64")],
            vec![format!("{SERVER_IP}/24"), format!("{SERVER_IP6}/64")],
        )
    } else {
        (
            vec![format!("{CLIENT_IP}/24")],
            vec![format!("{SERVER_IP}/24")],
        )
    };
    let client_refs: Vec<&str> = client_addrs.iter().map(String::as_str).collect();
    let server_refs: Vec<&str> = server_addrs.iter().map(String::as_str).collect();
    netns::link(&client, &client_refs, &server, &server_refs);
    netns::link(&client, &["10.78.1.1/24"], &control, &["10.78.1.2/24"]);
    netns::link(&server, &["10.78.2.1/24"], &control, &["10.78.2.2/24"]);

    // Control plane, listening inside the control namespace.
    musubi_identity::crypto::install_default();
    let ca = TestCa::new("cluster.local");
    let tokens = LocalIssuer::generate(TOKEN_ISSUER).unwrap();
    let grpc = control.listen("0.0.0.0:0");
    let identity_port = grpc.local_addr().unwrap().port();
    let identity = Identity::start_on(ca, tokens, grpc, |_| {}).await;
    // The identity service is only reachable inside the control namespace: fetch the
    // controller's SVID from there.
    let store = control.block_on(identity.svid("musubi", "musubi-controller"));
    let controller =
        Controller::start_with_svid(&identity, &mesh_yaml(), control.listen("0.0.0.0:0"), store);

    // The server application: plain HTTP on 8080 on all of the pod's addresses; it reports
    // the `musubi-client-id` header it received.
    let _app = apps::http_on(server.listen("0.0.0.0:8080"));
    // An agent in the server pod that listens on loopback only (a Vault agent, pprof): no
    // port of the workload, so nobody from outside the pod may reach it.
    let _agent = apps::http_on(server.listen("127.0.0.1:8200"));

    init(&client);
    init(&server);

    let dir = tempfile::tempdir().unwrap();
    readable(dir.path(), 0o755);
    let client_proxy = start_proxy(
        &client,
        dir.path(),
        &identity,
        "10.78.1.2",
        identity_port,
        &controller,
        "web",
    );
    let server_proxy = start_proxy(
        &server,
        dir.path(),
        &identity,
        "10.78.2.2",
        identity_port,
        &controller,
        "api",
    );
    wait_ready(&client, &client_proxy).await;
    wait_ready(&server, &server_proxy).await;

    // A plain HTTP client in the client pod, no proxy settings: iptables takes it to the
    // client proxy, which finds the server pod in discovery and goes over mTLS to the server
    // pod, where iptables takes it to the server proxy, which hands it to the application.
    let c = client.clone();
    let (status, body) =
        tokio::task::spawn_blocking(move || c.http_get(&format!("{SERVER_IP}:8080"), "/hello"))
            .await
            .unwrap()
            .unwrap_or_else(|e| {
                panic!(
                    "request failed: {e}\nclient proxy:\n{}\nserver proxy:\n{}",
                    client_proxy.log(),
                    server_proxy.log()
                )
            });
    assert!(
        status.contains(" 200"),
        "{status}: {body}\nclient proxy:\n{}\nserver proxy:\n{}",
        client_proxy.log(),
        server_proxy.log()
    );
    assert!(
        body.contains("client-id=spiffe://cluster.local/ns/shop/sa/web"),
        "the application did not see the client's SPIFFE ID: {body}"
    );
    assert!(body.contains("path=/hello"), "{body}");

    // From outside the mesh (the control namespace has no proxy), plaintext straight to the
    // server pod's application port: the server proxy receives it (iptables) and refuses it,
    // because the port is STRICT.
    let ctl = control.clone();
    let outside = tokio::task::spawn_blocking(move || ctl.http_get("10.78.2.1:8080", "/hello"))
        .await
        .unwrap();
    match &outside {
        Err(_) => {}
        Ok((status, body)) => {
            assert!(
                !status.contains(" 200") && !body.contains("client-id="),
                "plaintext from outside the mesh reached the app: {status} {body}"
            );
        }
    }
    // Both went through the server proxy: it refused the plaintext one for being plaintext
    // on a STRICT port, and its metrics name the client's identity from mTLS.
    let s = server.clone();
    let metrics = tokio::task::spawn_blocking(move || s.http_get("127.0.0.1:4191", "/metrics"))
        .await
        .unwrap()
        .map(|(_, b)| b)
        .unwrap_or_default();
    assert!(
        metrics.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "server proxy metrics do not name the mTLS client:\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("musubi_proxy_refused")
                && l.contains("reason=\"plaintext_in_strict\"")
                && !l.ends_with(" 0")),
        "server proxy did not refuse the plaintext connection:\n{metrics}"
    );
    // IPv6: ip6tables takes the client's connection to the proxy's [::1] outbound listener,
    // and the server proxy's dual-stack inbound listener receives it.
    if v6 {
        let c = client.clone();
        let (status, body) = tokio::task::spawn_blocking(move || {
            c.http_get(&format!("[{SERVER_IP6}]:8080"), "/over-ipv6")
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| {
            panic!(
                "IPv6 request failed: {e}\nserver proxy:\n{}",
                server_proxy.log()
            )
        });
        assert!(status.contains(" 200"), "{status}: {body}");
        assert!(
            body.contains("client-id=spiffe://cluster.local/ns/shop/sa/web"),
            "{body}"
        );
    }

    // The loopback-only agent: the client's request goes out (it is not a mesh service) and
    // the server proxy refuses it, since 8200 is not a declared port.
    let c = client.clone();
    let agent =
        tokio::task::spawn_blocking(move || c.http_get(&format!("{SERVER_IP}:8200"), "/v1/secret"))
            .await
            .unwrap();
    assert!(
        !matches!(&agent, Ok((status, _)) if status.contains(" 200")),
        "the loopback-only agent was reached: {agent:?}"
    );
    // Plaintext straight to the server proxy's own inbound port (PREROUTING leaves 4143
    // alone): a loop, refused at once.
    let ctl = control.clone();
    let looped = tokio::task::spawn_blocking(move || ctl.http_get("10.78.2.1:4143", "/"))
        .await
        .unwrap();
    assert!(
        !matches!(&looped, Ok((status, _)) if status.contains(" 200")),
        "{looped:?}"
    );
    // The admin port answers probes and scrapes from anywhere, /debug/ only from the pod.
    let ctl = control.clone();
    let (status, _) =
        tokio::task::spawn_blocking(move || ctl.http_get("10.78.2.1:4191", "/debug/config"))
            .await
            .unwrap()
            .unwrap();
    assert!(status.contains(" 403"), "{status}");
    let ctl = control.clone();
    let (status, _) = tokio::task::spawn_blocking(move || ctl.http_get("10.78.2.1:4191", "/ready"))
        .await
        .unwrap()
        .unwrap();
    assert!(status.contains(" 200"), "{status}");
    let s = server.clone();
    let (status, debug) =
        tokio::task::spawn_blocking(move || s.http_get("127.0.0.1:4191", "/debug/config"))
            .await
            .unwrap()
            .unwrap();
    assert!(status.contains(" 200"), "{status} {debug}");
    assert!(debug.contains("inbound_policy"), "{debug}");
    let s = server.clone();
    let metrics = tokio::task::spawn_blocking(move || s.http_get("127.0.0.1:4191", "/metrics"))
        .await
        .unwrap()
        .map(|(_, b)| b)
        .unwrap_or_default();
    for reason in ["port_not_allowed", "loop"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("musubi_proxy_refused")
                    && l.contains(&format!("reason=\"{reason}\""))
                    && !l.ends_with(" 0")),
            "no {reason} refusal counted:\n{metrics}"
        );
    }
    drop(controller);
}
