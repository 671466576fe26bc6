//! Small helpers over the admin client: namespaces, service accounts, tokens.

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use std::collections::BTreeMap;

/// A namespace with a unique name starting with `prefix`, with these annotations and labels.
pub async fn namespace(
    client: &kube::Client,
    prefix: &str,
    annotations: &[(&str, &str)],
    labels: &[(&str, &str)],
) -> String {
    let name = format!("{prefix}-{}", fastrand_suffix());
    let map = |kv: &[(&str, &str)]| -> Option<BTreeMap<String, String>> {
        Some(
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    };
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: map(annotations),
            labels: map(labels),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    name
}

fn fastrand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{:x}{}", nanos & 0xffff, N.fetch_add(1, Ordering::Relaxed))
}

pub async fn service_account(client: &kube::Client, ns: &str, name: &str) {
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
}

/// A real TokenRequest token for `ns/sa` with `audience`.
pub async fn token(client: &kube::Client, ns: &str, sa: &str, audience: &str) -> String {
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![audience.into()]),
            expiration_seconds: Some(600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let api = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    let answer: TokenRequest = api
        .create_token_request(sa, &PostParams::default(), &req)
        .await
        .unwrap();
    answer.status.unwrap().token.unwrap()
}
