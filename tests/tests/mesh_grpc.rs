//! gRPC through a proxy pair: unary, bidirectional streaming, trailers with error details,
//! deadlines and cancellation, all end to end over the mesh.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

use musubi_tests::grpc::{self, pb};
use musubi_tests::mesh::{Setup, pair};
use musubi_tests::{Identity, eventually};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;

#[tokio::test]
async fn grpc_unary_streaming_trailers_deadlines_and_cancellation() {
    let identity = Identity::start().await;
    let app = grpc::serve().await;
    let (_server, client) = pair(
        &identity,
        "echo",
        app.addr.port(),
        "echo.shop:80",
        Setup::default(),
    )
    .await;
    // The application addresses `echo.shop:80`; the connection goes to its own outbound proxy.
    let channel = Endpoint::from_shared(format!("http://{}", client.running.outbound))
        .unwrap()
        .origin("http://echo.shop:80".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut echo = pb::echo_client::EchoClient::new(channel);

    // Unary, with the caller's identity visible to the server app.
    let reply = echo
        .unary(pb::Msg {
            text: "hi".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.text, "hi");
    assert_eq!(reply.client_id, "spiffe://cluster.local/ns/shop/sa/web");

    // Errors travel in trailers, with their metadata.
    let status = echo
        .unary(pb::Msg {
            text: "fail".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(status.message(), "told to fail");
    assert_eq!(status.metadata().get("x-detail").unwrap(), "from-the-app");

    // Bidirectional streaming: each message answered while the stream stays open.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = echo
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for word in ["one", "two", "three"] {
        tx.send(pb::Msg {
            text: word.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), replies.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(r.text, format!("re:{word}"));
        assert_eq!(r.client_id, "spiffe://cluster.local/ns/shop/sa/web");
    }
    drop(tx);
    assert!(
        tokio::time::timeout(Duration::from_secs(5), replies.next())
            .await
            .unwrap()
            .is_none()
    );

    // Deadlines: grpc-timeout crosses both proxies and the server enforces it.
    let mut req = tonic::Request::new(pb::Msg {
        text: "late".into(),
        delay_ms: 2000,
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(100));
    let started = Instant::now();
    let status = echo.slow(req).await.unwrap_err();
    assert!(
        matches!(
            status.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
        "{status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "deadline not honoured: {:?}",
        started.elapsed()
    );

    // Cancellation: the client gives up; the server app's handler is dropped.
    let before = app.app.cancelled.load(Ordering::SeqCst);
    let call = echo.slow(pb::Msg {
        text: "never".into(),
        delay_ms: 5000,
        ..Default::default()
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(200), call)
            .await
            .is_err()
    );
    eventually(
        "the server app to see the cancellation",
        Duration::from_secs(5),
        || {
            let n = app.app.cancelled.load(Ordering::SeqCst);
            async move { (n > before).then_some(()) }
        },
    )
    .await;
}
