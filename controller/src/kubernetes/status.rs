//! The status writer: puts what the build made of each policy object on the object, as an
//! `Accepted` condition (True, or False with the reason and what was dropped). The decision of
//! what to write is a pure function of the object as last seen and its verdict; the writer
//! applies it (server-side apply on the status subresource) only when it changes something.

use super::crd::{self, Kind, Verdict};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub const CONDITION: &str = "Accepted";
pub const FIELD_MANAGER: &str = "musubi-controller";
/// Longest condition message written (the rest is cut, marked with "…").
const MAX_MESSAGE: usize = 4096;
/// How often failed writes (and objects the store has not caught up on) are tried again.
const RETRY: Duration = Duration::from_secs(30);

/// The condition a verdict asks for (without its transition time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
    pub observed_generation: Option<i64>,
}

pub fn wanted(v: &Verdict) -> Wanted {
    let (status, reason, message) = match &v.refused {
        None => ("True", "Accepted", format!("{} is in use", v.kind.name())),
        Some((refusal, msg)) => ("False", refusal.reason(), cut(msg)),
    };
    Wanted {
        status,
        reason,
        message,
        observed_generation: v.generation,
    }
}

fn cut(msg: &str) -> String {
    if msg.len() <= MAX_MESSAGE {
        return msg.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &msg[..end])
}

/// The object's current `Accepted` condition, if any.
fn current_condition(obj: &DynamicObject) -> Option<&Value> {
    obj.data
        .get("status")?
        .get("conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(CONDITION))
}

/// The server-side-apply body that makes `obj`'s status say `v` (at `now`, RFC 3339), or
/// `None` when it already does. The transition time changes only when the status does.
pub fn status_patch(obj: &DynamicObject, v: &Verdict, now: &str) -> Option<Value> {
    let w = wanted(v);
    let current = current_condition(obj);
    let field = |k: &str| current.and_then(|c| c.get(k));
    let same = field("status").and_then(Value::as_str) == Some(w.status)
        && field("reason").and_then(Value::as_str) == Some(w.reason)
        && field("message").and_then(Value::as_str) == Some(w.message.as_str())
        && field("observedGeneration").and_then(Value::as_i64) == w.observed_generation;
    if same {
        return None;
    }
    let since = match field("lastTransitionTime").and_then(Value::as_str) {
        Some(t) if field("status").and_then(Value::as_str) == Some(w.status) => t.to_string(),
        _ => now.to_string(),
    };
    let mut condition = json!({
        "type": CONDITION,
        "status": w.status,
        "reason": w.reason,
        "message": w.message,
        "lastTransitionTime": since,
    });
    if let (Some(g), Some(c)) = (w.observed_generation, condition.as_object_mut()) {
        c.insert("observedGeneration".into(), json!(g));
    }
    Some(json!({
        "apiVersion": format!("{}/{}", crd::GROUP, crd::VERSION),
        "kind": v.kind.name(),
        "metadata": { "name": v.name, "namespace": v.namespace },
        "status": { "conditions": [condition] },
    }))
}

/// Where each kind's objects are.
pub(super) struct Objects {
    pub mesh_tls: (ApiResource, Store<DynamicObject>),
    pub authorization: (ApiResource, Store<DynamicObject>),
    pub faults: (ApiResource, Store<DynamicObject>),
    pub route_policies: (ApiResource, Store<DynamicObject>),
}

impl Objects {
    fn of(&self, kind: Kind) -> &(ApiResource, Store<DynamicObject>) {
        match kind {
            Kind::MeshTls => &self.mesh_tls,
            Kind::AuthorizationPolicy => &self.authorization,
            Kind::FaultInjection => &self.faults,
            Kind::RoutePolicy => &self.route_policies,
        }
    }
}

/// Writes the verdicts as they change (and retries what did not take, every 30 s).
pub(super) fn spawn_writer(
    client: kube::Client,
    objects: Objects,
    mut verdicts: watch::Receiver<Arc<Vec<Verdict>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let current = verdicts.borrow_and_update().clone();
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
            for v in current.iter() {
                let (ar, store) = objects.of(v.kind);
                let key = ObjectRef::new_with(&v.name, ar.clone()).within(&v.namespace);
                let Some(obj) = store.get(&key) else {
                    continue;
                };
                let Some(body) = status_patch(&obj, v, &now) else {
                    continue;
                };
                let api = Api::<DynamicObject>::namespaced_with(client.clone(), &v.namespace, ar);
                let params = PatchParams::apply(FIELD_MANAGER).force();
                match api
                    .patch_status(&v.name, &params, &Patch::Apply(&body))
                    .await
                {
                    Ok(_) => tracing::debug!(
                        kind = v.kind.name(), namespace = %v.namespace, name = %v.name,
                        "status written"
                    ),
                    Err(e) => tracing::warn!(
                        kind = v.kind.name(), namespace = %v.namespace, name = %v.name, error = %e,
                        "could not write the status (is the CRD's status subresource installed, \
                         and may the controller patch {}/status?)", v.kind.plural()
                    ),
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
    use crate::kubernetes::crd::Refusal;

    fn obj(status: Value) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "policy.musubi.io/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": { "name": "p", "namespace": "shop", "generation": 2 },
            "spec": {},
            "status": status,
        }))
        .unwrap()
    }

    fn verdict(refused: Option<(Refusal, &str)>, generation: i64) -> Verdict {
        Verdict {
            kind: Kind::AuthorizationPolicy,
            namespace: "shop".into(),
            name: "p".into(),
            generation: Some(generation),
            refused: refused.map(|(r, m)| (r, m.to_string())),
        }
    }

    fn cond(status: &str, reason: &str, message: &str, generation: i64, since: &str) -> Value {
        json!({ "conditions": [{
            "type": "Accepted", "status": status, "reason": reason, "message": message,
            "observedGeneration": generation, "lastTransitionTime": since,
        }]})
    }

    const NOW: &str = "2026-12-01T00:00:00Z";
    const BEFORE: &str = "2026-11-01T00:00:00Z";

    #[test]
    fn writes_only_what_changes() {
        let bad = Some((Refusal::InvalidRules, "allow[1].identity: bad"));
        let accepted = cond(
            "True",
            "Accepted",
            "AuthorizationPolicy is in use",
            2,
            BEFORE,
        );
        // (current status, verdict, written transition time: None = no write)
        let cases = [
            (json!({}), verdict(None, 2), Some(NOW)),
            (accepted.clone(), verdict(None, 2), None),
            // A new generation, still accepted: written, the transition time kept.
            (accepted.clone(), verdict(None, 3), Some(BEFORE)),
            // Accepted → refused: a transition.
            (accepted, verdict(bad, 2), Some(NOW)),
            (
                cond("False", "InvalidRules", "allow[1].identity: bad", 2, BEFORE),
                verdict(bad, 2),
                None,
            ),
            // Still refused, another message: written, same transition time.
            (
                cond("False", "InvalidRules", "allow[0].identity: bad", 2, BEFORE),
                verdict(bad, 2),
                Some(BEFORE),
            ),
        ];
        for (i, (status, v, want)) in cases.into_iter().enumerate() {
            let got = status_patch(&obj(status), &v, NOW);
            let since = got.as_ref().map(|b| {
                b["status"]["conditions"][0]["lastTransitionTime"]
                    .as_str()
                    .unwrap()
                    .to_string()
            });
            assert_eq!(since.as_deref(), want, "case {i}");
            if let Some(b) = got {
                let c = &b["status"]["conditions"][0];
                let w = wanted(&v);
                assert_eq!(c["status"], w.status, "case {i}");
                assert_eq!(c["reason"], w.reason, "case {i}");
                assert_eq!(c["observedGeneration"], json!(v.generation), "case {i}");
                assert_eq!(b["kind"], "AuthorizationPolicy");
                assert_eq!(b["metadata"]["namespace"], "shop");
            }
        }
    }

    #[test]
    fn long_messages_are_cut() {
        let long = "é".repeat(MAX_MESSAGE);
        let v = verdict(Some((Refusal::InvalidRules, long.as_str())), 1);
        let m = wanted(&v).message;
        assert!(
            m.len() <= MAX_MESSAGE + "…".len() && m.ends_with('…'),
            "{}",
            m.len()
        );
    }
}
