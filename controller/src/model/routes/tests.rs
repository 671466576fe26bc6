use super::*;
use crate::model::{MeshFile, MeshState, resolve_for};

const SERVICES: &str = r#"
services:
  - name: order-server
    namespace: shop
    port: 80
    endpoints: [{ address: 127.0.0.1, port: 9001, serviceAccount: order, proxyPort: 14143 }]
  - name: order-server-canary
    namespace: shop
    port: 80
    endpoints: [{ address: 127.0.0.1, port: 9002, serviceAccount: order, proxyPort: 14144 }]
  - name: grpc-store
    namespace: shop
    port: 9090
    protocol: grpc
    endpoints: [{ address: 127.0.0.1, port: 9003, serviceAccount: store, proxyPort: 14145 }]
"#;

fn mesh(routes: &str) -> Result<MeshState, Invalid> {
    let f: MeshFile = serde_yaml::from_str(&format!("{SERVICES}{routes}")).unwrap();
    f.validate()
}

fn routes_of(state: &MeshState, name: &str) -> Vec<dpb::Route> {
    let s = state.services.iter().find(|s| s.name == name).unwrap();
    s.proto.routes.clone()
}

#[test]
fn the_seeds_routes_convert() {
    let state = mesh(
        r#"
faultInjections:
  - name: slow-and-failing
    namespace: shop
    delay: { fixedDelay: 500ms, percentage: 10 }
    abort: { httpStatus: 503, percentage: 5 }
routes:
  - name: order-server
    namespace: shop
    parentRefs: [{ name: order-server, port: 80 }]
    rules:
      - name: canary-by-header
        matches:
          - headers: [{ name: x-canary, value: "true" }]
        backendRefs: [{ name: order-server-canary }]
      - matches:
          - path: { type: PathPrefix, value: /orders }
            method: GET
            queryParams: [{ type: RegularExpression, name: id, value: "[0-9]+" }]
        filters:
          - type: RequestMirror
            requestMirror: { backendRef: { name: order-server-canary, port: 80 }, percent: 10 }
          - type: ExtensionRef
            extensionRef: { group: policy.musubi.io, kind: FaultInjection, name: slow-and-failing }
        backendRefs:
          - { name: order-server, port: 80, weight: 90 }
          - { name: order-server-canary, port: 80, weight: 10 }
        timeouts: { request: 10s, backendRequest: 3s }
"#,
    )
    .unwrap();
    let r = routes_of(&state, "order-server");
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].name, "shop/order-server");
    assert_eq!(r[0].rule_name, "canary-by-header");
    assert_eq!(r[0].matches[0].header_matches[0].name, "x-canary");
    assert_eq!(
        r[0].backends[0].authority,
        "order-server-canary.shop.svc.cluster.local:80"
    );
    assert_eq!(r[0].backends[0].weight, 1, "Gateway API's default weight");
    let split = &r[1];
    assert_eq!(split.rule_index, 1);
    let w: Vec<u32> = split.backends.iter().map(|b| b.weight).collect();
    assert_eq!(w, vec![90, 10]);
    assert_eq!(split.timeout.as_ref().map(|d| d.seconds), Some(10));
    assert_eq!(split.backend_timeout.as_ref().map(|d| d.seconds), Some(3));
    assert_eq!(split.matches[0].method, "GET");
    assert_eq!(
        split.matches[0].path.as_ref().map(|p| p.kind),
        Some(dpb::MatchKind::Prefix as i32)
    );
    let Some(dpb::route_filter::Kind::RequestMirror(m)) = &split.filters[0].kind else {
        panic!("{:?}", split.filters)
    };
    assert_eq!(
        m.fraction,
        Some(dpb::Fraction {
            numerator: 10,
            denominator: 100
        })
    );
    let Some(dpb::route_filter::Kind::Fault(f)) = &split.filters[1].kind else {
        panic!()
    };
    assert_eq!(f.delay.as_ref().map(|d| d.nanos), Some(500_000_000));
    assert_eq!(
        f.delay_fraction,
        Some(dpb::Fraction {
            numerator: 100_000,
            denominator: 1_000_000
        })
    );
    assert_eq!(f.abort_http_status, 503);
    assert_eq!(
        f.abort_fraction,
        Some(dpb::Fraction {
            numerator: 50_000,
            denominator: 1_000_000
        })
    );
    assert!(
        routes_of(&state, "order-server-canary").is_empty(),
        "routes attach to their parent only"
    );
}

#[test]
fn consumer_routes_apply_to_their_namespace_only() {
    let state = mesh(
        r#"
routes:
  - name: web-sees-canary
    namespace: frontend
    parentRefs: [{ name: order-server, namespace: shop }]
    rules:
      - backendRefs: [{ name: order-server-canary, namespace: shop }]
"#,
    )
    .unwrap();
    assert!(
        routes_of(&state, "order-server").is_empty(),
        "not a producer route"
    );
    let target = "order-server.shop:80";
    let from_frontend = resolve_for(&state, target, "frontend", "frontend");
    let routes = from_frontend.service.unwrap().routes;
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].name, "frontend/web-sees-canary");
    let from_elsewhere = resolve_for(&state, target, "frontend", "ops");
    assert!(
        from_elsewhere.service.unwrap().routes.is_empty(),
        "the claimed context namespace does not count"
    );
}

#[test]
fn grpc_routes_convert() {
    let state = mesh(
        r#"
faultInjections:
  - { name: unavailable, namespace: shop, abort: { grpcStatus: UNAVAILABLE, percentage: 1.5 } }
routes:
  - name: store
    namespace: shop
    kind: GRPCRoute
    parentRefs: [{ name: grpc-store }]
    rules:
      - matches:
          - method: { service: musubi.test.Store, method: Get }
            headers: [{ name: x-tenant, type: RegularExpression, value: "a|b" }]
        filters:
          - { type: ExtensionRef, extensionRef: { group: policy.musubi.io, kind: FaultInjection, name: unavailable } }
        backendRefs: [{ name: grpc-store }]
"#,
    )
    .unwrap();
    let r = &routes_of(&state, "grpc-store")[0];
    assert_eq!(r.kind, dpb::RouteKind::Grpc as i32);
    let g = r.matches[0].grpc.as_ref().unwrap();
    assert_eq!(
        (g.service.as_str(), g.method.as_str()),
        ("musubi.test.Store", "Get")
    );
    assert_eq!(
        r.backends[0].authority, "grpc-store.shop.svc.cluster.local:9090",
        "the parent's port"
    );
    let Some(dpb::route_filter::Kind::Fault(f)) = &r.filters[0].kind else {
        panic!()
    };
    assert_eq!(f.abort_grpc_status, 14);
    assert_eq!(
        f.abort_fraction,
        Some(dpb::Fraction {
            numerator: 15_000,
            denominator: 1_000_000
        })
    );
}

#[test]
fn bad_routes_are_refused_with_where_and_why() {
    let rule = |body: &str| {
        format!(
            "routes:\n  - name: r\n    namespace: shop\n    parentRefs: [{{ name: order-server }}]\n    rules:\n{body}"
        )
    };
    let backend = "        backendRefs: [{ name: order-server }]\n";
    for (routes, path, says) in [
        (
            "routes:\n  - { name: r, namespace: shop, parentRefs: [{ name: nowhere }] }\n".to_string(),
            "routes[0].parentRefs[0]",
            "no service nowhere.shop",
        ),
        (
            rule("      - backendRefs: [{ name: missing }]\n"),
            "routes[0].rules[0].backendRefs[0]",
            "BackendNotFound",
        ),
        (
            rule(&format!("      - matches: [{{ path: {{ type: RegularExpression, value: \"/v[0-9\" }} }}]\n{backend}")),
            "routes[0].rules[0].matches[0].path.value",
            "does not parse",
        ),
        (
            rule("      - backendRefs: [{ name: order-server, weight: 0 }, { name: order-server-canary, weight: 0 }]\n"),
            "routes[0].rules[0].backendRefs",
            "every weight is 0",
        ),
        (
            rule("      - backendRefs: [{ name: order-server, weight: 1000001 }]\n"),
            "routes[0].rules[0].backendRefs[0].weight",
            "over 1000000",
        ),
        (
            rule(&format!("      - filters: [{{ type: CORS }}]\n{backend}")),
            "routes[0].rules[0].filters[0].type",
            "not supported",
        ),
        (
            rule(&format!("      - timeouts: {{ request: 1s, backendRequest: 2s }}\n{backend}")),
            "routes[0].rules[0].timeouts",
            "must not be longer",
        ),
        (
            rule(&format!("      - timeouts: {{ request: 10 }}\n{backend}")),
            "routes[0].rules[0].timeouts.request",
            "not a Gateway API duration",
        ),
        (
            rule(&format!("      - filters: [{{ type: ExtensionRef, extensionRef: {{ group: policy.musubi.io, kind: FaultInjection, name: nope }} }}]\n{backend}")),
            "routes[0].rules[0].filters[0].extensionRef",
            "no FaultInjection nope in namespace shop",
        ),
        (
            rule(&format!("      - filters: [{{ type: RequestRedirect, requestRedirect: {{ statusCode: 305 }} }}]\n{backend}")),
            "routes[0].rules[0].filters[0].requestRedirect.statusCode",
            "305 is not",
        ),
        (
            rule(&format!("      - matches: [{{ path: {{ type: Exact, value: /a }} }}]\n        filters: [{{ type: URLRewrite, urlRewrite: {{ path: {{ type: ReplacePrefixMatch, replacePrefixMatch: /b }} }} }}]\n{backend}")),
            "routes[0].rules[0].filters",
            "ReplacePrefixMatch needs",
        ),
        (
            rule(&format!("      - filters: [{{ type: RequestMirror, requestMirror: {{ backendRef: {{ name: order-server-canary }}, percent: 101 }} }}]\n{backend}")),
            "routes[0].rules[0].filters[0].requestMirror",
            "percent (0-100)",
        ),
        (
            rule("      - matches: [{ method: FETCH }]\n        backendRefs: [{ name: order-server }]\n"),
            "routes[0].rules[0].matches[0].method",
            "not an HTTP method",
        ),
        (
            rule("      - {}\n"),
            "routes[0].rules[0].backendRefs",
            "sends nowhere",
        ),
        (
            "faultInjections: [{ name: f, namespace: shop, delay: { fixedDelay: 0ms, percentage: 10 } }]\n".to_string(),
            "faultInjections[0].delay.fixedDelay",
            "at least 1ms",
        ),
        (
            "faultInjections: [{ name: f, namespace: shop, abort: { httpStatus: 503, percentage: 120 } }]\n".to_string(),
            "faultInjections[0].abort.percentage",
            "not 0-100",
        ),
    ] {
        let err = mesh(&routes).expect_err(&routes);
        assert_eq!(err.path, path, "{routes}\n{err}");
        assert!(err.problem.contains(says), "{routes}\n{err}");
    }
}

#[test]
fn durations_are_gep_2257() {
    for (text, want) in [
        ("10s", Some(Duration::from_secs(10))),
        ("500ms", Some(Duration::from_millis(500))),
        ("1h2m3s4ms", Some(Duration::from_millis(3_723_004))),
        ("0s", Some(Duration::ZERO)),
        ("99999s", Some(Duration::from_secs(99_999))),
        ("100000s", None),
        ("1h1h1h1h1h", None),
        ("10", None),
        ("1.5s", None),
        ("s", None),
        ("", None),
        ("-1s", None),
        ("1d", None),
    ] {
        assert_eq!(duration(text, "t").ok(), want, "{text:?}");
    }
}

#[test]
fn route_policies_give_timeouts_to_rules_without_their_own() {
    let state = mesh(
        r#"
routePolicies:
  - name: whole-route
    namespace: shop
    targetRefs: [{ group: gateway.networking.k8s.io, kind: GRPCRoute, name: store }]
    timeouts: { request: 5s }
  - name: one-rule
    namespace: shop
    targetRefs: [{ group: gateway.networking.k8s.io, kind: GRPCRoute, name: store, sectionName: slow }]
    timeouts: { request: 30s, backendRequest: 10s }
routes:
  - name: store
    namespace: shop
    kind: GRPCRoute
    parentRefs: [{ name: grpc-store }]
    rules:
      - name: slow
        matches: [{ method: { service: musubi.test.Store, method: Scan } }]
        backendRefs: [{ name: grpc-store }]
      - backendRefs: [{ name: grpc-store }]
"#,
    )
    .unwrap();
    let r = routes_of(&state, "grpc-store");
    let secs = |d: &Option<prost_types::Duration>| d.as_ref().map(|d| d.seconds);
    assert_eq!(
        (secs(&r[0].timeout), secs(&r[0].backend_timeout)),
        (Some(30), Some(10)),
        "the rule's own policy wins"
    );
    assert_eq!(
        (secs(&r[1].timeout), secs(&r[1].backend_timeout)),
        (Some(5), None),
        "the route's policy"
    );

    for (policy, path, says) in [
        (
            "routePolicies: [{ name: p, namespace: shop, targetRefs: [{ group: '', kind: Service, name: x }] }]\n",
            "routePolicies[0].targetRefs[0]",
            "is not a route",
        ),
        (
            "routePolicies: [{ name: p, namespace: shop, targetRefs: [{ group: gateway.networking.k8s.io, kind: GRPCRoute, name: x }], timeouts: { request: 1s, backendRequest: 2s } }]\n",
            "routePolicies[0].timeouts",
            "must not be longer",
        ),
    ] {
        let err = mesh(policy).unwrap_err();
        assert_eq!(err.path, path, "{err}");
        assert!(err.problem.contains(says), "{err}");
    }
}
