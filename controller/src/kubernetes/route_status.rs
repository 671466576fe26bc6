//! Route status (Gateway API `RouteStatus`): for each Service in a route's `parentRefs`, an
//! entry under this controller's `controllerName` with `Accepted` and `ResolvedRefs`. Other
//! controllers' entries are kept as they are. What to write is a pure function of the object
//! as last seen and its verdict; the writer merges it onto the status subresource only when it
//! changes something.

use super::build::routes::RouteVerdict;
use crate::model::gateway::RouteKind;
use crate::model::routes::Condition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// This controller's name in route status (`GatewayController` format: domain/path).
pub const CONTROLLER_NAME: &str = "musubi.io/controller";
pub const GROUP: &str = "gateway.networking.k8s.io";
pub const VERSION: &str = "v1";
const MAX_MESSAGE: usize = 32_768;
const RETRY: Duration = Duration::from_secs(30);

fn condition(kind: &str, c: &Condition, generation: Option<i64>, since: &str) -> Value {
    let mut message = c.message.clone();
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    json!({
        "type": kind,
        "status": if c.ok { "True" } else { "False" },
        "reason": c.reason,
        "message": message,
        "observedGeneration": generation.unwrap_or(0),
        "lastTransitionTime": since,
    })
}

fn ours(entry: &Value) -> bool {
    entry.get("controllerName").and_then(Value::as_str) == Some(CONTROLLER_NAME)
}

/// The condition of `kind` in an entry's conditions.
fn find<'a>(entry: Option<&'a Value>, kind: &str) -> Option<&'a Value> {
    entry?
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

/// The merge patch that makes `obj`'s status say `v` (at `now`), or `None` when it already
/// does. Transition times change only when a condition's status does.
pub fn route_status_patch(obj: &DynamicObject, v: &RouteVerdict, now: &str) -> Option<Value> {
    let current: Vec<Value> = obj
        .data
        .get("status")
        .and_then(|s| s.get("parents"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let (mine, others): (Vec<Value>, Vec<Value>) = current.into_iter().partition(ours);
    let mut wanted = Vec::with_capacity(v.parents.len());
    let mut same = mine.len() == v.parents.len();
    for (parent_ref, status) in &v.parents {
        let before = mine.iter().find(|e| e.get("parentRef") == Some(parent_ref));
        let mut conditions = Vec::new();
        for (kind, c) in [
            ("Accepted", &status.accepted),
            ("ResolvedRefs", &status.resolved_refs),
        ] {
            let old = find(before, kind);
            let field = |k: &str| old.and_then(|o| o.get(k)).cloned();
            let new_status = if c.ok { "True" } else { "False" };
            let since =
                match field("lastTransitionTime").and_then(|t| t.as_str().map(str::to_string)) {
                    Some(t)
                        if field("status")
                            .and_then(|s| s.as_str().map(str::to_string))
                            .as_deref()
                            == Some(new_status) =>
                    {
                        t
                    }
                    _ => now.to_string(),
                };
            let cond = condition(kind, c, v.generation, &since);
            if old != Some(&cond) {
                same = false;
            }
            conditions.push(cond);
        }
        wanted.push(json!({
            "parentRef": parent_ref,
            "controllerName": CONTROLLER_NAME,
            "conditions": conditions,
        }));
    }
    if same {
        return None;
    }
    let mut parents = others;
    parents.extend(wanted);
    Some(json!({ "status": { "parents": parents } }))
}

pub fn resource(kind: RouteKind) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk(GROUP, VERSION, kind.name()),
        kind.plural(),
    )
}

/// Writes route status as verdicts change (and retries what did not take, every 30 s).
pub(super) fn spawn_writer(
    client: kube::Client,
    http: Store<DynamicObject>,
    grpc: Store<DynamicObject>,
    mut verdicts: watch::Receiver<Arc<Vec<RouteVerdict>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let current = verdicts.borrow_and_update().clone();
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
            for v in current.iter() {
                let ar = resource(v.kind);
                let store = match v.kind {
                    RouteKind::Http => &http,
                    RouteKind::Grpc => &grpc,
                };
                let key = ObjectRef::new_with(&v.name, ar.clone()).within(&v.namespace);
                let Some(obj) = store.get(&key) else { continue };
                let Some(body) = route_status_patch(&obj, v, &now) else {
                    continue;
                };
                let api = Api::<DynamicObject>::namespaced_with(client.clone(), &v.namespace, &ar);
                let params = PatchParams::default();
                if let Err(e) = api
                    .patch_status(&v.name, &params, &Patch::Merge(&body))
                    .await
                {
                    tracing::warn!(
                        kind = v.kind.name(), namespace = %v.namespace, name = %v.name, error = %e,
                        "could not write the route's status (may the controller patch {}/status?)",
                        v.kind.plural()
                    );
                }
            }
            tokio::select! {
                changed = verdicts.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RETRY) => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::routes::ParentStatus;

    fn verdict(accepted: bool, resolved: bool, generation: i64) -> RouteVerdict {
        let c = |ok, reason: &'static str| Condition {
            ok,
            reason,
            message: reason.to_string(),
        };
        RouteVerdict {
            kind: RouteKind::Http,
            namespace: "shop".into(),
            name: "r".into(),
            generation: Some(generation),
            parents: vec![(
                json!({ "group": "", "kind": "Service", "name": "api" }),
                ParentStatus {
                    parent: 0,
                    accepted: c(
                        accepted,
                        if accepted {
                            "Accepted"
                        } else {
                            "UnsupportedValue"
                        },
                    ),
                    resolved_refs: c(
                        resolved,
                        if resolved {
                            "ResolvedRefs"
                        } else {
                            "BackendNotFound"
                        },
                    ),
                },
            )],
        }
    }

    fn obj(status: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": { "name": "r", "namespace": "shop", "generation": 1 },
            "spec": {}, "status": status,
        }))
        .unwrap()
    }

    const NOW: &str = "2026-12-03T00:00:00Z";
    const LATER: &str = "2026-12-04T00:00:00Z";

    #[test]
    fn writes_our_entry_keeps_others_and_only_when_something_changes() {
        let other = json!({ "parentRef": { "name": "gw" }, "controllerName": "example.net/gw", "conditions": [] });
        let v = verdict(true, false, 1);
        let body =
            route_status_patch(&obj(json!({ "parents": [other.clone()] })), &v, NOW).unwrap();
        let parents = body["status"]["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[0], other, "another controller's entry is kept");
        assert_eq!(parents[1]["controllerName"], CONTROLLER_NAME);
        assert_eq!(parents[1]["parentRef"]["name"], "api");
        let conds = parents[1]["conditions"].as_array().unwrap();
        assert_eq!(conds[0]["type"], "Accepted");
        assert_eq!(conds[0]["status"], "True");
        assert_eq!(conds[1]["status"], "False");
        assert_eq!(conds[1]["reason"], "BackendNotFound");
        assert_eq!(conds[1]["observedGeneration"], 1);

        // Written already: nothing to do. A change of one condition keeps the other's time.
        let written = obj(body["status"].clone());
        assert_eq!(route_status_patch(&written, &v, LATER), None);
        let fixed = route_status_patch(&written, &verdict(true, true, 1), LATER).unwrap();
        let conds = &fixed["status"]["parents"][1]["conditions"];
        assert_eq!(
            conds[0]["lastTransitionTime"], NOW,
            "Accepted did not change"
        );
        assert_eq!(conds[1]["lastTransitionTime"], LATER, "ResolvedRefs did");
        // A new generation is written even when nothing else changed.
        assert!(route_status_patch(&written, &verdict(true, false, 2), LATER).is_some());
    }
}
