//! The mesh file's routes into discovery's route rules: every route attached to each Service
//! its `parentRefs` name, producer routes (in the Service's namespace) for every client and
//! consumer routes (in another namespace) for that namespace's clients only, as GAMMA says.
//! Anything the proxy could not do as written (an unparseable regex, a backend that is not a
//! service, weights that send nothing, a filter Musubi does not support) refuses the file with
//! where it is and why; the last good mesh keeps serving.

use super::gateway::{
    BackendObject, FaultInjectionFile, RouteFile, RouteKind, RoutePolicyFile, RoutePolicySpec,
    RuleSpec, Timeouts,
};
use super::{Invalid, Service, invalid};
use musubi_proto::discovery::v1 as dpb;
use std::collections::BTreeMap;
use std::time::Duration;

/// Gateway API's weight range.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// Routes by the Service they attach to (its canonical authority).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteSet {
    pub producer: BTreeMap<String, Vec<dpb::Route>>,
    /// Keyed by (the clients' namespace, authority).
    pub consumer: BTreeMap<(String, String), Vec<dpb::Route>>,
}

/// What converting one route needs to know about the mesh.
struct Mesh<'a> {
    services: &'a [Service],
    faults: &'a [FaultInjectionFile],
    /// Valid ones only, in precedence order (oldest first).
    policies: &'a [RoutePolicyFile],
    /// Kubernetes: a backend that does not resolve marks its share (500) instead of refusing
    /// the route, and is noted in `unresolved`; the mesh file refuses it.
    soft: bool,
    unresolved: std::cell::RefCell<Vec<(&'static str, String)>>,
}

impl Mesh<'_> {
    /// The timeouts a RoutePolicy gives a rule that has none of its own: a policy naming the
    /// rule wins over one naming the whole route; among equals, the first (oldest).
    fn policy_timeouts(&self, r: &RouteFile, rule: &RuleSpec) -> Option<Timeouts> {
        let targets = |p: &&RoutePolicyFile, by_rule: bool| {
            p.namespace == r.namespace
                && p.spec.timeouts.is_some()
                && p.spec.target_refs.iter().any(|t| {
                    t.group == GATEWAY_GROUP
                        && t.kind == r.kind.name()
                        && t.name == r.name
                        && match (&t.section_name, by_rule) {
                            (Some(s), true) => rule.name.as_deref() == Some(s.as_str()),
                            (None, false) => true,
                            _ => false,
                        }
                })
        };
        let p = self.policies.iter().find(|p| targets(p, true));
        let p = p.or_else(|| self.policies.iter().find(|p| targets(p, false)));
        p.and_then(|p| p.spec.timeouts.clone())
    }

    fn service(&self, name: &str, namespace: &str, port: Option<u16>) -> Vec<&Service> {
        self.services
            .iter()
            .filter(|s| {
                s.name == name && s.namespace == namespace && port.is_none_or(|p| p == s.port)
            })
            .collect()
    }
}

/// A condition of a route's status for one parent (Gateway API `Accepted`, `ResolvedRefs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Condition {
    fn yes(reason: &'static str, message: impl Into<String>) -> Condition {
        Condition {
            ok: true,
            reason,
            message: message.into(),
        }
    }

    fn no(reason: &'static str, message: impl Into<String>) -> Condition {
        Condition {
            ok: false,
            reason,
            message: message.into(),
        }
    }
}

/// What became of one route for one of its `parentRefs` (index into them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentStatus {
    pub parent: usize,
    pub accepted: Condition,
    pub resolved_refs: Condition,
}

/// Routes from the mesh file: the first problem refuses the whole file.
pub fn build(
    routes: &[RouteFile],
    faults: &[FaultInjectionFile],
    policies: &[RoutePolicyFile],
    services: &[Service],
) -> Result<RouteSet, Invalid> {
    for (i, p) in policies.iter().enumerate() {
        check_policy(&p.spec, &format!("routePolicies[{i}]"))?;
    }
    let mesh = Mesh {
        services,
        faults,
        policies,
        soft: false,
        unresolved: Default::default(),
    };
    for (i, f) in faults.iter().enumerate() {
        fault(
            &f.spec,
            &format!("faultInjections[{i}]"),
            RouteKind::Http,
            true,
        )?;
    }
    let mut set = RouteSet::default();
    for (i, r) in routes.iter().enumerate() {
        if routes[..i]
            .iter()
            .any(|o| o.name == r.name && o.namespace == r.namespace && o.kind == r.kind)
        {
            return Err(invalid(
                format!("routes[{i}]"),
                "duplicate route (same kind, name and namespace)",
                r.name.clone(),
            ));
        }
        attach(&mesh, r, i, &format!("routes[{i}]"), &mut set, true)?;
    }
    Ok(set)
}

/// Routes from Kubernetes, `routes` ranked oldest first: each is used or refused on its own,
/// and a backend that does not resolve answers 500 for its share. Returns each route's status
/// per parent.
pub fn build_each(
    routes: &[RouteFile],
    faults: &[FaultInjectionFile],
    policies: &[RoutePolicyFile],
    services: &[Service],
) -> (RouteSet, Vec<Vec<ParentStatus>>) {
    let mut set = RouteSet::default();
    let mut statuses = Vec::with_capacity(routes.len());
    for (i, r) in routes.iter().enumerate() {
        let mesh = Mesh {
            services,
            faults,
            policies,
            soft: true,
            unresolved: Default::default(),
        };
        let mut own = RouteSet::default();
        let path = format!("{}/{}", r.namespace, r.name);
        let status = match attach(&mesh, r, i, &path, &mut own, false) {
            Err(e) => r
                .parent_refs
                .iter()
                .enumerate()
                .map(|(parent, _)| ParentStatus {
                    parent,
                    accepted: Condition::no("UnsupportedValue", e.to_string()),
                    resolved_refs: Condition::yes(
                        "ResolvedRefs",
                        "not checked: the route is not accepted",
                    ),
                })
                .collect(),
            Ok(parents) => {
                merge(&mut set, own);
                let unresolved = mesh.unresolved.take();
                let resolved = match unresolved.first() {
                    None => Condition::yes("ResolvedRefs", "every backend resolves"),
                    Some((reason, _)) => Condition::no(
                        reason,
                        unresolved
                            .iter()
                            .map(|(_, m)| m.as_str())
                            .collect::<Vec<_>>()
                            .join("; "),
                    ),
                };
                parents
                    .into_iter()
                    .enumerate()
                    .map(|(parent, found)| ParentStatus {
                        parent,
                        accepted: found,
                        resolved_refs: resolved.clone(),
                    })
                    .collect()
            }
        };
        statuses.push(status);
    }
    (set, statuses)
}

fn merge(into: &mut RouteSet, from: RouteSet) {
    for (k, v) in from.producer {
        into.producer.entry(k).or_default().extend(v);
    }
    for (k, v) in from.consumer {
        into.consumer.entry(k).or_default().extend(v);
    }
}

/// Attaches one route to each parent it names; returns, per parent, whether it was accepted
/// there. With `strict`, a parent that is not found is an error.
fn attach(
    mesh: &Mesh,
    r: &RouteFile,
    rank: usize,
    path: &str,
    set: &mut RouteSet,
    strict: bool,
) -> Result<Vec<Condition>, Invalid> {
    if r.parent_refs.is_empty() {
        return Err(invalid(
            path.to_string(),
            "a route needs a Service in parentRefs",
            r.name.clone(),
        ));
    }
    let mut found = Vec::new();
    for (j, p) in r.parent_refs.iter().enumerate() {
        let pp = format!("{path}.parentRefs[{j}]");
        if p.kind.as_deref().is_some_and(|k| k != "Service")
            || p.group
                .as_deref()
                .is_some_and(|g| !g.is_empty() && g != "core")
        {
            let msg = "only a Service (group \"\", kind Service) can be a parent in the mesh";
            if strict {
                return Err(invalid(pp, msg, p.name.clone()));
            }
            found.push(Condition::no("NotAllowedByListeners", msg));
            continue;
        }
        if p.section_name.is_some() {
            let msg = "sectionName is not supported for a Service parent; name its port instead";
            if strict {
                return Err(invalid(pp, msg, "sectionName"));
            }
            found.push(Condition::no("UnsupportedValue", msg));
            continue;
        }
        let ns = p.namespace.as_deref().unwrap_or(&r.namespace);
        let parents = mesh.service(&p.name, ns, p.port);
        if parents.is_empty() {
            let port = p.port.map(|p| format!(" port {p}")).unwrap_or_default();
            let msg = format!("no service {}.{ns}{port} in the mesh", p.name);
            if strict {
                return Err(invalid(pp, msg, p.name.clone()));
            }
            found.push(Condition::no("NoMatchingParent", msg));
            continue;
        }
        for parent in parents {
            let rules = convert(mesh, r, rank, parent, path)?;
            let authority = parent.proto.authority.clone();
            if ns == r.namespace {
                set.producer.entry(authority).or_default().extend(rules);
            } else {
                set.consumer
                    .entry((r.namespace.clone(), authority))
                    .or_default()
                    .extend(rules);
            }
        }
        found.push(Condition::yes("Accepted", "routes requests to the Service"));
    }
    Ok(found)
}

/// One route's rules for one parent.
fn convert(
    mesh: &Mesh,
    r: &RouteFile,
    rank: usize,
    parent: &Service,
    path: &str,
) -> Result<Vec<dpb::Route>, Invalid> {
    let mut out = Vec::new();
    for (k, rule) in r.rules.iter().enumerate() {
        let rp = format!("{path}.rules[{k}]");
        out.push(convert_rule(mesh, r, rule, &rp, parent, rank, k)?);
    }
    if out.is_empty() {
        // No rules: every request to the parent itself (Gateway API's default rule).
        let backend = dpb::WeightedBackend {
            authority: parent.proto.authority.clone(),
            weight: 1,
            ..Default::default()
        };
        out.push(dpb::Route {
            name: format!("{}/{}", r.namespace, r.name),
            backends: vec![backend],
            rank: rank as u32,
            kind: kind_pb(r.kind),
            ..Default::default()
        });
    }
    Ok(out)
}

fn kind_pb(k: RouteKind) -> i32 {
    match k {
        RouteKind::Http => dpb::RouteKind::Http as i32,
        RouteKind::Grpc => dpb::RouteKind::Grpc as i32,
    }
}

fn convert_rule(
    mesh: &Mesh,
    r: &RouteFile,
    rule: &RuleSpec,
    path: &str,
    parent: &Service,
    rank: usize,
    index: usize,
) -> Result<dpb::Route, Invalid> {
    let mut matches = rule
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| route_match(m, r.kind, &format!("{path}.matches[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    if matches.is_empty() && r.kind == RouteKind::Http {
        // Gateway API's default, written out as the API server writes it: prefix "/".
        matches.push(dpb::RouteMatch {
            path: Some(dpb::StringMatch {
                kind: dpb::MatchKind::Prefix as i32,
                value: "/".into(),
            }),
            ..Default::default()
        });
    }
    let filters = rule
        .filters
        .iter()
        .enumerate()
        .filter_map(|(i, f)| {
            filter(mesh, f, r, parent, &format!("{path}.filters[{i}]"), false).transpose()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let prefix_modifier = rule.filters.iter().any(|f| {
        let p = f
            .request_redirect
            .as_ref()
            .and_then(|x| x.path.as_ref())
            .or(f.url_rewrite.as_ref().and_then(|x| x.path.as_ref()));
        p.is_some_and(|p| p.kind == "ReplacePrefixMatch")
    });
    // A match without a path is the prefix "/".
    let not_prefix = |m: &dpb::RouteMatch| {
        m.path
            .as_ref()
            .is_some_and(|p| p.kind != dpb::MatchKind::Prefix as i32)
    };
    if prefix_modifier && matches.iter().any(not_prefix) {
        return Err(invalid(
            format!("{path}.filters"),
            "ReplacePrefixMatch needs every match to be a PathPrefix",
            "ReplacePrefixMatch",
        ));
    }
    let redirect = rule.filters.iter().any(|f| f.kind == "RequestRedirect");
    if redirect && rule.filters.iter().any(|f| f.kind == "URLRewrite") {
        return Err(invalid(
            format!("{path}.filters"),
            "RequestRedirect and URLRewrite cannot both be set",
            "RequestRedirect",
        ));
    }
    let mut backends = Vec::new();
    for (i, b) in rule.backend_refs.iter().enumerate() {
        let bp = format!("{path}.backendRefs[{i}]");
        let weight = b.weight.unwrap_or(1);
        if weight > MAX_WEIGHT {
            return Err(invalid(
                format!("{bp}.weight"),
                format!("{weight} is over {MAX_WEIGHT}"),
                format!("weight: {weight}"),
            ));
        }
        let (authority, unresolved) =
            match backend_authority(mesh, &b.object, &r.namespace, parent, &bp)? {
                Ok(a) => (a, String::new()),
                Err(why) => (String::new(), why),
            };
        let filters = b
            .filters
            .iter()
            .enumerate()
            .filter_map(|(j, f)| {
                filter(mesh, f, r, parent, &format!("{bp}.filters[{j}]"), true).transpose()
            })
            .collect::<Result<Vec<_>, _>>()?;
        backends.push(dpb::WeightedBackend {
            authority,
            weight,
            filters,
            invalid: unresolved,
        });
    }
    if backends.is_empty() && !redirect {
        return Err(invalid(
            format!("{path}.backendRefs"),
            "a rule without backendRefs sends nowhere (only a RequestRedirect rule may have none)",
            rule.name.clone().unwrap_or_else(|| r.name.clone()),
        ));
    }
    if !backends.is_empty() && backends.iter().all(|b| b.weight == 0) {
        return Err(invalid(
            format!("{path}.backendRefs"),
            "every weight is 0: the rule would send nothing",
            "weight: 0",
        ));
    }
    let t = rule
        .timeouts
        .clone()
        .or_else(|| mesh.policy_timeouts(r, rule))
        .unwrap_or_default();
    let (request, backend_request) = timeouts(&t, &format!("{path}.timeouts"))?;
    Ok(dpb::Route {
        name: format!("{}/{}", r.namespace, r.name),
        matches,
        backends,
        timeout: request.map(pb_duration),
        backend_timeout: backend_request.map(pb_duration),
        filters,
        rank: rank as u32,
        rule_index: index as u32,
        rule_name: rule.name.clone().unwrap_or_default(),
        kind: kind_pb(r.kind),
        retry: None,
    })
}

fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// GEP-2257: `^([0-9]{1,5}(h|m|s|ms)){1,4}$`.
/// Gateway API's group, which route `targetRefs` name.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// Whether a RoutePolicy can be used: it targets routes, and its timeouts parse and agree.
pub fn check_policy(p: &RoutePolicySpec, path: &str) -> Result<(), Invalid> {
    if p.target_refs.is_empty() {
        return Err(invalid(
            format!("{path}.targetRefs"),
            "a policy needs at least one target",
            "targetRefs",
        ));
    }
    for (i, t) in p.target_refs.iter().enumerate() {
        if t.group != GATEWAY_GROUP || !matches!(t.kind.as_str(), "HTTPRoute" | "GRPCRoute") {
            return Err(invalid(
                format!("{path}.targetRefs[{i}]"),
                format!(
                    "{}/{} is not a route (targets are {GATEWAY_GROUP} HTTPRoute or GRPCRoute)",
                    t.group, t.kind
                ),
                t.kind.clone(),
            ));
        }
    }
    if let Some(t) = &p.timeouts {
        timeouts(t, &format!("{path}.timeouts"))?;
    }
    Ok(())
}

/// `request` and `backendRequest`, parsed, with backendRequest ≤ request.
fn timeouts(t: &Timeouts, path: &str) -> Result<(Option<Duration>, Option<Duration>), Invalid> {
    let request = t
        .request
        .as_deref()
        .map(|d| duration(d, &format!("{path}.request")))
        .transpose()?;
    let backend_request = t
        .backend_request
        .as_deref()
        .map(|d| duration(d, &format!("{path}.backendRequest")))
        .transpose()?;
    if let (Some(req), Some(b)) = (request, backend_request)
        && !req.is_zero()
        && b > req
    {
        return Err(invalid(
            path.to_string(),
            "backendRequest must not be longer than request",
            t.backend_request.clone().unwrap_or_default(),
        ));
    }
    Ok((request, backend_request))
}

pub fn duration(text: &str, path: &str) -> Result<Duration, Invalid> {
    let bad = || {
        invalid(
            path.to_string(),
            format!("{text:?} is not a Gateway API duration (like 10s, 1m30s, 500ms)"),
            text.to_string(),
        )
    };
    let mut rest = text;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * u32::try_from(n).map_err(|_| bad())?;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

/// The backend's authority. One that does not resolve is an error in the mesh file; from
/// Kubernetes it is `Ok(Err(why))` (noted for the status: its share answers 500 with why).
fn backend_authority(
    mesh: &Mesh,
    b: &BackendObject,
    route_ns: &str,
    parent: &Service,
    path: &str,
) -> Result<Result<String, String>, Invalid> {
    let ns = b.namespace.as_deref().unwrap_or(route_ns);
    let port = b.port.unwrap_or(parent.port);
    let (reason, why) = if b.kind.as_deref().is_some_and(|k| k != "Service")
        || b.group
            .as_deref()
            .is_some_and(|g| !g.is_empty() && g != "core")
    {
        let kind = b.kind.as_deref().unwrap_or("");
        (
            "InvalidKind",
            format!(
                "backend {} is not a Service (kind {kind:?} is not supported)",
                b.name
            ),
        )
    } else {
        match mesh.service(&b.name, ns, Some(port)).first() {
            Some(s) => return Ok(Ok(s.proto.authority.clone())),
            None => (
                "BackendNotFound",
                format!(
                    "backend {}.{ns} port {port} is not a service in the mesh (BackendNotFound)",
                    b.name
                ),
            ),
        }
    };
    if !mesh.soft {
        return Err(invalid(path.to_string(), why, b.name.clone()));
    }
    mesh.unresolved.borrow_mut().push((reason, why.clone()));
    Ok(Err(why))
}

mod filters;
mod matches;

pub use filters::check_fault;
use filters::{fault, filter};
use matches::route_match;

#[cfg(test)]
mod tests;
