//! Routing end to end: the seed's routes (examples/routing/) served by a real controller from
//! a mesh file, followed by a real client proxy, 10,000 requests each, distributions judged
//! against the sample size.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

use http::StatusCode;
use musubi_tests::metric_value;
use musubi_tests::routing::{NS, Shop, assert_share, get, load};
use std::time::Duration;

const CANARY: &str = include_str!("../../examples/routing/canary.yaml");
const HEADER: &str = include_str!("../../examples/routing/header.yaml");
const MIRROR: &str = include_str!("../../examples/routing/mirror.yaml");
const DELAY: &str = include_str!("../../examples/routing/delay.yaml");
const ABORT: &str = include_str!("../../examples/routing/abort.yaml");
const TIMEOUT: &str = include_str!("../../examples/routing/timeout.yaml");

const N: usize = 10_000;

fn uri(path: &str) -> String {
    format!("http://order-server.{NS}{path}")
}

#[tokio::test]
async fn canary_sends_ten_percent_to_the_canary() {
    let shop = Shop::start(CANARY).await;
    let answers = load(shop.outbound(), N, 16, &uri("/orders"), &[]).await;
    assert!(
        answers.iter().all(|a| a.status == StatusCode::OK),
        "every request is answered"
    );
    let canary = answers.iter().filter(|a| a.from_app("v2")).count();
    let stable = answers.iter().filter(|a| a.from_app("v1")).count();
    assert_eq!(canary + stable, N);
    assert_share("canary share", canary, N, 0.10);

    let metrics = shop.web.metrics().await;
    let series = |backend: &str| {
        metric_value(
            &metrics,
            "musubi_proxy_route_requests_total",
            &format!("route=\"{NS}/order-server\",backend=\"{backend}.{NS}.svc.cluster.local:80\""),
        )
        .unwrap_or(0.0) as usize
    };
    assert_eq!(
        series("order-server-canary"),
        canary,
        "per-route series count what happened"
    );
    assert_eq!(series("order-server"), stable);
}

#[tokio::test]
async fn a_header_picks_the_canary_and_unmatched_requests_get_404() {
    let shop = Shop::start(HEADER).await;
    let with = load(
        shop.outbound(),
        N / 2,
        8,
        &uri("/"),
        &[("x-canary", "true")],
    )
    .await;
    let without = load(
        shop.outbound(),
        N / 2,
        8,
        &uri("/"),
        &[("x-canary", "false")],
    )
    .await;
    assert!(
        with.iter().all(|a| a.from_app("v2")),
        "x-canary: true goes to the canary"
    );
    assert!(
        without.iter().all(|a| a.from_app("v1")),
        "anything else to stable"
    );

    // Only /orders is routed now: the rest has no rule and answers 404.
    let only_orders = HEADER.replace(
        "      - backendRefs: [{ name: order-server, port: 80 }]",
        "      - matches: [{ path: { type: Exact, value: /orders } }]\n        backendRefs: [{ name: order-server, port: 80 }]",
    );
    shop.reload(&only_orders, "/other", |a| {
        a.status == StatusCode::NOT_FOUND
    })
    .await;
    let a = get(shop.outbound(), &uri("/other"), &[]).await;
    assert!(a.body.contains("no route of order-server"), "{}", a.body);
    assert!(
        get(shop.outbound(), &uri("/orders"), &[])
            .await
            .from_app("v1")
    );
}

#[tokio::test]
async fn ten_percent_is_mirrored_to_the_canary_with_the_callers_identity_and_host() {
    let shop = Shop::start(MIRROR).await;
    let answers = load(shop.outbound(), N, 16, &uri("/orders"), &[]).await;
    assert!(
        answers
            .iter()
            .all(|a| a.status == StatusCode::OK && a.from_app("v1")),
        "the primary answers every request"
    );
    // Mirrors are fire and forget: wait until each one sent has arrived.
    let sent =
        musubi_tests::eventually("the mirrors to arrive", Duration::from_secs(10), || async {
            let m = shop.web.metrics().await;
            let kind = |k: &str| {
                metric_value(
                    &m,
                    "musubi_proxy_route_mirrors_total",
                    &format!("kind=\"{k}\""),
                )
                .unwrap_or(0.0) as u64
            };
            let sent = kind("sent");
            (kind("cut") == 0 && kind("unavailable") == 0 && sent > 0 && sent == shop.v2.hits())
                .then_some(sent)
        })
        .await;
    assert_share("mirrored share", sent as usize, N, 0.10);
    let mirrored = shop.v2.last();
    let primary = shop.v1.last();
    let web = format!("client-id=spiffe://cluster.local/ns/{NS}/sa/web");
    assert!(mirrored.contains(&web), "the caller's identity: {mirrored}");
    let host = |line: &str| {
        line.split(' ')
            .find(|w| w.starts_with("host="))
            .map(str::to_string)
    };
    assert_eq!(
        host(&mirrored),
        host(&primary),
        "the Host is not mangled: {mirrored}"
    );
}

#[tokio::test]
async fn a_delay_slows_ten_percent_by_500ms() {
    let shop = Shop::start(DELAY).await;
    let answers = load(shop.outbound(), N, 64, &uri("/orders"), &[]).await;
    assert!(answers.iter().all(|a| a.status == StatusCode::OK));
    let delayed = answers
        .iter()
        .filter(|a| a.took >= Duration::from_millis(500))
        .count();
    assert_share("delayed share", delayed, N, 0.10);
    let m = shop.web.metrics().await;
    let injected =
        metric_value(&m, "musubi_proxy_route_faults_total", "kind=\"delay\"").unwrap_or(0.0);
    assert_eq!(
        injected as usize, delayed,
        "each delay is counted, and only those took 500 ms"
    );
}

#[tokio::test]
async fn an_abort_answers_503_to_five_percent_without_reaching_the_app() {
    let shop = Shop::start(ABORT).await;
    let answers = load(shop.outbound(), N, 16, &uri("/orders"), &[]).await;
    let aborted: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert_share("aborted share", aborted.len(), N, 0.05);
    assert!(
        aborted
            .iter()
            .all(|a| a.app.is_none() && a.headers.contains_key("musubi-proxy-error"))
    );
    assert_eq!(
        shop.v1.hits() as usize,
        N - aborted.len(),
        "aborted requests never reach the app"
    );
    let m = shop.web.metrics().await;
    let counted =
        metric_value(&m, "musubi_proxy_route_faults_total", "kind=\"abort\"").unwrap_or(0.0);
    assert_eq!(counted as usize, aborted.len());
    let responses = metric_value(
        &m,
        "musubi_proxy_route_responses_total",
        "status_code=\"503\",classification=\"failure\",error=\"fault\"",
    );
    assert_eq!(responses.unwrap_or(0.0) as usize, aborted.len());
}

#[tokio::test]
async fn timeouts_answer_504_saying_which_fired() {
    let shop = Shop::start(TIMEOUT).await;
    let fast = load(shop.outbound(), N, 16, &uri("/orders"), &[]).await;
    assert!(
        fast.iter().all(|a| a.status == StatusCode::OK),
        "10 s is plenty"
    );

    let short = TIMEOUT.replace("request: 10s", "request: 300ms");
    shop.reload(&short, "/sleep/1000", |a| {
        a.status == StatusCode::GATEWAY_TIMEOUT
    })
    .await;
    let a = get(shop.outbound(), &uri("/sleep/1000"), &[]).await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        a.body.contains("timeouts.request (300ms) fired"),
        "{}",
        a.body
    );
    assert!(
        a.took >= Duration::from_millis(300) && a.took < Duration::from_millis(1000),
        "{:?}",
        a.took
    );
    assert_eq!(
        get(shop.outbound(), &uri("/sleep/10"), &[]).await.status,
        StatusCode::OK
    );

    let backend = TIMEOUT.replace("request: 10s", "request: 5s, backendRequest: 200ms");
    shop.reload(&backend, "/sleep/1000", |a| {
        a.body.contains("backendRequest")
    })
    .await;
    let a = get(shop.outbound(), &uri("/sleep/1000"), &[]).await;
    assert!(
        a.body.contains("timeouts.backendRequest (200ms) fired"),
        "{}",
        a.body
    );
    let m = shop.web.metrics().await;
    assert!(
        metric_value(
            &m,
            "musubi_proxy_route_timeouts_total",
            "kind=\"backend_request\""
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        metric_value(&m, "musubi_proxy_route_timeouts_total", "kind=\"request\"").unwrap_or(0.0)
            >= 1.0
    );
}

#[tokio::test]
async fn filters_modify_headers_rewrite_paths_and_redirect() {
    let routes = r#"
routes:
  - name: order-server
    namespace: k1s0-service
    parentRefs: [{ name: order-server }]
    rules:
      - matches: [{ path: { type: PathPrefix, value: /v1 } }]
        filters:
          - type: RequestHeaderModifier
            requestHeaderModifier: { set: [{ name: x-route, value: v1-api }], remove: [x-drop] }
          - type: ResponseHeaderModifier
            responseHeaderModifier: { add: [{ name: x-served-by, value: musubi }] }
          - type: URLRewrite
            urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /api } }
        backendRefs: [{ name: order-server }]
      - matches: [{ path: { type: Exact, value: /old } }]
        filters:
          - type: RequestRedirect
            requestRedirect: { path: { type: ReplaceFullPath, replaceFullPath: /new }, statusCode: 308 }
"#;
    let shop = Shop::start(routes).await;
    let a = get(shop.outbound(), &uri("/v1/orders?id=7"), &[("x-drop", "1")]).await;
    assert!(
        a.body.contains("path=/api/orders") && a.body.contains("x-route=v1-api"),
        "{}",
        a.body
    );
    assert!(!a.body.contains("x-drop"), "{}", a.body);
    assert_eq!(a.headers["x-served-by"], "musubi");
    let r = get(shop.outbound(), &uri("/old?x=1"), &[]).await;
    assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        r.headers["location"],
        format!("http://order-server.{NS}/new?x=1")
    );
    assert_eq!(shop.v1.hits(), 1, "a redirect never reaches the app");
}

#[tokio::test]
async fn a_bad_route_is_refused_with_its_line_and_the_last_good_routes_keep_routing() {
    let shop = Shop::start(HEADER).await;
    let bad = HEADER.replace(
        "value: \"true\"",
        "type: RegularExpression, value: \"tr[ue\"",
    );
    let err = shop
        .controller
        .edit(&shop.yaml(&bad))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("does not parse") && err.contains("line "),
        "{err}"
    );
    let missing = HEADER.replace("order-server-canary", "order-server-nowhere");
    let err = shop
        .controller
        .edit(&shop.yaml(&missing))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("BackendNotFound"), "{err}");
    let a = get(shop.outbound(), &uri("/"), &[("x-canary", "true")]).await;
    assert!(a.from_app("v2"), "the last good routes: {}", a.body);
}
