//! The controller end to end: real streams over real mTLS, file edits reaching proxies, bad
//! edits refused, traffic that survives a controller restart, and the caps on what one client
//! may hold.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use musubi_controller::limits::{RefusedLabels, StreamLabel};
use musubi_controller::{StreamLimits, StreamMetrics, StreamOptions};
use musubi_proto::discovery::v1::{ServiceUpdate, WatchRequest, discovery_client::DiscoveryClient};
use musubi_proto::policy::v1::{PolicyRequest, policy_client::PolicyClient};
use musubi_tests::mesh::{Controller, Proxy, Setup, proxy};
use musubi_tests::{Identity, apps, eventually};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

async fn get(outbound: SocketAddr, uri: &str) -> (StatusCode, String) {
    let tcp = TcpStream::connect(outbound).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
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

fn mesh_yaml(app_port: u16, server: &Proxy, extra_endpoint: bool, allow_web: bool) -> String {
    let extra = if extra_endpoint {
        format!(
            "\n      - {{ address: 127.0.0.2, port: {app_port}, serviceAccount: api, proxyPort: {} }}",
            server.running.inbound.port()
        )
    } else {
        String::new()
    };
    let allow = if allow_web {
        "spiffe://cluster.local/ns/shop/sa/web"
    } else {
        "spiffe://cluster.local/ns/shop/sa/admin"
    };
    format!(
        r#"
services:
  - name: api
    namespace: shop
    port: 80
    protocol: http
    endpoints:
      - {{ address: 127.0.0.1, port: {app_port}, serviceAccount: api, proxyPort: {proxy} }}{extra}
workloads:
  - namespace: shop
    serviceAccount: api
    ports:
      - port: {app_port}
        allow:
          - identity: {allow}
"#,
        proxy = server.running.inbound.port()
    )
}

#[tokio::test]
async fn streams_follow_file_edits_and_refuse_bad_ones() {
    let identity = Identity::start().await;
    let yaml = "services:\n  - name: api\n    namespace: shop\n    port: 80\n    endpoints:\n      - { address: 127.0.0.1, port: 9001, serviceAccount: api }\n";
    let controller = Controller::start(&identity, yaml).await;
    let store = identity.svid("shop", "web").await;
    let channel = musubi_proxy::control::channel(
        &controller.addr.to_string(),
        &identity.ca.bundle,
        store,
        controller.id.clone(),
    )
    .unwrap();
    let mut client = DiscoveryClient::new(channel);
    let mut stream = client
        .watch(WatchRequest {
            target: "api.shop:80".into(),
            context_namespace: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.service.as_ref().unwrap().endpoints.len(), 1);

    let two = format!("{yaml}      - {{ address: 127.0.0.2, port: 9001, serviceAccount: api }}\n");
    assert!(controller.edit(&two).await.unwrap());
    let second = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.service.as_ref().unwrap().endpoints.len(), 2);
    assert!(second.version > first.version);

    // A broken edit is refused with its line; the stream does not change.
    let broken = format!("{two}      - {{ address: not-an-ip, port: 9001 }}\n");
    let err = controller.edit(&broken).await.unwrap_err().to_string();
    assert!(
        err.contains("line 8") && err.contains("not an IP address"),
        "{err}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err(),
        "no update for a refused edit"
    );

    // Unknown targets are answered, bad ones refused.
    let mut other = client
        .watch(WatchRequest {
            target: "nothing.here:80".into(),
            context_namespace: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other.message().await.unwrap().unwrap().unknown);
    let status = client
        .watch(WatchRequest {
            target: "no-port".into(),
            context_namespace: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // Without a client certificate the controller refuses the connection.
    let channel = musubi_identity::client::connect(
        &controller.addr.to_string(),
        &identity.ca.bundle,
        controller.id.clone(),
    )
    .unwrap();
    let status = DiscoveryClient::new(channel)
        .watch(WatchRequest {
            target: "api.shop:80".into(),
            context_namespace: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Unauthenticated
        ),
        "{status:?}"
    );
}

#[tokio::test]
async fn proxies_follow_the_controller_and_survive_its_restart() {
    let identity = Identity::start().await;
    let app = apps::http().await;
    // The mesh file names the server proxy's address, so the file is written once it runs.
    let mut controller = Controller::start(&identity, "{}").await;
    let server = proxy(
        &identity,
        "shop",
        "api",
        Setup {
            app_ports: vec![app.port()],
            controller: Some(controller.endpoint()),
            ..Setup::default()
        },
    )
    .await;
    controller
        .edit(&mesh_yaml(app.port(), &server, false, true))
        .await
        .unwrap();
    let client = proxy(
        &identity,
        "shop",
        "web",
        Setup {
            controller: Some(controller.endpoint()),
            ..Setup::default()
        },
    )
    .await;

    let (status, body) = get(client.running.outbound, "http://api.shop:80/one").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("client-id=spiffe://cluster.local/ns/shop/sa/web"),
        "{body}"
    );
    // Both sides label the request by the Service's canonical authority: the client from
    // discovery, the server from the policy (the Services that target its port).
    for (p, direction) in [(&client, "outbound"), (&server, "inbound")] {
        let m = p.metrics().await;
        assert!(
            m.lines()
                .any(|l| l.starts_with("musubi_proxy_requests_total{")
                    && l.contains(&format!("direction=\"{direction}\""))
                    && l.contains("authority=\"api.shop.svc.cluster.local:80\"")),
            "{direction}:\n{m}"
        );
    }

    // Controller down: traffic keeps flowing on the last snapshot.
    controller.stop().await;
    for i in 0..5 {
        let (status, body) = get(
            client.running.outbound,
            &format!("http://api.shop:80/down-{i}"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Back up on the same address; the proxies resync, and a policy change reaches the server proxy.
    controller.restart(&identity).await;
    controller
        .edit(&mesh_yaml(app.port(), &server, false, false))
        .await
        .unwrap();
    eventually(
        "the new policy to deny web",
        Duration::from_secs(20),
        || {
            let outbound = client.running.outbound;
            async move {
                let (status, _) = get(outbound, "http://api.shop:80/after").await;
                (status == StatusCode::FORBIDDEN).then_some(())
            }
        },
    )
    .await;
}

/// A controller serving `yaml` with these caps; its metrics.
async fn capped_controller(
    identity: &Identity,
    yaml: &str,
    limits: StreamLimits,
) -> (
    musubi_controller::RunningController,
    StreamMetrics,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, yaml).unwrap();
    let metrics = StreamMetrics::default();
    let running = musubi_controller::start(musubi_controller::ControllerConfig {
        source: musubi_controller::file::FileSource::load(&path).unwrap(),
        bundle: identity.ca.bundle.clone(),
        store: identity.svid("musubi", "musubi-controller").await,
        listener: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        streams: StreamOptions {
            limits,
            metrics: metrics.clone(),
        },
    })
    .unwrap();
    (running, metrics, dir)
}

/// Forwards TCP to `to` until the returned task is aborted (which drops both sockets, as a
/// client that goes away without a word would).
async fn forwarder(to: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            conns.spawn(async move {
                let mut outbound = TcpStream::connect(to).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    (addr, task)
}

fn open(m: &StreamMetrics, stream: &'static str) -> i64 {
    m.open.get_or_create(&StreamLabel { stream }).get()
}

fn refused(m: &StreamMetrics, stream: &'static str, reason: &'static str) -> u64 {
    m.refused
        .get_or_create(&RefusedLabels { stream, reason })
        .get()
}

async fn watch(
    client: &mut DiscoveryClient<tonic::transport::Channel>,
    target: String,
) -> Result<tonic::Streaming<ServiceUpdate>, tonic::Status> {
    client
        .watch(WatchRequest {
            target,
            context_namespace: String::new(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_client_are_capped_and_released_when_the_client_goes() {
    // The defaults, all on one connection (the controller allows more streams per connection
    // than one client may hold, so the cap per client is what a scan meets).
    const CAP: usize = musubi_controller::limits::DEFAULT_DISCOVERY_STREAMS_PER_CLIENT;
    const POLICY_CAP: usize = musubi_controller::limits::DEFAULT_POLICY_STREAMS_PER_CLIENT;
    let identity = Identity::start().await;
    let limits = StreamLimits::default();
    let (controller, metrics, _dir) = capped_controller(&identity, "{}", limits).await;
    let controller_id = identity.id("musubi", "musubi-controller");
    // The scanning pod reaches the controller through a connection we can cut.
    let (via, cut) = forwarder(controller.addr).await;
    let web = identity.svid("shop", "web").await;
    let channel = |addr: SocketAddr, store| {
        musubi_proxy::control::channel(
            &addr.to_string(),
            &identity.ca.bundle,
            store,
            controller_id.clone(),
        )
        .unwrap()
    };
    let mut scanner = DiscoveryClient::new(channel(via, web.clone()));

    // A port scan: one distinct target per port. The first CAP streams are answered...
    let mut held = Vec::new();
    for port in 1..=CAP {
        let mut s = watch(&mut scanner, format!("10.0.0.1:{port}"))
            .await
            .unwrap();
        assert!(s.message().await.unwrap().unwrap().unknown);
        held.push(s);
    }
    assert_eq!(open(&metrics, "discovery"), CAP as i64);
    // ... the next ones are refused, saying what the limit is.
    for port in CAP + 1..CAP + 4 {
        let status = watch(&mut scanner, format!("10.0.0.1:{port}"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            status
                .message()
                .contains(&format!("{CAP} discovery streams"))
                && status
                    .message()
                    .contains("spiffe://cluster.local/ns/shop/sa/web"),
            "{}",
            status.message()
        );
    }
    assert_eq!(refused(&metrics, "discovery", "per_client_limit"), 3);
    assert_eq!(open(&metrics, "discovery"), CAP as i64);

    // Another workload is not affected.
    let mut api =
        DiscoveryClient::new(channel(controller.addr, identity.svid("shop", "api").await));
    let mut other = watch(&mut api, "10.0.0.2:80".into()).await.unwrap();
    assert!(other.message().await.unwrap().unwrap().unknown);

    // A stream the scanner closes gives its slot back.
    drop(held.pop());
    eventually(
        "the closed stream's slot back",
        Duration::from_secs(5),
        || {
            let m = metrics.clone();
            async move { (open(&m, "discovery") == CAP as i64).then_some(()) }
        },
    )
    .await;
    let mut again = watch(&mut scanner, "10.0.0.1:9999".into()).await.unwrap();
    assert!(again.message().await.unwrap().unwrap().unknown);
    held.push(again);

    // An overlong target is refused before it costs a slot.
    let status = watch(&mut scanner, format!("{}:80", "a".repeat(600)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("the limit is 512"),
        "{}",
        status.message()
    );
    assert_eq!(refused(&metrics, "discovery", "target_too_long"), 1);

    // Policy streams have a small cap of their own.
    let mut policy = PolicyClient::new(channel(via, web.clone()));
    let mut policies = Vec::new();
    for _ in 0..POLICY_CAP {
        let mut p = policy
            .watch(PolicyRequest { ports: vec![] })
            .await
            .unwrap()
            .into_inner();
        p.message().await.unwrap().unwrap();
        policies.push(p);
    }
    let status = policy
        .watch(PolicyRequest { ports: vec![] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(
        status
            .message()
            .contains(&format!("{POLICY_CAP} policy streams")),
        "{}",
        status.message()
    );
    assert_eq!(refused(&metrics, "policy", "per_client_limit"), 1);

    // The scanner's connection goes away without closing its streams: every slot comes back.
    cut.abort();
    eventually(
        "the cut connection's slots back",
        Duration::from_secs(10),
        || {
            let m = metrics.clone();
            async move { (open(&m, "discovery") == 1 && open(&m, "policy") == 0).then_some(()) }
        },
    )
    .await;
    // The workload can watch again (over a new connection).
    let mut back = DiscoveryClient::new(channel(controller.addr, web));
    let mut s = watch(&mut back, "10.0.0.1:1".into()).await.unwrap();
    assert!(s.message().await.unwrap().unwrap().unknown);
    drop((held, policies));
    controller.shutdown().await;
}
