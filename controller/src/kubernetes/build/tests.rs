use super::*;
use crate::kubernetes::crd::Refusal;
use crate::model;
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
        mesh_tls: Some(vec![]),
        authorization: Some(vec![]),
        ..Default::default()
    }
}

fn annotate(p: &Arc<Pod>, key: &str, value: &str) -> Arc<Pod> {
    let mut p = (**p).clone();
    p.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(key.into(), value.into());
    Arc::new(p)
}

#[test]
fn services_endpoints_and_identities() {
    let Built {
        state, problems, ..
    } = build(&base());
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
    let state = build(&s).state;
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

fn named(ns: &str, name: &str, spec: serde_json::Value) -> Object {
    Object {
        namespace: ns.into(),
        name: name.into(),
        generation: Some(1),
        created: None,
        spec,
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
    s.mesh_tls = Some(vec![
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
    ]);
    let Built {
        state, problems, ..
    } = build(&s);
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
    s.mesh_tls = Some(vec![named("shop", "all", json!({ "mode": "STRICT" }))]);
    let state = build(&s).state;
    assert_eq!(
        mode_of(&state, "spiffe://cluster.local/ns/shop/sa/web", 80),
        strict
    );
}

fn rules_on(
    state: &MeshState,
    ns: &str,
    sa: &str,
    port: u32,
) -> Option<Vec<ppb::authorization_rule::Client>> {
    state
        .workloads
        .get(&(ns.to_string(), sa.to_string()))?
        .iter()
        .find(|p| p.port == port)?
        .authorization
        .clone()
        .map(|a| a.rules.into_iter().map(|r| r.client.unwrap()).collect())
}

#[test]
fn authorization_policies_add_up_per_port_and_a_bad_rule_narrows() {
    use ppb::authorization_rule::Client;
    let web = || Client::Identity("spiffe://cluster.local/ns/shop/sa/web".into());
    let ops = || Client::Namespace("ops".into());
    let mut s = base();
    s.authorization = Some(vec![
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
        // One bad rule among good ones: only it is dropped.
        named(
            "shop",
            "partly-broken",
            json!({ "serviceAccount": "api", "ports": [7000], "allow": [
                { "identity": "spiffe://cluster.local/ns/shop/sa/web" },
                { "identity": "not-spiffe" },
                { "identity": "spiffe://cluster.local/ns/../sa/x" },
                { "namespace": "ops", "any": true },
            ] }),
        ),
        // Every rule bad: the policy still applies, allowing nobody.
        named(
            "shop",
            "all-broken",
            json!({ "serviceAccount": "api", "ports": [7001], "allow": [{ "identity": "nope" }, { "principal": "x" }] }),
        ),
        // A spec that does not decode but names its workload and ports: allows nobody there.
        named(
            "shop",
            "odd-spec",
            json!({ "serviceAccount": "api", "ports": [7002], "allow": [], "deny": [{ "any": true }] }),
        ),
        // Names nothing it could apply to: ignored (and said so).
        named("shop", "unreadable", json!({ "ports": "many" })),
    ]);
    let Built {
        state,
        problems,
        verdicts,
        ..
    } = build(&s);
    // (port, rules: None = no policy, any authenticated client)
    let cases: [(u32, Option<Vec<Client>>); 6] = [
        (8080, Some(vec![web(), ops()])),
        (9090, Some(vec![ops()])),
        (7000, Some(vec![web()])),
        (7001, Some(vec![])),
        (7002, Some(vec![])),
        (7003, None),
    ];
    for (port, want) in cases {
        assert_eq!(rules_on(&state, "shop", "api", port), want, "port {port}");
    }
    let ports = &state.workloads[&("shop".to_string(), "api".to_string())];
    assert!(ports.iter().all(|p| p.mtls == ppb::MtlsMode::Strict as i32));

    let verdict = |name: &str| {
        verdicts
            .iter()
            .find(|v| v.name == name)
            .unwrap()
            .refused
            .clone()
    };
    assert_eq!(verdict("web-to-api"), None);
    assert_eq!(verdict("ops"), None);
    let (why, msg) = verdict("partly-broken").unwrap();
    assert_eq!(why, Refusal::InvalidRules);
    assert!(
        msg.contains("allow[1].identity")
            && msg.contains("allow[2].identity")
            && msg.contains("allow[3]"),
        "{msg}"
    );
    assert!(
        !msg.contains("allow[0]") && msg.contains("the others apply"),
        "{msg}"
    );
    let (why, msg) = verdict("all-broken").unwrap();
    assert_eq!(why, Refusal::InvalidRules);
    assert!(
        msg.contains("allow[1]")
            && msg.contains("principal")
            && msg.contains("allows nobody on ports 7001"),
        "{msg}"
    );
    let (why, msg) = verdict("odd-spec").unwrap();
    assert_eq!(why, Refusal::InvalidSpec);
    assert!(
        msg.contains("deny") && msg.contains("allows nobody on ports 7002"),
        "{msg}"
    );
    let (why, msg) = verdict("unreadable").unwrap();
    assert_eq!(why, Refusal::InvalidSpec);
    assert!(msg.contains("ignored"), "{msg}");
    assert_eq!(verdicts.len(), 6);
    assert_eq!(
        verdicts
            .iter()
            .find(|v| v.name == "ops")
            .unwrap()
            .generation,
        Some(1)
    );
    for name in ["partly-broken", "all-broken", "odd-spec", "unreadable"] {
        assert!(
            problems.iter().any(|p| p.contains(&format!("shop/{name}"))),
            "{name}: {problems:?}"
        );
    }
}

#[test]
fn an_unreadable_meshtls_is_strict_and_same_scope_objects_resolve_to_strict() {
    let mut s = base();
    s.namespaces = vec![ns("shop", Some("PERMISSIVE"))];
    s.mesh_tls = Some(vec![
        // The mode does not decode: STRICT for the scope it names.
        named(
            "shop",
            "weird",
            json!({ "mode": "SOMETIMES", "serviceAccount": "api" }),
        ),
        // Two objects for one port: STRICT wins, whatever their order.
        named(
            "shop",
            "a",
            json!({ "mode": "PERMISSIVE", "serviceAccount": "old", "ports": [8080] }),
        ),
        named(
            "shop",
            "b",
            json!({ "mode": "STRICT", "serviceAccount": "old", "ports": [8080] }),
        ),
        named(
            "shop",
            "c",
            json!({ "mode": "PERMISSIVE", "serviceAccount": "old", "ports": [8080] }),
        ),
    ]);
    let Built {
        state, verdicts, ..
    } = build(&s);
    let strict = ppb::MtlsMode::Strict as i32;
    let permissive = ppb::MtlsMode::Permissive as i32;
    assert_eq!(
        mode_of(&state, "spiffe://cluster.local/ns/shop/sa/api", 8080),
        strict
    );
    assert_eq!(
        mode_of(&state, "spiffe://cluster.local/ns/shop/sa/old", 8080),
        strict
    );
    assert_eq!(
        mode_of(&state, "spiffe://cluster.local/ns/shop/sa/old", 9999),
        permissive
    );
    let weird = verdicts.iter().find(|v| v.name == "weird").unwrap();
    let (why, msg) = weird.refused.clone().unwrap();
    assert_eq!(why, Refusal::InvalidSpec);
    assert!(msg.contains("applied as STRICT"), "{msg}");
    assert!(
        verdicts
            .iter()
            .filter(|v| v.name != "weird")
            .all(|v| v.refused.is_none())
    );
}

fn declared(state: &MeshState, ns: &str, sa: &str) -> Vec<(u32, ppb::PortProtocol)> {
    state
        .workloads
        .get(&(ns.to_string(), sa.to_string()))
        .map(|ports| {
            ports
                .iter()
                .map(|p| (p.port, ppb::PortProtocol::try_from(p.protocol).unwrap()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_port_a_service_targets_is_declared_with_its_protocol() {
    use ppb::PortProtocol::{Detect, Http1, Http2, Opaque};
    fn second_service() -> Arc<KService> {
        obj(json!({
            "metadata": { "namespace": "shop", "name": "api-raw" },
            "spec": { "ports": [{ "name": "raw", "port": 9090, "appProtocol": "tcp" }] },
        }))
    }
    fn second_slice() -> Arc<EndpointSlice> {
        obj(json!({
            "metadata": { "namespace": "shop", "name": "api-raw-1", "labels": { "kubernetes.io/service-name": "api-raw" } },
            "addressType": "IPv4",
            "ports": [{ "name": "raw", "port": 9090 }],
            "endpoints": [{ "addresses": ["10.0.0.1"], "targetRef": { "kind": "Pod", "namespace": "shop", "name": "api-1" } }],
        }))
    }
    // (what changes, declared ports of shop/api, a conflict reported)
    type Tweak = fn(&mut Snapshot);
    let cases: Vec<(&str, Tweak, Vec<(u32, ppb::PortProtocol)>, bool)> = vec![
        (
            "as the Service says",
            |_| {},
            vec![(8080, Http1), (9090, Http2)],
            false,
        ),
        (
            "every pod says 9090 is opaque",
            |s| {
                s.pods[0] = annotate(&s.pods[0], "musubi.io/opaque-ports", "9000-9100");
                s.pods[1] = annotate(&s.pods[1], "musubi.io/opaque-ports", "9090");
            },
            vec![(8080, Http1), (9090, Opaque)],
            false,
        ),
        (
            "one pod says opaque, the other not: not opaque",
            |s| s.pods[0] = annotate(&s.pods[0], "musubi.io/opaque-ports", "9090"),
            vec![(8080, Http1), (9090, Http2)],
            true,
        ),
        (
            "a bad annotation is read as no opaque port",
            |s| {
                s.pods[0] = annotate(&s.pods[0], "musubi.io/opaque-ports", "9090,nope");
                s.pods[1] = annotate(&s.pods[1], "musubi.io/opaque-ports", "9090");
            },
            vec![(8080, Http1), (9090, Http2)],
            true,
        ),
        (
            "a second Service says tcp for 9090: the HTTP one wins",
            |s| {
                s.services.push(second_service());
                s.slices.push(second_slice());
            },
            vec![(8080, Http1), (9090, Http2)],
            true,
        ),
        (
            "ports only policies name: DETECT, or OPAQUE where every pod says so",
            |s| {
                s.pods[0] = annotate(&s.pods[0], "musubi.io/opaque-ports", "7001");
                s.pods[1] = annotate(&s.pods[1], "musubi.io/opaque-ports", "7001");
                s.mesh_tls = Some(vec![named(
                    "shop",
                    "p",
                    json!({ "mode": "STRICT", "serviceAccount": "api", "ports": [7000, 7001] }),
                )]);
                s.authorization = Some(vec![named(
                    "shop",
                    "a",
                    json!({ "serviceAccount": "api", "ports": [7002], "allow": [] }),
                )]);
            },
            vec![
                (7000, Detect),
                (7001, Opaque),
                (7002, Detect),
                (8080, Http1),
                (9090, Http2),
            ],
            false,
        ),
    ];
    for (why, tweak, want, conflict) in cases {
        let mut s = base();
        tweak(&mut s);
        let built = build(&s);
        assert_eq!(declared(&built.state, "shop", "api"), want, "{why}");
        let reported = built
            .problems
            .iter()
            .any(|p| p.contains("port 9090 of workload shop/api"));
        assert_eq!(reported, conflict, "{why}: {:?}", built.problems);
    }
    // The unmeshed pod's workload has its ports too (it never asks, but it is declared).
    assert_eq!(
        declared(&build(&base()).state, "shop", "old"),
        [(8080, Http1), (9090, Http2)]
    );
    // Declared ports keep the modes: the mesh default here, a MeshTLS where one says so.
    let mut s = base();
    s.mesh_tls = Some(vec![named(
        "shop",
        "grpc-permissive",
        json!({ "mode": "PERMISSIVE", "serviceAccount": "api", "ports": [9090] }),
    )]);
    let state = build(&s).state;
    let api = model::policy_for(
        &state,
        &SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap(),
    );
    let modes: Vec<(u32, i32, bool)> = api
        .ports
        .iter()
        .map(|p| (p.port, p.mtls, p.authorization.is_some()))
        .collect();
    assert_eq!(
        modes,
        [
            (8080, ppb::MtlsMode::Strict as i32, false),
            (9090, ppb::MtlsMode::Permissive as i32, false)
        ]
    );
}

#[test]
fn plaintext_only_to_unmeshed_endpoints_where_they_run_permissive() {
    let legacy_plaintext = |s: &Snapshot| -> Vec<(String, bool)> {
        build(s).state.services[0]
            .proto
            .endpoints
            .iter()
            .map(|e| (e.address.clone(), e.plaintext_allowed))
            .collect()
    };
    let slice_with = |extra: serde_json::Value| -> Arc<EndpointSlice> {
        obj(json!({
            "metadata": { "namespace": "shop", "name": "api-abc", "labels": { "kubernetes.io/service-name": "api" } },
            "addressType": "IPv4",
            "ports": [{ "name": "http", "port": 8080 }],
            "endpoints": [
                { "addresses": ["10.0.0.1"], "targetRef": { "kind": "Pod", "namespace": "shop", "name": "api-1" } },
                { "addresses": ["10.0.0.3"], "targetRef": { "kind": "Pod", "namespace": "shop", "name": "legacy" } },
                extra,
            ],
        }))
    };
    type Tweak = fn(&mut Snapshot);
    // (case, plaintext allowed for: meshed 10.0.0.1, unmeshed 10.0.0.3, the third endpoint)
    let cases: Vec<(&str, Tweak, [bool; 3])> = vec![
        ("mesh STRICT", |_| {}, [false, false, false]),
        (
            "namespace annotation PERMISSIVE",
            |s| s.namespaces = vec![ns("shop", Some("PERMISSIVE"))],
            [false, true, true],
        ),
        (
            "namespace PERMISSIVE, the pod's service account STRICT",
            |s| {
                s.namespaces = vec![ns("shop", Some("PERMISSIVE"))];
                s.mesh_tls = Some(vec![named(
                    "shop",
                    "old-strict",
                    json!({ "mode": "STRICT", "serviceAccount": "old" }),
                )]);
            },
            [false, false, true],
        ),
        (
            "namespace STRICT, the pod's service account PERMISSIVE",
            |s| {
                s.mesh_tls = Some(vec![named(
                    "shop",
                    "old-permissive",
                    json!({ "mode": "PERMISSIVE", "serviceAccount": "old" }),
                )]);
            },
            [false, true, false],
        ),
        (
            "a namespace-wide MeshTLS STRICT over a PERMISSIVE annotation",
            |s| {
                s.namespaces = vec![ns("shop", Some("PERMISSIVE"))];
                s.mesh_tls = Some(vec![named("shop", "all", json!({ "mode": "STRICT" }))]);
            },
            [false, false, false],
        ),
        (
            "mesh PERMISSIVE, but the MeshTLS list is not in: nobody in plaintext",
            |s| {
                s.mtls = Mtls::Permissive;
                s.mesh_tls = None;
            },
            [false, false, false],
        ),
        (
            "mesh PERMISSIVE",
            |s| s.mtls = Mtls::Permissive,
            [false, true, true],
        ),
    ];
    for (why, tweak, [meshed, legacy, third]) in cases {
        // The third endpoint: an address without a pod.
        let mut s = base();
        s.slices = vec![slice_with(json!({ "addresses": ["10.0.0.9"] }))];
        tweak(&mut s);
        assert_eq!(
            legacy_plaintext(&s),
            [
                ("10.0.0.1".to_string(), meshed),
                ("10.0.0.3".to_string(), legacy),
                ("10.0.0.9".to_string(), third)
            ],
            "{why}"
        );
        // A pod not seen yet: unknown where it runs, so never in plaintext.
        let mut s = base();
        s.slices = vec![slice_with(
            json!({ "addresses": ["10.0.0.9"], "targetRef": { "kind": "Pod", "namespace": "shop", "name": "new" } }),
        )];
        tweak(&mut s);
        assert!(!legacy_plaintext(&s)[2].1, "{why}: unseen pod");
    }
}

#[test]
fn policy_is_ready_only_once_both_policy_lists_are_in() {
    for (mesh_tls, authorization, ready) in [
        (false, false, false),
        (true, false, false),
        (false, true, false),
        (true, true, true),
    ] {
        let mut s = base();
        s.mesh_tls = mesh_tls.then(Vec::new);
        s.authorization = authorization.then(Vec::new);
        assert_eq!(
            build(&s).state.policy_ready,
            ready,
            "{mesh_tls} {authorization}"
        );
    }
}
