//! Gateway API `HTTPRoute` / `GRPCRoute` objects with a Service parent (GAMMA) and Musubi's
//! `FaultInjection` objects into the mesh's routes: each route used or refused on its own,
//! ranked oldest first (then by namespace/name), with a status per parent for the status
//! writer. A `FaultInjection` that does not validate gets `Accepted: False` on its own status,
//! and every route using it is refused.

use crate::kubernetes::crd::{Kind, Object, Refusal, Verdict};
use crate::model::Service;
use crate::model::gateway::{
    FaultInjectionFile, FaultSpec, RouteFile, RouteKind, RoutePolicyFile, RoutePolicySpec,
};
use crate::model::routes::{self, Condition, ParentStatus, RouteSet};
use serde_json::Value;

/// What the status writer puts on one route: for each of its `parentRefs` (as written in the
/// spec), the conditions.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteVerdict {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    pub parents: Vec<(Value, ParentStatus)>,
}

impl RouteKind {
    pub fn plural(self) -> &'static str {
        match self {
            RouteKind::Http => "httproutes",
            RouteKind::Grpc => "grpcroutes",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }
}

/// One listed route, decoded or not.
struct Listed<'a> {
    kind: RouteKind,
    object: &'a Object,
    decoded: Result<RouteFile, String>,
}

/// A route object's spec as the mesh file's route (same fields; `hostnames` do not apply to a
/// Service parent and are ignored).
fn decode(kind: RouteKind, o: &Object) -> Result<RouteFile, String> {
    let mut spec = o.spec.clone();
    if let Some(m) = spec.as_object_mut() {
        m.remove("hostnames");
        m.insert("name".into(), Value::from(o.name.clone()));
        m.insert("namespace".into(), Value::from(o.namespace.clone()));
        m.insert("kind".into(), Value::from(kind.name()));
    }
    serde_json::from_value(spec)
        .map_err(|e| format!("the spec uses what Musubi does not support: {e}"))
}

/// The faults that validate (for routes to use), and a verdict for each.
fn faults(
    objects: &[Object],
    verdicts: &mut Vec<Verdict>,
    problems: &mut Vec<String>,
) -> Vec<FaultInjectionFile> {
    let mut out = Vec::new();
    for o in objects {
        let checked = serde_json::from_value::<FaultSpec>(o.spec.clone())
            .map_err(|e| format!("the spec does not decode: {e}"))
            .and_then(|spec| {
                routes::check_fault(&spec)
                    .map(|()| spec)
                    .map_err(|e| e.to_string())
            });
        match checked {
            Ok(spec) => {
                verdicts.push(Verdict::new(Kind::FaultInjection, o, None));
                out.push(FaultInjectionFile {
                    name: o.name.clone(),
                    namespace: o.namespace.clone(),
                    spec,
                });
            }
            Err(msg) => {
                problems.push(format!("FaultInjection {}/{}: {msg}", o.namespace, o.name));
                verdicts.push(Verdict::new(
                    Kind::FaultInjection,
                    o,
                    Some((Refusal::InvalidSpec, msg)),
                ));
            }
        }
    }
    out
}

/// The RoutePolicies that validate, oldest first (for routes to use), and a verdict for each.
fn policies(
    objects: &[Object],
    verdicts: &mut Vec<Verdict>,
    problems: &mut Vec<String>,
) -> Vec<RoutePolicyFile> {
    let mut sorted: Vec<&Object> = objects.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.created, &a.namespace, &a.name).cmp(&(&b.created, &b.namespace, &b.name))
    });
    let mut out = Vec::new();
    for o in sorted {
        let checked = serde_json::from_value::<RoutePolicySpec>(o.spec.clone())
            .map_err(|e| format!("the spec does not decode: {e}"))
            .and_then(|spec| {
                routes::check_policy(&spec, "spec")
                    .map(|()| spec)
                    .map_err(|e| e.to_string())
            });
        match checked {
            Ok(spec) => {
                verdicts.push(Verdict::new(Kind::RoutePolicy, o, None));
                out.push(RoutePolicyFile {
                    name: o.name.clone(),
                    namespace: o.namespace.clone(),
                    spec,
                });
            }
            Err(msg) => {
                problems.push(format!("RoutePolicy {}/{}: {msg}", o.namespace, o.name));
                verdicts.push(Verdict::new(
                    Kind::RoutePolicy,
                    o,
                    Some((Refusal::InvalidSpec, msg)),
                ));
            }
        }
    }
    out
}

/// Every route (`None`: that kind has not listed, or its CRD is not installed), with the
/// services they attach to. Returns the routes by service and a verdict for each route.
pub(super) fn build(
    http: Option<&[Object]>,
    grpc: Option<&[Object]>,
    fault_objects: Option<&[Object]>,
    policy_objects: Option<&[Object]>,
    services: &[Service],
    verdicts: &mut Vec<Verdict>,
    problems: &mut Vec<String>,
) -> (RouteSet, Vec<RouteVerdict>) {
    let faults = faults(fault_objects.unwrap_or_default(), verdicts, problems);
    let policies = policies(policy_objects.unwrap_or_default(), verdicts, problems);
    let mut listed: Vec<Listed> = [(RouteKind::Http, http), (RouteKind::Grpc, grpc)]
        .into_iter()
        .flat_map(|(kind, objects)| {
            objects
                .unwrap_or_default()
                .iter()
                .map(move |object| Listed {
                    kind,
                    object,
                    decoded: decode(kind, object),
                })
        })
        .collect();
    // Gateway API's tie-break: the oldest route first, then "<namespace>/<name>".
    listed.sort_by(|a, b| {
        (&a.object.created, &a.object.namespace, &a.object.name).cmp(&(
            &b.object.created,
            &b.object.namespace,
            &b.object.name,
        ))
    });
    let usable: Vec<RouteFile> = listed
        .iter()
        .filter_map(|l| l.decoded.as_ref().ok().cloned())
        .collect();
    let (set, mut statuses) = routes::build_each(&usable, &faults, &policies, services);
    statuses.reverse();
    let mut out = Vec::with_capacity(listed.len());
    for l in &listed {
        let refs = l
            .object
            .spec
            .get("parentRefs")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let status = match &l.decoded {
            Ok(_) => statuses.pop().unwrap_or_default(),
            Err(msg) => (0..refs.len())
                .map(|parent| ParentStatus {
                    parent,
                    accepted: Condition {
                        ok: false,
                        reason: "UnsupportedValue",
                        message: msg.clone(),
                    },
                    resolved_refs: Condition {
                        ok: true,
                        reason: "ResolvedRefs",
                        message: "not checked: the route is not accepted".into(),
                    },
                })
                .collect(),
        };
        for s in &status {
            if !s.accepted.ok || !s.resolved_refs.ok {
                let c = if s.accepted.ok {
                    &s.resolved_refs
                } else {
                    &s.accepted
                };
                problems.push(format!(
                    "{} {}/{}: {}",
                    l.kind.name(),
                    l.object.namespace,
                    l.object.name,
                    c.message
                ));
            }
        }
        let parents = status
            .into_iter()
            .map(|s| (refs.get(s.parent).cloned().unwrap_or(Value::Null), s))
            .collect();
        out.push(RouteVerdict {
            kind: l.kind,
            namespace: l.object.namespace.clone(),
            name: l.object.name.clone(),
            generation: l.object.generation,
            parents,
        });
    }
    (set, out)
}
