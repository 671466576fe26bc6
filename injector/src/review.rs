//! AdmissionReview v1 in and out. Decoding refuses a malformed review with a message; a review
//! whose pod cannot be read is allowed through unmodified with a warning, so a bug or an odd
//! pod never blocks the cluster.

use crate::config::InjectConfig;
use crate::patch::{self, Decision};
use base64::Engine as _;
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Largest review accepted (the API server sends at most a few MB; pods are far smaller).
pub const MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: String,
    kind: String,
    request: Option<Request>,
}

/// The parts of an admission request the injector uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Request {
    pub uid: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub operation: Option<String>,
    #[serde(default)]
    pub object: Option<Value>,
}

/// Why a body is not a review the injector can answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    #[error("body is {0} bytes; at most {MAX_REVIEW_BYTES} are accepted")]
    TooLarge(usize),
    #[error("body is not an AdmissionReview: {0}")]
    Malformed(String),
    #[error("expected apiVersion admission.k8s.io/v1 and kind AdmissionReview, got {0}")]
    WrongType(String),
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("the admission request has an empty uid")]
    NoUid,
}

/// Decodes and checks an AdmissionReview body.
pub fn decode(body: &[u8]) -> Result<Request, ReviewError> {
    if body.len() > MAX_REVIEW_BYTES {
        return Err(ReviewError::TooLarge(body.len()));
    }
    let review: Review =
        serde_json::from_slice(body).map_err(|e| ReviewError::Malformed(e.to_string()))?;
    if review.api_version != "admission.k8s.io/v1" || review.kind != "AdmissionReview" {
        return Err(ReviewError::WrongType(format!(
            "{}/{}",
            review.api_version, review.kind
        )));
    }
    let req = review.request.ok_or(ReviewError::NoRequest)?;
    if req.uid.is_empty() {
        return Err(ReviewError::NoUid);
    }
    Ok(req)
}

/// What the webhook answers, and why (for logs and metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub review: Value,
    /// `injected`, `skipped`, `denied` or `unreadable`.
    pub outcome: &'static str,
    pub reason: String,
}

/// Answers a decoded request, given its namespace's annotations (`None`: the namespace
/// could not be read, which counts as no opt-in).
pub fn answer(
    req: &Request,
    ns_annotations: Option<&BTreeMap<String, String>>,
    cfg: &InjectConfig,
) -> Answer {
    let uid = &req.uid;
    let allow = |warning: Option<String>| {
        let mut response = json!({ "uid": uid, "allowed": true });
        if let Some(w) = warning {
            response["warnings"] = json!([w]);
        }
        envelope(response)
    };
    let Some(object) = &req.object else {
        return Answer {
            review: allow(None),
            outcome: "skipped",
            reason: "the request carries no object".into(),
        };
    };
    let pod: Pod = match serde_json::from_value(object.clone()) {
        Ok(p) => p,
        Err(e) => {
            let reason = format!("musubi: the pod could not be read, so it was not injected: {e}");
            return Answer {
                review: allow(Some(reason.clone())),
                outcome: "unreadable",
                reason,
            };
        }
    };
    let namespace = req
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    let empty = BTreeMap::new();
    match patch::decide(&pod, &namespace, ns_annotations.unwrap_or(&empty), cfg) {
        Decision::Skip(why) => Answer {
            review: allow(None),
            outcome: "skipped",
            reason: why.to_string(),
        },
        Decision::Inject => match patch::patch(&pod, cfg) {
            Ok(p) => {
                let bytes = serde_json::to_vec(&p).unwrap_or_default();
                let response = json!({
                    "uid": uid,
                    "allowed": true,
                    "patchType": "JSONPatch",
                    "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
                });
                Answer {
                    review: envelope(response),
                    outcome: "injected",
                    reason: "injected".into(),
                }
            }
            Err(e) => {
                let message = format!("musubi: cannot inject the proxy: {e}");
                let response = json!({
                    "uid": uid,
                    "allowed": false,
                    "status": { "code": 400, "message": message, "reason": "BadRequest" },
                });
                Answer {
                    review: envelope(response),
                    outcome: "denied",
                    reason: message,
                }
            }
        },
    }
}

fn envelope(response: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InjectConfig {
        InjectConfig::with_anchors("-----BEGIN CERTIFICATE-----\n".into())
    }

    fn review(object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": { "uid": "u-1", "namespace": "shop", "operation": "CREATE", "object": object },
        }))
        .unwrap()
    }

    fn pod(annotations: Value) -> Value {
        json!({
            "metadata": { "name": "web", "annotations": annotations },
            "spec": { "containers": [{ "name": "app", "image": "app", "ports": [{ "containerPort": 8080 }] }] },
        })
    }

    #[test]
    fn decode_refusals() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "not an AdmissionReview"),
            (b"{", "not an AdmissionReview"),
            (b"[]", "not an AdmissionReview"),
            (br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x"}}"#, "admission.k8s.io/v1beta1/AdmissionReview"),
            (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#, "no request"),
            (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":""}}"#, "empty uid"),
            (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":7}}"#, "not an AdmissionReview"),
        ];
        for (body, want) in cases {
            let e = decode(body).unwrap_err().to_string();
            assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(body));
        }
        let big = vec![b' '; MAX_REVIEW_BYTES + 1];
        assert!(matches!(decode(&big), Err(ReviewError::TooLarge(_))));
    }

    #[test]
    fn answers() {
        let enabled = BTreeMap::from([("musubi.io/inject".to_string(), "enabled".to_string())]);
        let cases: &[(Value, Option<&BTreeMap<String, String>>, &str, bool)] = &[
            (pod(json!({})), Some(&enabled), "injected", true),
            (pod(json!({})), None, "skipped", true),
            (
                pod(json!({"musubi.io/inject": "disabled"})),
                Some(&enabled),
                "skipped",
                true,
            ),
            (
                pod(json!({"musubi.io/skip-inbound-ports": "0"})),
                Some(&enabled),
                "denied",
                false,
            ),
            (
                json!({"spec": {"containers": "not a list"}}),
                Some(&enabled),
                "unreadable",
                true,
            ),
        ];
        for (object, ns, outcome, allowed) in cases {
            let req = decode(&review(object.clone())).unwrap();
            let a = answer(&req, *ns, &cfg());
            assert_eq!(a.outcome, *outcome, "{object}: {}", a.reason);
            let resp = &a.review["response"];
            assert_eq!(resp["uid"], "u-1");
            assert_eq!(resp["allowed"], *allowed, "{object}");
            assert_eq!(resp["patchType"].is_string(), *outcome == "injected");
        }
    }

    #[test]
    fn injected_patch_applies_to_the_pod() {
        let enabled = BTreeMap::from([("musubi.io/inject".to_string(), "enabled".to_string())]);
        let object = pod(json!({}));
        let req = decode(&review(object.clone())).unwrap();
        let a = answer(&req, Some(&enabled), &cfg());
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.review["response"]["patch"].as_str().unwrap())
            .unwrap();
        let p: json_patch::Patch = serde_json::from_slice(&raw).unwrap();
        let mut doc = object;
        json_patch::patch(&mut doc, &p).unwrap();
        let names: Vec<&str> = doc["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["musubi-init", "musubi-proxy"]);
    }
}
