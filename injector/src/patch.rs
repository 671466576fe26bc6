//! The injection decision and the pod patch: pure functions of the pod, its namespace's
//! annotations and the mesh configuration. The webhook and `musubi inject` both call these.

use crate::annotations::{self as ann, Tuning};
use crate::config::InjectConfig;
use json_patch::Patch;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use std::collections::BTreeMap;

pub const PROXY_CONTAINER: &str = "musubi-proxy";
pub const INIT_CONTAINER: &str = "musubi-init";
pub const TOKEN_VOLUME: &str = "musubi-token";
pub const TOKEN_DIR: &str = "/var/run/secrets/musubi.io/token";
/// Audience of the projected token the identity service checks.
pub const TOKEN_AUDIENCE: &str = "identity.musubi.io";

/// Why a pod is or is not injected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Inject,
    Skip(&'static str),
}

/// Decides from the pod and its namespace. The pod's own annotation wins over the namespace's.
pub fn decide(
    pod: &Pod,
    namespace: &str,
    ns_annotations: &BTreeMap<String, String>,
    cfg: &InjectConfig,
) -> Decision {
    let pod_says = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ann::INJECT))
        .map(String::as_str);
    let ns_says = ns_annotations.get(ann::INJECT).map(String::as_str);
    let spec = pod.spec.as_ref();
    if pod_says == Some(ann::DISABLED) {
        return Decision::Skip("the pod says musubi.io/inject: disabled");
    }
    if namespace == cfg.control_plane_namespace {
        return Decision::Skip("the control plane's namespace is never injected");
    }
    if spec.and_then(|s| s.host_network) == Some(true) {
        return Decision::Skip("host-network pods are not injected");
    }
    if already_injected(pod) {
        return Decision::Skip("the pod already has the proxy");
    }
    match (pod_says, ns_says) {
        (Some(ann::ENABLED), _) => Decision::Inject,
        (None, Some(ann::ENABLED)) => Decision::Inject,
        _ => Decision::Skip("neither the pod nor its namespace says musubi.io/inject: enabled"),
    }
}

fn already_injected(pod: &Pod) -> bool {
    let Some(spec) = &pod.spec else { return false };
    let named = |n: &str| n == PROXY_CONTAINER || n == INIT_CONTAINER;
    spec.containers.iter().any(|c| named(&c.name))
        || spec
            .init_containers
            .iter()
            .flatten()
            .any(|c| named(&c.name))
}

/// The problem with a pod's annotations or spec that stops injection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("annotation {key}: {problem}")]
    Annotation { key: &'static str, problem: String },
    #[error("the pod has no spec")]
    NoSpec,
    #[error("internal error building the patch: {0}")]
    Internal(String),
}

/// The JSON patch that adds the mesh to `pod`.
pub fn patch(pod: &Pod, cfg: &InjectConfig) -> Result<Patch, InjectError> {
    let spec = pod.spec.as_ref().ok_or(InjectError::NoSpec)?;
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let tuning = ann::tuning(annotations, cfg)?;
    let app_ports: Vec<u16> = {
        let mut v: Vec<u16> = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| u16::try_from(p.container_port).ok())
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let mut ops = Vec::new();
    // Init containers: iptables first, then the proxy (a native sidecar), then the pod's own.
    let init = init_container(cfg, &tuning);
    let proxy = proxy_container(cfg, &tuning, &app_ports);
    if spec.init_containers.as_ref().is_none_or(Vec::is_empty) {
        ops.push(add("/spec/initContainers", json!([init, proxy])));
    } else {
        ops.push(add("/spec/initContainers/0", proxy));
        ops.push(add("/spec/initContainers/0", init));
    }
    let volume = token_volume();
    if spec.volumes.as_ref().is_none_or(Vec::is_empty) {
        ops.push(add("/spec/volumes", json!([volume])));
    } else {
        ops.push(add("/spec/volumes/-", volume));
    }
    let marks = [
        (ann::PROXY_VERSION, env!("CARGO_PKG_VERSION").to_string()),
        (ann::INJECTED_BY, "musubi-injector".to_string()),
    ];
    if pod.metadata.annotations.is_none() {
        let map: serde_json::Map<String, Value> = marks
            .iter()
            .map(|(k, v)| ((*k).to_string(), Value::String(v.clone())))
            .collect();
        ops.push(add("/metadata/annotations", Value::Object(map)));
    } else {
        for (k, v) in marks {
            ops.push(add(
                &format!("/metadata/annotations/{}", escape(k)),
                json!(v),
            ));
        }
    }
    let label_value = json!(cfg.control_plane_namespace);
    if pod.metadata.labels.is_none() {
        ops.push(add(
            "/metadata/labels",
            json!({ (ann::CONTROL_PLANE_NS_LABEL): label_value }),
        ));
    } else {
        ops.push(add(
            &format!("/metadata/labels/{}", escape(ann::CONTROL_PLANE_NS_LABEL)),
            label_value,
        ));
    }
    serde_json::from_value(Value::Array(ops)).map_err(|e| InjectError::Internal(e.to_string()))
}

fn add(path: &str, value: Value) -> Value {
    json!({ "op": "add", "path": path, "value": value })
}

/// JSON-pointer escaping of one path segment (RFC 6901).
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

fn resources(r: &crate::config::Resources) -> Value {
    let pick = |cpu: &str, mem: &str| {
        let mut m = serde_json::Map::new();
        if !cpu.is_empty() {
            m.insert("cpu".into(), json!(cpu));
        }
        if !mem.is_empty() {
            m.insert("memory".into(), json!(mem));
        }
        Value::Object(m)
    };
    json!({
        "requests": pick(&r.cpu_request, &r.memory_request),
        "limits": pick(&r.cpu_limit, &r.memory_limit),
    })
}

fn field_env(name: &str, path: &str) -> Value {
    json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": path } } })
}

fn proxy_container(cfg: &InjectConfig, t: &Tuning, app_ports: &[u16]) -> Value {
    let p = &cfg.proxy;
    let join = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
    let mut env = vec![
        field_env("MUSUBI_PROXY_NAMESPACE", "metadata.namespace"),
        field_env("MUSUBI_PROXY_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("MUSUBI_PROXY_POD_NAME", "metadata.name"),
        json!({ "name": "MUSUBI_PROXY_TRUST_DOMAIN", "value": cfg.trust_domain }),
        json!({ "name": "MUSUBI_PROXY_TRUST_ANCHORS_PEM", "value": cfg.trust_anchors_pem }),
        json!({ "name": "MUSUBI_PROXY_TOKEN_FILE", "value": format!("{TOKEN_DIR}/token") }),
        json!({ "name": "MUSUBI_PROXY_IDENTITY_ADDR", "value": cfg.identity_addr() }),
        json!({ "name": "MUSUBI_PROXY_IDENTITY_NAMESPACE", "value": cfg.control_plane_namespace }),
        json!({ "name": "MUSUBI_PROXY_CONTROLLER_ADDR", "value": cfg.controller_addr() }),
        json!({ "name": "MUSUBI_PROXY_CONTROLLER_IDENTITY", "value": cfg.controller_identity() }),
        json!({ "name": "MUSUBI_PROXY_INBOUND_LISTEN", "value": format!("0.0.0.0:{}", p.inbound_port) }),
        json!({ "name": "MUSUBI_PROXY_OUTBOUND_LISTEN", "value": format!("127.0.0.1:{}", p.outbound_port) }),
        json!({ "name": "MUSUBI_PROXY_ADMIN_LISTEN", "value": format!("0.0.0.0:{}", p.admin_port) }),
        json!({ "name": "MUSUBI_LOG", "value": t.log_level }),
    ];
    if !app_ports.is_empty() {
        env.push(json!({ "name": "MUSUBI_PROXY_APP_PORTS", "value": join(app_ports) }));
    }
    if let Some(opaque) = &t.opaque_ports {
        env.push(json!({ "name": "MUSUBI_PROXY_OPAQUE_PORTS", "value": opaque }));
    }
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": { "path": path, "port": p.admin_port },
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 1,
        })
    };
    json!({
        "name": PROXY_CONTAINER,
        "image": p.image,
        "imagePullPolicy": p.image_pull_policy,
        // A native sidecar: starts before the app containers, stops after them, and does not
        // keep a Job from completing.
        "restartPolicy": "Always",
        "env": env,
        "ports": [
            { "name": "musubi-inbound", "containerPort": p.inbound_port, "protocol": "TCP" },
            { "name": "musubi-admin", "containerPort": p.admin_port, "protocol": "TCP" },
        ],
        // The app containers start only once the proxy holds a certificate.
        "startupProbe": probe("/ready", 1, 120),
        "readinessProbe": probe("/ready", 10, 3),
        "livenessProbe": probe("/live", 10, 3),
        "resources": resources(&t.resources),
        "securityContext": {
            "runAsUser": p.uid,
            "runAsGroup": p.uid,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": [{ "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true }],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
}

fn init_container(cfg: &InjectConfig, t: &Tuning) -> Value {
    let p = &cfg.proxy;
    let mut args = vec![
        "init".to_string(),
        format!("--proxy-uid={}", p.uid),
        format!("--inbound-port={}", p.inbound_port),
        format!("--outbound-port={}", p.outbound_port),
        format!("--admin-port={}", p.admin_port),
    ];
    if let Some(v) = &t.skip_inbound_ports {
        args.push(format!("--skip-inbound-ports={v}"));
    }
    if let Some(v) = &t.skip_outbound_ports {
        args.push(format!("--skip-outbound-ports={v}"));
    }
    if let Some(v) = &t.skip_outbound_cidrs {
        args.push(format!("--skip-outbound-cidrs={v}"));
    }
    json!({
        "name": INIT_CONTAINER,
        "image": p.image,
        "imagePullPolicy": p.image_pull_policy,
        "args": args,
        "resources": {
            "requests": { "cpu": "10m", "memory": "10Mi" },
            "limits": { "cpu": "100m", "memory": "50Mi" },
        },
        // Root only for iptables in the pod's own network namespace, with just the two
        // capabilities that needs.
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
}

fn token_volume() -> Value {
    json!({
        "name": TOKEN_VOLUME,
        "projected": {
            "sources": [{
                "serviceAccountToken": {
                    "audience": TOKEN_AUDIENCE,
                    "expirationSeconds": 3600,
                    "path": "token",
                }
            }]
        }
    })
}

#[cfg(test)]
mod tests;
