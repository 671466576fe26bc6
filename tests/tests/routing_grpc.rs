//! gRPC through a proxy pair with routes: a fault answers a gRPC status, a route timeout answers
//! DEADLINE_EXCEEDED saying which timeout fired, a backend without endpoints UNAVAILABLE and an
//! invalid one INTERNAL; and the golden metrics classify by the status in the trailers, and
//! count a call the client cancelled before its response.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

use musubi_proto::discovery::v1 as dpb;
use musubi_proxy::destination::Destination;
use musubi_proxy::route::Routes;
use musubi_tests::grpc::{self, pb};
use musubi_tests::mesh::{Proxy, Setup, destination, proxy};
use musubi_tests::{Identity, eventually, metric_value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;

const ECHO: &str = "echo.shop.svc.cluster.local:80";
const EMPTY: &str = "empty.shop.svc.cluster.local:80";

fn rule(
    method: &str,
    filters: Vec<dpb::route_filter::Kind>,
    backends: Vec<dpb::WeightedBackend>,
) -> dpb::Route {
    dpb::Route {
        name: "shop/echo".into(),
        kind: dpb::RouteKind::Grpc as i32,
        matches: vec![dpb::RouteMatch {
            grpc: Some(dpb::GrpcMethodMatch {
                kind: dpb::MatchKind::Exact as i32,
                service: "musubi.test.v1.Echo".into(),
                method: method.into(),
            }),
            ..Default::default()
        }],
        filters: filters
            .into_iter()
            .map(|k| dpb::RouteFilter { kind: Some(k) })
            .collect(),
        backends,
        ..Default::default()
    }
}

fn to(authority: &str, invalid: &str) -> dpb::WeightedBackend {
    dpb::WeightedBackend {
        authority: authority.into(),
        weight: 1,
        filters: vec![],
        invalid: invalid.into(),
    }
}

/// The client's view of `echo`: Unary aborts UNAVAILABLE, Slow has a 200 ms timeout, Chat
/// goes to the service itself, and two made-up methods go to a service without endpoints and
/// to an invalid backend.
fn routes() -> Vec<dpb::Route> {
    let abort = dpb::route_filter::Kind::Fault(dpb::Fault {
        abort_grpc_status: 14,
        abort_fraction: Some(dpb::Fraction {
            numerator: 1,
            denominator: 1,
        }),
        ..Default::default()
    });
    let mut slow = rule("Slow", vec![], vec![to(ECHO, "")]);
    slow.timeout = Some(prost_types::Duration {
        seconds: 0,
        nanos: 200_000_000,
    });
    vec![
        rule("Unary", vec![abort], vec![to(ECHO, "")]),
        slow,
        rule("Chat", vec![], vec![to(ECHO, "")]),
    ]
}

async fn start() -> (Identity, grpc::GrpcApp, Proxy, Proxy) {
    start_with(routes()).await
}

/// The echo app behind a server proxy, and a client proxy whose discovery gives `echo` these
/// routes and knows a service `empty` without endpoints.
async fn start_with(routes: Vec<dpb::Route>) -> (Identity, grpc::GrpcApp, Proxy, Proxy) {
    let identity = Identity::start().await;
    let app = grpc::serve().await;
    let server = proxy(
        &identity,
        "shop",
        "echo",
        Setup {
            app_ports: vec![app.addr.port()],
            ..Setup::default()
        },
    )
    .await;
    let mut echo: Destination = (*destination(ECHO, &server, app.addr.port())).clone();
    echo.routes = Routes::from_pb(&routes);
    let mut empty = (*destination(EMPTY, &server, app.addr.port())).clone();
    empty.endpoints.clear();
    let destinations = HashMap::from([
        (ECHO.to_string(), Arc::new(echo)),
        (EMPTY.to_string(), Arc::new(empty)),
    ]);
    let setup = Setup {
        destinations,
        ..Setup::default()
    };
    let client = proxy(&identity, "shop", "web", setup).await;
    (identity, app, server, client)
}

async fn client(p: &Proxy) -> pb::echo_client::EchoClient<tonic::transport::Channel> {
    let channel = Endpoint::from_shared(format!("http://{}", p.running.outbound))
        .unwrap()
        .origin(format!("http://{ECHO}").parse().unwrap())
        .connect()
        .await
        .unwrap();
    pb::echo_client::EchoClient::new(channel)
}

#[tokio::test]
async fn grpc_routes_answer_grpc_statuses() {
    let (_identity, _app, _server, web) = start().await;
    let mut echo = client(&web).await;
    let status = echo
        .unary(pb::Msg {
            text: "hi".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("fault injected"), "{status:?}");

    let status = echo
        .slow(pb::Msg {
            text: "zzz".into(),
            delay_ms: 2000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("timeouts.request (200ms) fired"),
        "{status:?}"
    );
    let fast = echo
        .slow(pb::Msg {
            text: "quick".into(),
            delay_ms: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(fast.into_inner().text, "quick");

    let m = web.metrics().await;
    let faults = metric_value(&m, "musubi_proxy_route_faults_total", "kind=\"abort\"");
    assert_eq!(faults, Some(1.0), "{m}");
    let timeouts = metric_value(&m, "musubi_proxy_route_timeouts_total", "kind=\"request\"");
    assert_eq!(timeouts, Some(1.0));
}

#[tokio::test]
async fn backends_without_endpoints_or_invalid_answer_unavailable_and_internal() {
    let invalid = "backend nowhere.shop port 80 is not a service (BackendNotFound)";
    let (_identity, _app, _server, web) = start_with(vec![
        rule("Unary", vec![], vec![to(EMPTY, "")]),
        rule("Slow", vec![], vec![to(ECHO, invalid)]),
    ])
    .await;
    let mut echo = client(&web).await;
    let status = echo.unary(pb::Msg::default()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("no ready endpoints"),
        "{status:?}"
    );
    let status = echo.slow(pb::Msg::default()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert!(status.message().contains("BackendNotFound"), "{status:?}");
}

#[tokio::test]
async fn grpc_errors_in_trailers_and_cancelled_calls_are_counted_as_they_ended() {
    let (_identity, app, server, web) = start().await;
    let mut echo = client(&web).await;
    // A stream that answers, then fails: grpc-status 14 in the trailers after normal headers.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = echo
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(pb::Msg {
        text: "one".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(replies.next().await.unwrap().unwrap().text, "re:one");
    tx.send(pb::Msg {
        text: "fail".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let status = replies.next().await.unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    drop(tx);
    for (p, direction) in [(&web, "outbound"), (&server, "inbound")] {
        eventually(
            &format!("the {direction} stream to be recorded as a failure"),
            Duration::from_secs(5),
            || async {
                let m = p.metrics().await;
                let labels = format!("direction=\"{direction}\"");
                m.lines()
                    .any(|l| {
                        l.starts_with("musubi_proxy_responses_total")
                            && l.contains(&labels)
                            && l.contains(
                                "status_code=\"200\",classification=\"failure\",error=\"\"",
                            )
                    })
                    .then_some(())
            },
        )
        .await;
    }

    // A call the client gives up on before its response: recorded, as cancelled.
    let call = echo.slow(pb::Msg {
        text: "wait".into(),
        delay_ms: 150,
        ..Default::default()
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(50), call)
            .await
            .is_err()
    );
    eventually(
        "the cancelled call to be recorded",
        Duration::from_secs(5),
        || async {
            let m = web.metrics().await;
            m.lines()
                .any(|l| {
                    l.starts_with("musubi_proxy_responses_total")
                        && l.contains(
                            "status_code=\"\",classification=\"failure\",error=\"cancelled\"",
                        )
                })
                .then_some(())
        },
    )
    .await;
    eventually(
        "the server app to see the cancellation",
        Duration::from_secs(5),
        || async {
            (app.app.cancelled.load(std::sync::atomic::Ordering::SeqCst) >= 1).then_some(())
        },
    )
    .await;
}
