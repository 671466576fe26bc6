//! Offline injection of YAML manifests (`musubi inject FILE|-`): every pod template in the
//! documents (Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs, and
//! Lists of them) gets the same patch the webhook would apply; everything else passes through.

use crate::annotations as ann;
use crate::config::InjectConfig;
use crate::patch::{self, Decision};
use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;
use std::collections::BTreeMap;

/// What happened to one resource, for the report on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `kind/name`.
    pub resource: String,
    /// `injected` or `skipped: <why>`.
    pub result: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("document {doc}: not valid YAML: {reason}")]
    Yaml { doc: usize, reason: String },
    #[error("{resource}: {reason}")]
    Resource { resource: String, reason: String },
}

/// Injects every document of `text`; returns the new YAML stream and one outcome per workload.
pub fn inject(text: &str, cfg: &InjectConfig) -> Result<(String, Vec<Outcome>), ManifestError> {
    let mut docs = Vec::new();
    let mut outcomes = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value: Value =
            serde::Deserialize::deserialize(de).map_err(|e| ManifestError::Yaml {
                doc: i + 1,
                reason: e.to_string(),
            })?;
        if value.is_null() {
            continue;
        }
        let mut value = value;
        inject_value(&mut value, cfg, &mut outcomes)?;
        docs.push(value);
    }
    let mut out = String::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            out.push_str("---\n");
        }
        let yaml = serde_yaml::to_string(d).map_err(|e| ManifestError::Yaml {
            doc: i + 1,
            reason: e.to_string(),
        })?;
        out.push_str(&yaml);
    }
    Ok((out, outcomes))
}

fn inject_value(
    v: &mut Value,
    cfg: &InjectConfig,
    outcomes: &mut Vec<Outcome>,
) -> Result<(), ManifestError> {
    let kind = v["kind"].as_str().unwrap_or_default().to_string();
    let name = v["metadata"]["name"].as_str().unwrap_or("?").to_string();
    let resource = format!("{}/{}", kind.to_lowercase(), name);
    let template = match kind.as_str() {
        "List" => {
            if let Some(items) = v["items"].as_array_mut() {
                for item in items {
                    inject_value(item, cfg, outcomes)?;
                }
            }
            return Ok(());
        }
        "Pod" => Some(&mut *v),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => v.pointer_mut("/spec/template"),
        "CronJob" => v.pointer_mut("/spec/jobTemplate/spec/template"),
        _ => None,
    };
    let Some(template) = template else {
        return Ok(());
    };
    // A template may omit its metadata; the patch adds labels and annotations under it.
    if let Some(obj) = template.as_object_mut() {
        obj.entry("metadata")
            .or_insert_with(|| Value::Object(Default::default()));
    }
    let namespace = v_namespace(template);
    let pod: Pod =
        serde_json::from_value(template.clone()).map_err(|e| ManifestError::Resource {
            resource: resource.clone(),
            reason: format!("the pod template cannot be read: {e}"),
        })?;
    // Offline, the user asked for injection: the namespace counts as opted in.
    let opted_in = BTreeMap::from([(ann::INJECT.to_string(), ann::ENABLED.to_string())]);
    let result = match patch::decide(&pod, &namespace, &opted_in, cfg) {
        Decision::Skip(why) => format!("skipped: {why}"),
        Decision::Inject => {
            let p = patch::patch(&pod, cfg).map_err(|e| ManifestError::Resource {
                resource: resource.clone(),
                reason: e.to_string(),
            })?;
            json_patch::patch(template, &p).map_err(|e| ManifestError::Resource {
                resource: resource.clone(),
                reason: format!("the patch does not apply: {e}"),
            })?;
            "injected".to_string()
        }
    };
    outcomes.push(Outcome { resource, result });
    Ok(())
}

fn v_namespace(template: &Value) -> String {
    template["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> InjectConfig {
        InjectConfig::with_anchors("-----BEGIN CERTIFICATE-----\n".into())
    }

    const WORKLOADS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: { name: web, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  template:
    metadata: { labels: { app: web } }
    spec:
      containers: [{ name: app, image: web:1, ports: [{ containerPort: 8080 }] }]
---
apiVersion: v1
kind: Service
metadata: { name: web }
spec: { ports: [{ port: 80 }] }
---
apiVersion: batch/v1
kind: CronJob
metadata: { name: nightly }
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers: [{ name: job, image: job:1 }]
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: { name: solo, annotations: { musubi.io/inject: disabled } }
  spec: { containers: [{ name: a, image: a }] }
- apiVersion: apps/v1
  kind: StatefulSet
  metadata: { name: db }
  spec:
    serviceName: db
    selector: { matchLabels: { app: db } }
    template:
      metadata: { labels: { app: db } }
      spec: { containers: [{ name: db, image: db }] }
"#;

    #[test]
    fn injects_every_pod_template_and_reports() {
        let (out, outcomes) = inject(WORKLOADS, &cfg()).unwrap();
        let got: Vec<(&str, &str)> = outcomes
            .iter()
            .map(|o| (o.resource.as_str(), o.result.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("deployment/web", "injected"),
                ("cronjob/nightly", "injected"),
                (
                    "pod/solo",
                    "skipped: the pod says musubi.io/inject: disabled"
                ),
                ("statefulset/db", "injected"),
            ]
        );
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&out)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 4);
        let init_names = |v: &Value| -> Vec<String> {
            v["spec"]["initContainers"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|c| c["name"].as_str().unwrap().to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(
            init_names(&docs[0]["spec"]["template"]),
            ["musubi-init", "musubi-proxy"]
        );
        assert_eq!(docs[1]["kind"], "Service");
        assert_eq!(docs[1]["spec"]["ports"][0]["port"], 80);
        assert_eq!(
            init_names(&docs[2]["spec"]["jobTemplate"]["spec"]["template"]),
            ["musubi-init", "musubi-proxy"]
        );
        assert!(init_names(&docs[3]["items"][0]).is_empty());
        assert_eq!(
            init_names(&docs[3]["items"][1]["spec"]["template"]).len(),
            2
        );
        // Injecting the output again changes nothing.
        let (again, outcomes) = inject(&out, &cfg()).unwrap();
        assert_eq!(again, out);
        assert!(outcomes.iter().all(|o| o.result.starts_with("skipped")));
    }

    #[test]
    fn bad_input_is_named() {
        let e = inject("kind: Service\n---\n: : :\n", &cfg())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("document 2: not valid YAML"), "{e}");
        let e = inject(
            "kind: Deployment\nmetadata: {name: w}\nspec: {template: {spec: {containers: 5}}}\n",
            &cfg(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("deployment/w: the pod template cannot be read"),
            "{e}"
        );
        let e = inject(
            "kind: Pod\nmetadata: {name: p, annotations: {musubi.io/opaque-ports: x}}\nspec: {containers: []}\n",
            &cfg(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("musubi.io/opaque-ports"), "{e}");
    }
}
