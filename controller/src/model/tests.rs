use super::*;

fn state(yaml: &str) -> MeshState {
    let f: MeshFile = serde_yaml::from_str(yaml).unwrap();
    f.validate().unwrap()
}

const MESH: &str = r#"
mtls: STRICT
namespaces:
  legacy: { mtls: PERMISSIVE }
services:
  - name: api
    namespace: shop
    port: 80
    protocol: http
    addresses: [10.96.0.10]
    endpoints:
      - { address: 127.0.0.1, port: 9001, serviceAccount: api, proxyPort: 14143 }
      - { address: 10.0.0.7, port: 9001, serviceAccount: api, ready: false }
  - name: db
    namespace: shop
    port: 5432
    protocol: opaque
    endpoints:
      - { address: 10.0.0.9, port: 5432 }
workloads:
  - namespace: shop
    serviceAccount: api
    ports:
      - port: 9001
        allow:
          - identity: spiffe://cluster.local/ns/shop/sa/web
          - namespace: ops
  - namespace: legacy
    serviceAccount: old
    ports:
      - port: 8080
"#;

#[test]
fn resolve_table() {
    let s = state(MESH);
    let cases = [
        ("api:80", "shop", Some("api")),
        ("api.shop:80", "other", Some("api")),
        ("api.shop.svc:80", "other", Some("api")),
        ("api.shop.svc.cluster.local:80", "other", Some("api")),
        ("api.shop.svc.other.domain:80", "other", None),
        ("api:80", "other", None),
        ("api.shop:81", "shop", None),
        ("10.96.0.10:80", "x", Some("api")),
        ("127.0.0.1:9001", "x", Some("api")),
        ("10.0.0.9:5432", "x", Some("db")),
        ("10.0.0.9:80", "x", None),
        ("nothing.here:80", "x", None),
    ];
    for (target, ns, want) in cases {
        let u = resolve(&s, target, ns);
        assert_eq!(
            u.service.as_ref().map(|s| s.name.as_str()),
            want,
            "{target} from {ns}"
        );
        assert_eq!(u.unknown, want.is_none(), "{target}");
    }
    let api = resolve(&s, "api.shop:80", "").service.unwrap();
    assert_eq!(api.authority, "api.shop.svc.cluster.local:80");
    assert_eq!(
        api.endpoints[0].identity,
        "spiffe://cluster.local/ns/shop/sa/api"
    );
    assert_eq!(api.endpoints[0].proxy_port, 14143);
    assert!(!api.endpoints[1].ready);
    let db = resolve(&s, "db.shop:5432", "").service.unwrap();
    assert_eq!(db.protocol, dpb::Protocol::Opaque as i32);
    assert_eq!(
        db.endpoints[0].identity, "",
        "an endpoint without a service account is not meshed"
    );
}

#[test]
fn policy_table() {
    let s = state(MESH);
    let id = |x: &str| SpiffeId::parse(x).unwrap();
    let api = policy_for(&s, &id("spiffe://cluster.local/ns/shop/sa/api"));
    assert_eq!(
        api.default_policy.as_ref().unwrap().mtls,
        ppb::MtlsMode::Strict as i32
    );
    assert_eq!(api.ports.len(), 1);
    assert_eq!(api.ports[0].authorization.as_ref().unwrap().rules.len(), 2);
    let old = policy_for(&s, &id("spiffe://cluster.local/ns/legacy/sa/old"));
    assert_eq!(
        old.default_policy.unwrap().mtls,
        ppb::MtlsMode::Permissive as i32,
        "namespace default"
    );
    assert_eq!(
        old.ports[0].mtls,
        ppb::MtlsMode::Permissive as i32,
        "port inherits the namespace mode"
    );
    let stranger = policy_for(&s, &id("spiffe://cluster.local/ns/shop/sa/nobody"));
    assert!(stranger.ports.is_empty());
    assert_eq!(
        stranger.default_policy.unwrap().mtls,
        ppb::MtlsMode::Strict as i32
    );
}

#[test]
fn validation_table() {
    let bad = [
        (
            "services: [{name: Api, namespace: shop, port: 80}]",
            "services[0].name",
        ),
        (
            "services: [{name: api, namespace: shop, port: 0}]",
            "services[0].port",
        ),
        (
            "services: [{name: api, namespace: shop, port: 80}, {name: api, namespace: shop, port: 80}]",
            "duplicate service",
        ),
        (
            "services: [{name: api, namespace: shop, port: 80, addresses: [nope]}]",
            "addresses[0]",
        ),
        (
            "services: [{name: api, namespace: shop, port: 80, endpoints: [{address: 1.2.3.4, port: 1, transport: carrier-pigeon}]}]",
            "transport",
        ),
        (
            "workloads: [{namespace: shop, serviceAccount: api, ports: [{port: 1, allow: [{identity: nope}]}]}]",
            "allow[0].identity",
        ),
        (
            "workloads: [{namespace: shop, serviceAccount: api, ports: [{port: 1, allow: [{namespace: a, any: true}]}]}]",
            "exactly one",
        ),
        (
            "workloads: [{namespace: shop, serviceAccount: api}, {namespace: shop, serviceAccount: api}]",
            "duplicate workload",
        ),
        ("trustDomain: 'a/b'", "trustDomain"),
        (
            "workloads: [{namespace: shop, serviceAccount: api, ports: [{port: 1, protocol: smtp}]}]",
            "ports[0].protocol",
        ),
        (
            "workloads: [{namespace: shop, serviceAccount: api, ports: [{port: 1}, {port: 1}]}]",
            "listed twice",
        ),
    ];
    for (yaml, want) in bad {
        let f: MeshFile = serde_yaml::from_str(yaml).unwrap();
        let e = f.validate().unwrap_err().to_string();
        assert!(e.contains(want), "{yaml}: {e}");
    }
}

#[test]
fn split_target_table() {
    assert_eq!(split_target("a:80"), Some(("a", 80)));
    assert_eq!(split_target("[::1]:80"), Some(("[::1]", 80)));
    assert_eq!(split_target("a"), None);
    assert_eq!(split_target("a:0"), None);
    assert_eq!(split_target(":80"), None);
    assert_eq!(split_target("a:99999"), None);
}

fn declared(s: &MeshState, ns: &str, sa: &str) -> Vec<(u32, ppb::PortProtocol, i32, bool)> {
    let p = policy_for(
        s,
        &SpiffeId::parse(&format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")).unwrap(),
    );
    p.ports
        .iter()
        .map(|p| {
            (
                p.port,
                ppb::PortProtocol::try_from(p.protocol).unwrap(),
                p.mtls,
                p.authorization.is_some(),
            )
        })
        .collect()
}

#[test]
fn endpoints_with_a_service_account_declare_their_port() {
    use ppb::PortProtocol::{Detect, Http1, Http2, Opaque};
    let strict = ppb::MtlsMode::Strict as i32;
    let permissive = ppb::MtlsMode::Permissive as i32;
    let s = state(MESH);
    // shop/api lists 9001 (with rules); services target 9001 (http).
    assert_eq!(declared(&s, "shop", "api"), [(9001, Http1, strict, true)]);
    // legacy/old lists 8080 with no protocol and no service: DETECT, the namespace's mode.
    assert_eq!(
        declared(&s, "legacy", "old"),
        [(8080, Detect, permissive, false)]
    );
    assert!(s.policy_ready, "a mesh file is all there is");

    // (mesh file, workload, declared ports, a conflict reported)
    let cases: &[(
        &str,
        (&str, &str),
        &[(u32, ppb::PortProtocol, i32, bool)],
        bool,
    )] = &[
        (
            // No workloads entry at all: every targeted port, the namespace's mode.
            "namespaces: { shop: { mtls: PERMISSIVE } }\nservices:\n  - { name: a, namespace: shop, port: 80, protocol: grpc, endpoints: [{ address: 10.0.0.1, port: 9000, serviceAccount: api }, { address: 10.0.0.2, port: 9000, serviceAccount: api }] }\n  - { name: b, namespace: shop, port: 81, protocol: opaque, endpoints: [{ address: 10.0.0.1, port: 5432, serviceAccount: api }] }\n",
            ("shop", "api"),
            &[
                (5432, Opaque, permissive, false),
                (9000, Http2, permissive, false),
            ],
            false,
        ),
        (
            // Two services, one port: opaque only if both say so.
            "services:\n  - { name: a, namespace: shop, port: 80, protocol: opaque, endpoints: [{ address: 10.0.0.1, port: 9000, serviceAccount: api }] }\n  - { name: b, namespace: shop, port: 81, protocol: http, endpoints: [{ address: 10.0.0.1, port: 9000, serviceAccount: api }] }\n",
            ("shop", "api"),
            &[(9000, Http1, strict, false)],
            true,
        ),
        (
            "services:\n  - { name: a, namespace: shop, port: 80, protocol: opaque, endpoints: [{ address: 10.0.0.1, port: 9000, serviceAccount: api }] }\n  - { name: b, namespace: shop, port: 81, protocol: tcp, endpoints: [{ address: 10.0.0.1, port: 9000, serviceAccount: api }] }\n",
            ("shop", "api"),
            &[(9000, Opaque, strict, false)],
            false,
        ),
        (
            // The workload's own protocol decides, over the services.
            "services:\n  - { name: a, namespace: shop, port: 80, protocol: opaque, endpoints: [{ address: 10.0.0.1, port: 9000, serviceAccount: api }] }\n  - { name: b, namespace: shop, port: 81, protocol: http, endpoints: [{ address: 10.0.0.1, port: 9000, serviceAccount: api }] }\nworkloads:\n  - { namespace: shop, serviceAccount: api, ports: [{ port: 9000, protocol: opaque, mtls: PERMISSIVE }, { port: 7000, protocol: grpc }] }\n",
            ("shop", "api"),
            &[
                (7000, Http2, strict, false),
                (9000, Opaque, permissive, false),
            ],
            false,
        ),
        (
            // An endpoint without a service account declares nothing.
            "services:\n  - { name: a, namespace: shop, port: 80, protocol: http, endpoints: [{ address: 10.0.0.1, port: 9000 }] }\n",
            ("shop", "api"),
            &[],
            false,
        ),
    ];
    for (yaml, (ns, sa), want, conflict) in cases {
        let f: MeshFile = serde_yaml::from_str(yaml).unwrap();
        let (s, warnings) = f.check().unwrap();
        assert_eq!(declared(&s, ns, sa), *want, "{yaml}");
        assert_eq!(!warnings.is_empty(), *conflict, "{yaml}: {warnings:?}");
        if *conflict {
            assert!(
                warnings[0].contains("port 9000 of workload shop/api")
                    && warnings[0].contains("services[0] (a.shop)")
                    && warnings[0].contains("served as http"),
                "{warnings:?}"
            );
        }
    }
}

#[test]
fn unmeshed_endpoints_are_plaintext_only_where_their_namespace_is_permissive() {
    let yaml = "mtls: STRICT\nnamespaces: { legacy: { mtls: PERMISSIVE } }\nservices:\n  - { name: db, namespace: shop, port: 5432, endpoints: [{ address: 10.0.0.9, port: 5432 }, { address: 10.0.0.8, port: 5432, serviceAccount: db }] }\n  - { name: old, namespace: legacy, port: 80, endpoints: [{ address: 10.0.0.7, port: 80 }, { address: 10.0.0.6, port: 80, serviceAccount: old }] }\n";
    let s = state(yaml);
    let plaintext = |target: &str| -> Vec<(String, bool)> {
        resolve(&s, target, "")
            .service
            .unwrap()
            .endpoints
            .iter()
            .map(|e| (e.address.clone(), e.plaintext_allowed))
            .collect()
    };
    assert_eq!(
        plaintext("db.shop:5432"),
        [("10.0.0.9".into(), false), ("10.0.0.8".into(), false)],
        "STRICT: clients refuse the unmeshed endpoint"
    );
    assert_eq!(
        plaintext("old.legacy:80"),
        [("10.0.0.7".into(), true), ("10.0.0.6".into(), false)],
        "PERMISSIVE namespace: plaintext to the unmeshed one only"
    );
    let permissive_mesh = state(&yaml.replace("mtls: STRICT", "mtls: PERMISSIVE"));
    assert!(
        resolve(&permissive_mesh, "db.shop:5432", "")
            .service
            .unwrap()
            .endpoints[0]
            .plaintext_allowed
    );
}

#[test]
fn declared_ports_name_the_services_that_target_them() {
    let s = state(
        r#"
services:
  - name: api
    namespace: shop
    port: 80
    endpoints:
      - { address: 10.0.0.1, port: 9001, serviceAccount: api }
  - name: api-admin
    namespace: shop
    port: 8080
    endpoints:
      - { address: 10.0.0.1, port: 9001, serviceAccount: api }
      - { address: 10.0.0.1, port: 9002, serviceAccount: api }
  - name: other
    namespace: shop
    port: 80
    endpoints:
      - { address: 10.0.0.2, port: 9001, serviceAccount: other }
"#,
    );
    let p = policy_for(
        &s,
        &SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/api").unwrap(),
    );
    let of = |port: u32| {
        p.ports
            .iter()
            .find(|q| q.port == port)
            .map(|q| q.authorities.clone())
            .unwrap()
    };
    assert_eq!(
        of(9001),
        vec![
            "api-admin.shop.svc.cluster.local:8080".to_string(),
            "api.shop.svc.cluster.local:80".to_string()
        ]
    );
    assert_eq!(
        of(9002),
        vec!["api-admin.shop.svc.cluster.local:8080".to_string()]
    );
    assert!(p.default_policy.unwrap().authorities.is_empty());
}
