use super::*;
use serde_json::json;

fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
    Arc::new(serde_json::from_value(v).unwrap())
}

fn pod(ns: &str, name: &str, sa: &str, meshed: bool) -> Arc<Pod> {
    let init = if meshed {
        json!([{ "name": "musubi-proxy", "image": "p" }])
    } else {
        json!([])
    };
    obj(json!({
        "metadata": { "namespace": ns, "name": name },
        "spec": { "serviceAccountName": sa, "initContainers": init, "containers": [{ "name": "app", "image": "a" }] },
    }))
}

fn base() -> Snapshot {
    Snapshot {
        trust_domain: "cluster.local".into(),
        cluster_domain: "cluster.local".into(),
        mtls: Mtls::Strict,
        services: vec![obj(json!({
            "metadata": { "namespace": "shop", "name": "api" },
            "spec": { "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "ports": [
                { "name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http" },
                { "name": "grpc", "port": 9090, "appProtocol": "kubernetes.io/h2c" },
            ] },
        }))],
        slices: vec![obj(json!({
            "metadata": { "namespace": "shop", "name": "api-abc", "labels": { "kubernetes.io/service-name": "api" } },
            "addressType": "IPv4",
            "ports": [{ "name": "http", "port": 8080 }, { "name": "grpc", "port": 9090 }],
            "endpoints": [
                { "addresses": ["10.0.0.1"], "conditions": { "ready": true }, "targetRef": { "kind": "Pod", "namespace": "shop", "name": "api-1" } },
                { "addresses": ["10.0.0.2"], "conditions": { "ready": false }, "targetRef": { "kind": "Pod", "namespace": "shop", "name": "api-2" } },
                { "addresses": ["10.0.0.3"], "targetRef": { "kind": "Pod", "namespace": "shop", "name": "legacy" } },
            ],
        }))],
        pods: vec![
            pod("shop", "api-1", "api", true),
            pod("shop", "api-2", "api", true),
            pod("shop", "legacy", "old", false),
        ],
        ..Default::default()
    }
}

#[test]
fn services_endpoints_and_identities() {
    let (state, problems) = build(&base());
    assert!(problems.is_empty(), "{problems:?}");
    let ports: Vec<(u16, i32)> = state
        .services
        .iter()
        .map(|s| (s.port, s.proto.protocol))
        .collect();
    assert_eq!(
        ports,
        [
            (80, dpb::Protocol::Http1 as i32),
            (9090, dpb::Protocol::Http2 as i32)
        ]
    );
    let http = &state.services[0];
    assert_eq!(http.addresses, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(http.proto.authority, "api.shop.svc.cluster.local:80");
    let eps: Vec<(&str, u32, &str, bool)> = http
        .proto
        .endpoints
        .iter()
        .map(|e| (e.address.as_str(), e.port, e.identity.as_str(), e.ready))
        .collect();
    assert_eq!(
        eps,
        [
            (
                "10.0.0.1",
                8080,
                "spiffe://cluster.local/ns/shop/sa/api",
                true
            ),
            (
                "10.0.0.2",
                8080,
                "spiffe://cluster.local/ns/shop/sa/api",
                false
            ),
            // Not meshed: no identity, so clients do not expect mTLS from it.
            ("10.0.0.3", 8080, "", true),
        ]
    );
    let resolved = model::resolve(&state, "api.shop.svc.cluster.local:80", "web");
    assert!(!resolved.unknown);
    let by_ip = model::resolve(&state, "10.96.0.10:9090", "web");
    assert_eq!(by_ip.service.unwrap().port, 9090);
}

#[test]
fn a_removed_endpoint_disappears_and_unknown_ports_resolve_to_nothing() {
    let mut s = base();
    s.slices = vec![obj(json!({
        "metadata": { "namespace": "shop", "name": "api-abc", "labels": { "kubernetes.io/service-name": "api" } },
        "addressType": "IPv4",
        "ports": [{ "name": "http", "port": 8080 }],
        "endpoints": [{ "addresses": ["10.0.0.1"], "targetRef": { "kind": "Pod", "namespace": "shop", "name": "api-1" } }],
    }))];
    let (state, _) = build(&s);
    assert_eq!(state.services[0].proto.endpoints.len(), 1);
    assert!(
        state.services[1].proto.endpoints.is_empty(),
        "no slice port named grpc"
    );
    assert!(model::resolve(&state, "api.shop.svc.cluster.local:81", "shop").unknown);
}

fn ns(name: &str, mode: Option<&str>) -> Arc<Namespace> {
    let ann = mode
        .map(|m| json!({ "musubi.io/mtls-mode": m }))
        .unwrap_or(json!({}));
    obj(json!({ "metadata": { "name": name, "annotations": ann } }))
}

fn named<T: serde::de::DeserializeOwned>(
    ns: &str,
    name: &str,
    spec: serde_json::Value,
) -> Named<T> {
    Named {
        namespace: ns.into(),
        name: name.into(),
        spec: serde_json::from_value(spec).unwrap(),
    }
}

fn mode_of(state: &MeshState, id: &str, port: u32) -> i32 {
    let p = model::policy_for(state, &SpiffeId::parse(id).unwrap());
    p.ports
        .iter()
        .find(|pp| pp.port == port)
        .map(|pp| pp.mtls)
        .unwrap_or(p.default_policy.unwrap().mtls)
}

#[test]
fn mtls_modes_most_specific_wins() {
    let strict = ppb::MtlsMode::Strict as i32;
    let permissive = ppb::MtlsMode::Permissive as i32;
    let mut s = base();
    s.namespaces = vec![
        ns("shop", Some("permissive")),
        ns("bank", None),
        ns("odd", Some("sometimes")),
    ];
    s.mesh_tls = vec![
        named(
            "bank",
            "vault",
            json!({ "mode": "PERMISSIVE", "serviceAccount": "vault" }),
        ),
        named(
            "bank",
            "vault-admin",
            json!({ "mode": "STRICT", "serviceAccount": "vault", "ports": [9000] }),
        ),
        named(
            "bank",
            "stray",
            json!({ "mode": "PERMISSIVE", "ports": [1] }),
        ),
    ];
    let (state, problems) = build(&s);
    let cases = [
        (
            "spiffe://cluster.local/ns/shop/sa/web",
            80,
            permissive,
            "namespace annotation",
        ),
        (
            "spiffe://cluster.local/ns/bank/sa/teller",
            80,
            strict,
            "mesh default",
        ),
        (
            "spiffe://cluster.local/ns/bank/sa/vault",
            80,
            permissive,
            "service account MeshTLS",
        ),
        (
            "spiffe://cluster.local/ns/bank/sa/vault",
            9000,
            strict,
            "port MeshTLS",
        ),
        (
            "spiffe://cluster.local/ns/odd/sa/x",
            80,
            strict,
            "bad annotation ignored",
        ),
    ];
    for (id, port, want, why) in cases {
        assert_eq!(mode_of(&state, id, port), want, "{why}");
    }
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems
            .iter()
            .any(|p| p.contains("odd") && p.contains("sometimes"))
    );
    assert!(problems.iter().any(|p| p.contains("bank/stray")));

    // A namespace-wide MeshTLS overrides the annotation.
    s.mesh_tls = vec![named("shop", "all", json!({ "mode": "STRICT" }))];
    let (state, _) = build(&s);
    assert_eq!(
        mode_of(&state, "spiffe://cluster.local/ns/shop/sa/web", 80),
        strict
    );
}

#[test]
fn authorization_policies_add_up_per_port_and_bad_ones_are_skipped() {
    use ppb::authorization_rule::Client;
    let mut s = base();
    s.authorization = vec![
        named(
            "shop",
            "web-to-api",
            json!({ "serviceAccount": "api", "ports": [8080], "allow": [{ "identity": "spiffe://cluster.local/ns/shop/sa/web" }] }),
        ),
        named(
            "shop",
            "ops",
            json!({ "serviceAccount": "api", "ports": [8080, 9090], "allow": [{ "namespace": "ops" }] }),
        ),
        named(
            "shop",
            "broken",
            json!({ "serviceAccount": "api", "ports": [7000], "allow": [{ "identity": "not-spiffe" }] }),
        ),
    ];
    let (state, problems) = build(&s);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("shop/broken"), "{problems:?}");
    let ports = &state.workloads[&("shop".to_string(), "api".to_string())];
    let summary: Vec<(u32, Vec<Client>)> = ports
        .iter()
        .map(|p| {
            (
                p.port,
                p.authorization
                    .clone()
                    .unwrap()
                    .rules
                    .into_iter()
                    .map(|r| r.client.unwrap())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                8080,
                vec![
                    Client::Identity("spiffe://cluster.local/ns/shop/sa/web".into()),
                    Client::Namespace("ops".into())
                ]
            ),
            (9090, vec![Client::Namespace("ops".into())]),
        ]
    );
    assert!(ports.iter().all(|p| p.mtls == ppb::MtlsMode::Strict as i32));
}
