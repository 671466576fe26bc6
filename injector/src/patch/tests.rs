use super::*;
use serde_json::json;

fn cfg() -> InjectConfig {
    InjectConfig::with_anchors(
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
    )
}

fn pod(v: Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

fn base(annotations: Value, spec_extra: Value) -> Value {
    let mut spec = json!({
        "serviceAccountName": "web",
        "containers": [
            { "name": "app", "image": "app:1", "ports": [{ "containerPort": 8080 }, { "containerPort": 9090 }] },
            { "name": "side", "image": "side:1", "ports": [{ "containerPort": 8080 }] },
        ],
    });
    if let (Some(s), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
        for (k, v) in extra {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({ "metadata": { "name": "web-1", "annotations": annotations }, "spec": spec })
}

fn applied(p: &Pod, c: &InjectConfig) -> Value {
    let patch = patch(p, c).unwrap();
    let mut doc = serde_json::to_value(p).unwrap();
    json_patch::patch(&mut doc, &patch).unwrap();
    doc
}

fn env_of(container: &Value, name: &str) -> Option<String> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| match &e["value"] {
            Value::String(s) => s.clone(),
            _ => e["valueFrom"]["fieldRef"]["fieldPath"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        })
}

#[test]
fn decisions() {
    let enabled = BTreeMap::from([(ann::INJECT.to_string(), "enabled".to_string())]);
    let disabled = BTreeMap::from([(ann::INJECT.to_string(), "disabled".to_string())]);
    let none = BTreeMap::new();
    let injected = json!({ "initContainers": [{ "name": "musubi-proxy", "image": "x" }] });
    let cases: Vec<(&str, Value, &str, &BTreeMap<String, String>, Decision)> = vec![
        (
            "namespace enabled",
            base(json!({}), json!({})),
            "shop",
            &enabled,
            Decision::Inject,
        ),
        (
            "pod enabled, namespace silent",
            base(json!({"musubi.io/inject": "enabled"}), json!({})),
            "shop",
            &none,
            Decision::Inject,
        ),
        (
            "pod enabled wins over namespace disabled",
            base(json!({"musubi.io/inject": "enabled"}), json!({})),
            "shop",
            &disabled,
            Decision::Inject,
        ),
        (
            "nobody opted in",
            base(json!({}), json!({})),
            "shop",
            &none,
            Decision::Skip("neither the pod nor its namespace says musubi.io/inject: enabled"),
        ),
        (
            "pod opts out",
            base(json!({"musubi.io/inject": "disabled"}), json!({})),
            "shop",
            &enabled,
            Decision::Skip("the pod says musubi.io/inject: disabled"),
        ),
        (
            "odd value is not a yes",
            base(json!({"musubi.io/inject": "true"}), json!({})),
            "shop",
            &none,
            Decision::Skip("neither the pod nor its namespace says musubi.io/inject: enabled"),
        ),
        (
            "control plane namespace",
            base(json!({"musubi.io/inject": "enabled"}), json!({})),
            "musubi-system",
            &enabled,
            Decision::Skip("the control plane's namespace is never injected"),
        ),
        (
            "host network",
            base(json!({}), json!({"hostNetwork": true})),
            "shop",
            &enabled,
            Decision::Skip("host-network pods are not injected"),
        ),
        (
            "already injected",
            base(json!({}), injected),
            "shop",
            &enabled,
            Decision::Skip("the pod already has the proxy"),
        ),
    ];
    for (name, p, ns, ns_ann, want) in cases {
        assert_eq!(decide(&pod(p), ns, ns_ann, &cfg()), want, "{name}");
    }
}

#[test]
fn patch_adds_sidecar_init_volume_and_marks() {
    let doc = applied(&pod(base(json!({}), json!({}))), &cfg());
    let inits = doc["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(inits.len(), 2);
    let (init, proxy) = (&inits[0], &inits[1]);
    assert_eq!(init["name"], "musubi-init");
    assert_eq!(proxy["name"], "musubi-proxy");
    assert_eq!(proxy["restartPolicy"], "Always", "native sidecar");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live");
    assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
    assert_eq!(proxy["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(
        init["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert!(
        init["args"]
            .as_array()
            .unwrap()
            .contains(&json!("--proxy-uid=2102"))
    );
    assert_eq!(
        env_of(proxy, "MUSUBI_PROXY_APP_PORTS").unwrap(),
        "8080,9090"
    );
    assert_eq!(
        env_of(proxy, "MUSUBI_PROXY_NAMESPACE").unwrap(),
        "metadata.namespace"
    );
    assert_eq!(
        env_of(proxy, "MUSUBI_PROXY_SERVICE_ACCOUNT").unwrap(),
        "spec.serviceAccountName"
    );
    assert!(
        env_of(proxy, "MUSUBI_PROXY_TRUST_ANCHORS_PEM")
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    assert_eq!(
        env_of(proxy, "MUSUBI_PROXY_IDENTITY_ADDR").unwrap(),
        "musubi-identity.musubi-system.svc:8080"
    );
    assert_eq!(
        env_of(proxy, "MUSUBI_PROXY_CONTROLLER_IDENTITY").unwrap(),
        "spiffe://cluster.local/ns/musubi-system/sa/musubi-controller"
    );
    assert_eq!(env_of(proxy, "MUSUBI_PROXY_OPAQUE_PORTS"), None);
    let vol = &doc["spec"]["volumes"][0];
    assert_eq!(vol["name"], "musubi-token");
    assert_eq!(
        vol["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "identity.musubi.io"
    );
    assert_eq!(proxy["volumeMounts"][0]["mountPath"], TOKEN_DIR);
    assert_eq!(
        doc["metadata"]["annotations"]["musubi.io/proxy-version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        doc["metadata"]["labels"]["musubi.io/control-plane-ns"],
        "musubi-system"
    );
    // The app containers are untouched.
    assert_eq!(doc["spec"]["containers"].as_array().unwrap().len(), 2);
    // Injecting the result again is refused by the decision.
    let again = pod(doc);
    let on = BTreeMap::from([(ann::INJECT.to_string(), "enabled".to_string())]);
    assert_eq!(
        decide(&again, "shop", &on, &cfg()),
        Decision::Skip("the pod already has the proxy")
    );
}

#[test]
fn patch_keeps_existing_init_containers_volumes_labels_after_the_mesh() {
    let p = base(
        json!({"a": "b"}),
        json!({
            "initContainers": [{ "name": "migrate", "image": "m" }],
            "volumes": [{ "name": "data", "emptyDir": {} }],
        }),
    );
    let mut p = p;
    p["metadata"]["labels"] = json!({"app": "web"});
    let doc = applied(&pod(p), &cfg());
    let names: Vec<&str> = doc["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["musubi-init", "musubi-proxy", "migrate"]);
    let vols: Vec<&str> = doc["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(vols, ["data", "musubi-token"]);
    assert_eq!(doc["metadata"]["annotations"]["a"], "b");
    assert_eq!(doc["metadata"]["labels"]["app"], "web");
    assert_eq!(
        doc["metadata"]["labels"]["musubi.io/control-plane-ns"],
        "musubi-system"
    );
}

#[test]
fn annotations_tune_the_proxy() {
    let p = base(
        json!({
            "musubi.io/skip-inbound-ports": "9090, 9100-9110",
            "musubi.io/skip-outbound-ports": "3306",
            "musubi.io/skip-outbound-cidrs": "10.0.0.0/8,fd00::/8",
            "musubi.io/opaque-ports": "5432",
            "musubi.io/proxy-cpu-request": "250m",
            "musubi.io/proxy-memory-limit": "1Gi",
            "musubi.io/proxy-log-level": "musubi_proxy=debug,info",
        }),
        json!({}),
    );
    let doc = applied(&pod(p), &cfg());
    let (init, proxy) = (
        &doc["spec"]["initContainers"][0],
        &doc["spec"]["initContainers"][1],
    );
    let args: Vec<&str> = init["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.contains(&"--skip-inbound-ports=9090,9100-9110"),
        "{args:?}"
    );
    assert!(args.contains(&"--skip-outbound-ports=3306"));
    assert!(args.contains(&"--skip-outbound-cidrs=10.0.0.0/8,fd00::/8"));
    assert_eq!(env_of(proxy, "MUSUBI_PROXY_OPAQUE_PORTS").unwrap(), "5432");
    assert_eq!(
        env_of(proxy, "MUSUBI_LOG").unwrap(),
        "musubi_proxy=debug,info"
    );
    assert_eq!(proxy["resources"]["requests"]["cpu"], "250m");
    assert_eq!(proxy["resources"]["requests"]["memory"], "20Mi");
    assert_eq!(proxy["resources"]["limits"]["memory"], "1Gi");
    assert!(proxy["resources"]["limits"].get("cpu").is_none());
}

#[test]
fn bad_annotations_are_refused_by_name() {
    let cases = [
        ("musubi.io/skip-inbound-ports", "0", "not a port"),
        ("musubi.io/skip-inbound-ports", "http", "not a port"),
        ("musubi.io/skip-outbound-ports", "90-80", "backwards"),
        ("musubi.io/skip-outbound-ports", "70000", "not a port"),
        (
            "musubi.io/skip-outbound-cidrs",
            "10.0.0.0/33",
            "prefix length",
        ),
        ("musubi.io/skip-outbound-cidrs", "ten", "not an address"),
        ("musubi.io/opaque-ports", ",", "no ports"),
        ("musubi.io/proxy-cpu-request", "lots", "not a quantity"),
        ("musubi.io/proxy-memory-limit", "1GB", "not a quantity"),
        (
            "musubi.io/proxy-log-level",
            "info\"; rm -rf",
            "not a log filter",
        ),
    ];
    for (key, value, want) in cases {
        let p = pod(base(json!({ key: value }), json!({})));
        let e = patch(&p, &cfg()).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(want), "{key}={value}: {e}");
    }
}

#[test]
fn a_pod_without_annotations_or_labels_gets_both_maps() {
    let p = pod(
        json!({ "metadata": { "name": "x" }, "spec": { "containers": [{ "name": "a", "image": "a" }] } }),
    );
    let doc = applied(&p, &cfg());
    assert!(doc["metadata"]["annotations"].is_object());
    assert!(doc["metadata"]["labels"].is_object());
    assert_eq!(
        env_of(&doc["spec"]["initContainers"][1], "MUSUBI_PROXY_APP_PORTS"),
        None
    );
    let no_spec = pod(json!({ "metadata": { "name": "x" } }));
    assert_eq!(patch(&no_spec, &cfg()).unwrap_err(), InjectError::NoSpec);
}
