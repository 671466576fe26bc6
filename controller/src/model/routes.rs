//! The mesh file's routes into discovery's route rules: every route attached to each Service
//! its `parentRefs` name, producer routes (in the Service's namespace) for every client and
//! consumer routes (in another namespace) for that namespace's clients only, as GAMMA says.
//! Anything the proxy could not do as written (an unparseable regex, a backend that is not a
//! service, weights that send nothing, a filter Musubi does not support) refuses the file with
//! where it is and why; the last good mesh keeps serving.

use super::gateway::{
    AbortSpec, BackendObject, FaultInjectionFile, FaultSpec, FilterSpec, GrpcCode,
    HeaderModifierSpec, MatchSpec, MethodSpec, PathModifierSpec, RouteFile, RouteKind, RuleSpec,
};
use super::{Invalid, Service, invalid};
use musubi_proto::discovery::v1 as dpb;
use std::collections::BTreeMap;
use std::time::Duration;

/// Gateway API's weight range.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// The proxy's limit on one regular expression (`musubi-proxy`'s `route::MAX_REGEX_BYTES`).
const MAX_REGEX_BYTES: usize = 1024;
/// Fractions of faults, from a percentage with up to four decimals.
const PERCENT_DENOMINATOR: u32 = 1_000_000;

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
    /// Kubernetes: a backend that does not resolve marks its share (500) instead of refusing
    /// the route, and is noted in `unresolved`; the mesh file refuses it.
    soft: bool,
    unresolved: std::cell::RefCell<Vec<(&'static str, String)>>,
}

impl Mesh<'_> {
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
    services: &[Service],
) -> Result<RouteSet, Invalid> {
    let mesh = Mesh {
        services,
        faults,
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
    services: &[Service],
) -> (RouteSet, Vec<Vec<ParentStatus>>) {
    let mut set = RouteSet::default();
    let mut statuses = Vec::with_capacity(routes.len());
    for (i, r) in routes.iter().enumerate() {
        let mesh = Mesh {
            services,
            faults,
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
    let t = rule.timeouts.clone().unwrap_or_default();
    let request = t
        .request
        .as_deref()
        .map(|d| duration(d, &format!("{path}.timeouts.request")))
        .transpose()?;
    let backend_request = t
        .backend_request
        .as_deref()
        .map(|d| duration(d, &format!("{path}.timeouts.backendRequest")))
        .transpose()?;
    if let (Some(req), Some(b)) = (request, backend_request)
        && !req.is_zero()
        && b > req
    {
        return Err(invalid(
            format!("{path}.timeouts"),
            "backendRequest must not be longer than request",
            t.backend_request.unwrap_or_default(),
        ));
    }
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

fn match_kind(
    kind: Option<&str>,
    allowed: &[(&str, dpb::MatchKind)],
    default: dpb::MatchKind,
    path: &str,
) -> Result<i32, Invalid> {
    match kind {
        None => Ok(default as i32),
        Some(k) => allowed
            .iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| *v as i32)
            .ok_or_else(|| {
                let names: Vec<&str> = allowed.iter().map(|(n, _)| *n).collect();
                invalid(
                    format!("{path}.type"),
                    format!("{k:?} is not one of {}", names.join(", ")),
                    k.to_string(),
                )
            }),
    }
}

const VALUE_KINDS: [(&str, dpb::MatchKind); 2] = [
    ("Exact", dpb::MatchKind::Exact),
    ("RegularExpression", dpb::MatchKind::Regex),
];

/// A regular expression the proxy will accept: it compiles (anchored, as the proxy runs it)
/// and is within the proxy's size limit.
fn check_regex(pattern: &str, path: &str) -> Result<(), Invalid> {
    if pattern.len() > MAX_REGEX_BYTES {
        return Err(invalid(
            path.to_string(),
            format!(
                "regular expression of {} bytes is over {MAX_REGEX_BYTES}",
                pattern.len()
            ),
            pattern.to_string(),
        ));
    }
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(256 * 1024)
        .build()
        .map(|_| ())
        .map_err(|e| {
            let first = e.to_string().lines().last().unwrap_or_default().to_string();
            invalid(
                path.to_string(),
                format!("regular expression {pattern:?} does not parse: {first}"),
                pattern.to_string(),
            )
        })
}

fn named(
    m: &super::gateway::NamedMatchSpec,
    path: &str,
    header: bool,
) -> Result<dpb::NamedMatch, Invalid> {
    let kind = match_kind(m.kind.as_deref(), &VALUE_KINDS, dpb::MatchKind::Exact, path)?;
    if header && http::HeaderName::from_bytes(m.name.as_bytes()).is_err() {
        return Err(invalid(
            format!("{path}.name"),
            format!("{:?} is not a header name", m.name),
            m.name.clone(),
        ));
    }
    if kind == dpb::MatchKind::Regex as i32 {
        check_regex(&m.value, &format!("{path}.value"))?;
    }
    Ok(dpb::NamedMatch {
        name: m.name.clone(),
        kind,
        value: m.value.clone(),
    })
}

fn route_match(m: &MatchSpec, kind: RouteKind, path: &str) -> Result<dpb::RouteMatch, Invalid> {
    let mut out = dpb::RouteMatch::default();
    if let Some(p) = &m.path {
        if kind == RouteKind::Grpc {
            return Err(invalid(
                format!("{path}.path"),
                "a GRPCRoute matches method, not path",
                "path",
            ));
        }
        let pp = format!("{path}.path");
        let k = match_kind(
            p.kind.as_deref(),
            &[
                ("Exact", dpb::MatchKind::Exact),
                ("PathPrefix", dpb::MatchKind::Prefix),
                ("RegularExpression", dpb::MatchKind::Regex),
            ],
            dpb::MatchKind::Prefix,
            &pp,
        )?;
        let value = p.value.clone().unwrap_or_else(|| "/".into());
        if k == dpb::MatchKind::Regex as i32 {
            check_regex(&value, &format!("{pp}.value"))?;
        } else if !value.starts_with('/') {
            return Err(invalid(
                format!("{pp}.value"),
                format!("{value:?} does not start with /"),
                value,
            ));
        }
        out.path = Some(dpb::StringMatch { kind: k, value });
    } else if kind == RouteKind::Http {
        // Gateway API's default, as the API server writes it.
        out.path = Some(dpb::StringMatch {
            kind: dpb::MatchKind::Prefix as i32,
            value: "/".into(),
        });
    }
    out.header_matches = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| named(h, &format!("{path}.headers[{i}]"), true))
        .collect::<Result<_, _>>()?;
    if kind == RouteKind::Grpc && !m.query_params.is_empty() {
        return Err(invalid(
            format!("{path}.queryParams"),
            "a GRPCRoute has no query parameters",
            "queryParams",
        ));
    }
    out.query_params = m
        .query_params
        .iter()
        .enumerate()
        .map(|(i, q)| named(q, &format!("{path}.queryParams[{i}]"), false))
        .collect::<Result<_, _>>()?;
    match (&m.method, kind) {
        (None, _) => {}
        (Some(MethodSpec::Http(method)), RouteKind::Http) => {
            const METHODS: [&str; 9] = [
                "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
            ];
            if !METHODS.contains(&method.as_str()) {
                return Err(invalid(
                    format!("{path}.method"),
                    format!(
                        "{method:?} is not an HTTP method Gateway API knows ({})",
                        METHODS.join(", ")
                    ),
                    method.clone(),
                ));
            }
            out.method = method.clone();
        }
        (Some(MethodSpec::Grpc(g)), RouteKind::Grpc) => {
            let mp = format!("{path}.method");
            let k = match_kind(g.kind.as_deref(), &VALUE_KINDS, dpb::MatchKind::Exact, &mp)?;
            if g.service.is_none() && g.method.is_none() {
                return Err(invalid(
                    mp,
                    "a method match names a service, a method or both",
                    "method",
                ));
            }
            for v in [&g.service, &g.method].into_iter().flatten() {
                if k == dpb::MatchKind::Regex as i32 {
                    check_regex(v, &mp)?;
                } else if v.contains('/') || v.is_empty() {
                    return Err(invalid(
                        mp.clone(),
                        format!("{v:?} is not a gRPC service or method name"),
                        v.clone(),
                    ));
                }
            }
            out.grpc = Some(dpb::GrpcMethodMatch {
                kind: k,
                service: g.service.clone().unwrap_or_default(),
                method: g.method.clone().unwrap_or_default(),
            });
        }
        (Some(_), RouteKind::Http) => {
            return Err(invalid(
                format!("{path}.method"),
                "an HTTPRoute method is a string (GET, POST, ...)",
                "method",
            ));
        }
        (Some(_), RouteKind::Grpc) => {
            return Err(invalid(
                format!("{path}.method"),
                "a GRPCRoute method is {type, service, method}",
                "method",
            ));
        }
    }
    Ok(out)
}

fn header_modifier(
    m: Option<&HeaderModifierSpec>,
    path: &str,
) -> Result<dpb::HeaderModifier, Invalid> {
    let m = m.ok_or_else(|| {
        invalid(
            path.to_string(),
            "the filter's settings are missing",
            "HeaderModifier",
        )
    })?;
    let pair = |h: &super::gateway::HeaderSpec| -> Result<dpb::HeaderValue, Invalid> {
        if http::HeaderName::from_bytes(h.name.as_bytes()).is_err()
            || http::HeaderValue::from_str(&h.value).is_err()
        {
            return Err(invalid(
                path.to_string(),
                format!("{:?}: {:?} is not a valid header", h.name, h.value),
                h.name.clone(),
            ));
        }
        Ok(dpb::HeaderValue {
            name: h.name.clone(),
            value: h.value.clone(),
        })
    };
    for n in &m.remove {
        if http::HeaderName::from_bytes(n.as_bytes()).is_err() {
            return Err(invalid(
                path.to_string(),
                format!("{n:?} is not a header name"),
                n.clone(),
            ));
        }
    }
    Ok(dpb::HeaderModifier {
        set: m.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: m.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: m.remove.clone(),
    })
}

fn path_modifier(p: &PathModifierSpec, path: &str) -> Result<dpb::PathModifier, Invalid> {
    use dpb::path_modifier::Kind;
    let kind = match (
        p.kind.as_str(),
        &p.replace_full_path,
        &p.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(v), None) if v.starts_with('/') => {
            Kind::ReplaceFullPath(v.clone())
        }
        ("ReplacePrefixMatch", None, Some(v)) if v.is_empty() || v.starts_with('/') => {
            Kind::ReplacePrefixMatch(v.clone())
        }
        (k, _, _) => {
            return Err(invalid(
                path.to_string(),
                format!(
                    "path modifier {k:?} needs exactly its own field (replaceFullPath or replacePrefixMatch), starting with /"
                ),
                k.to_string(),
            ));
        }
    };
    Ok(dpb::PathModifier { kind: Some(kind) })
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

fn filter(
    mesh: &Mesh,
    f: &FilterSpec,
    r: &RouteFile,
    parent: &Service,
    path: &str,
    per_backend: bool,
) -> Result<Option<dpb::RouteFilter>, Invalid> {
    use dpb::route_filter::Kind;
    if per_backend
        && !matches!(
            f.kind.as_str(),
            "RequestHeaderModifier" | "ResponseHeaderModifier"
        )
    {
        return Err(invalid(
            path.to_string(),
            format!("only header modifiers apply to one backend, not {}", f.kind),
            f.kind.clone(),
        ));
    }
    let kind = match f.kind.as_str() {
        "RequestHeaderModifier" => {
            Kind::RequestHeaderModifier(header_modifier(f.request_header_modifier.as_ref(), path)?)
        }
        "ResponseHeaderModifier" => Kind::ResponseHeaderModifier(header_modifier(
            f.response_header_modifier.as_ref(),
            path,
        )?),
        "RequestRedirect" if r.kind == RouteKind::Http => {
            let x = f.request_redirect.as_ref().ok_or_else(|| {
                invalid(
                    path.to_string(),
                    "requestRedirect is missing",
                    "RequestRedirect",
                )
            })?;
            let status = x.status_code.unwrap_or(302);
            if ![301, 302, 303, 307, 308].contains(&status) {
                return Err(invalid(
                    format!("{path}.requestRedirect.statusCode"),
                    format!("{status} is not 301, 302, 303, 307 or 308"),
                    status.to_string(),
                ));
            }
            if let Some(s) = &x.scheme
                && s != "http"
                && s != "https"
            {
                return Err(invalid(
                    format!("{path}.requestRedirect.scheme"),
                    format!("{s:?} is not http or https"),
                    s.clone(),
                ));
            }
            Kind::RequestRedirect(dpb::RequestRedirect {
                scheme: x.scheme.clone().unwrap_or_default(),
                hostname: x.hostname.clone().unwrap_or_default(),
                path: x
                    .path
                    .as_ref()
                    .map(|p| path_modifier(p, &format!("{path}.requestRedirect.path")))
                    .transpose()?,
                port: x.port.map(u32::from).unwrap_or(0),
                status_code: u32::from(status),
            })
        }
        "URLRewrite" if r.kind == RouteKind::Http => {
            let x = f
                .url_rewrite
                .as_ref()
                .ok_or_else(|| invalid(path.to_string(), "urlRewrite is missing", "URLRewrite"))?;
            Kind::UrlRewrite(dpb::UrlRewrite {
                hostname: x.hostname.clone().unwrap_or_default(),
                path: x
                    .path
                    .as_ref()
                    .map(|p| path_modifier(p, &format!("{path}.urlRewrite.path")))
                    .transpose()?,
            })
        }
        "RequestMirror" => {
            let x = f.request_mirror.as_ref().ok_or_else(|| {
                invalid(
                    path.to_string(),
                    "requestMirror is missing",
                    "RequestMirror",
                )
            })?;
            let fraction = match (x.percent, x.fraction) {
                (None, None) => None,
                (Some(p), None) if p <= 100 => Some(dpb::Fraction {
                    numerator: p,
                    denominator: 100,
                }),
                (None, Some(fr))
                    if fr.denominator.unwrap_or(100) > 0
                        && fr.numerator <= fr.denominator.unwrap_or(100) =>
                {
                    Some(dpb::Fraction {
                        numerator: fr.numerator,
                        denominator: fr.denominator.unwrap_or(100),
                    })
                }
                _ => {
                    return Err(invalid(
                        format!("{path}.requestMirror"),
                        "percent (0-100) or fraction (numerator ≤ denominator, denominator > 0), not both",
                        "percent",
                    ));
                }
            };
            let path = format!("{path}.requestMirror.backendRef");
            // A mirror that does not resolve is left out (and noted): nothing to copy to.
            let Ok(authority) =
                backend_authority(mesh, &x.backend_ref, &r.namespace, parent, &path)?
            else {
                return Ok(None);
            };
            Kind::RequestMirror(dpb::RequestMirror {
                authority,
                fraction,
            })
        }
        "ExtensionRef" => {
            let x = f.extension_ref.as_ref().ok_or_else(|| {
                invalid(path.to_string(), "extensionRef is missing", "ExtensionRef")
            })?;
            if x.group != crate::kubernetes::crd::GROUP || x.kind != "FaultInjection" {
                return Err(invalid(
                    format!("{path}.extensionRef"),
                    format!(
                        "{}/{} is not supported (only policy.musubi.io/FaultInjection)",
                        x.group, x.kind
                    ),
                    x.kind.clone(),
                ));
            }
            let found = mesh
                .faults
                .iter()
                .find(|fi| fi.name == x.name && fi.namespace == r.namespace)
                .ok_or_else(|| {
                    invalid(
                        format!("{path}.extensionRef"),
                        format!(
                            "no FaultInjection {} in namespace {} (or it is not valid)",
                            x.name, r.namespace
                        ),
                        x.name.clone(),
                    )
                })?;
            Kind::Fault(fault(
                &found.spec,
                &format!("{path}.extensionRef ({})", x.name),
                r.kind,
                false,
            )?)
        }
        other => {
            let what = if matches!(other, "RequestRedirect" | "URLRewrite") {
                format!("{other} is not a GRPCRoute filter")
            } else {
                format!(
                    "filter type {other:?} is not supported (RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror, ExtensionRef to a FaultInjection)"
                )
            };
            return Err(invalid(format!("{path}.type"), what, other.to_string()));
        }
    };
    Ok(Some(dpb::RouteFilter { kind: Some(kind) }))
}

fn percent(p: Option<f64>, path: &str) -> Result<Option<dpb::Fraction>, Invalid> {
    match p {
        None => Ok(None),
        Some(v) if (0.0..=100.0).contains(&v) => Ok(Some(dpb::Fraction {
            numerator: (v * f64::from(PERCENT_DENOMINATOR) / 100.0).round() as u32,
            denominator: PERCENT_DENOMINATOR,
        })),
        Some(v) => Err(invalid(
            format!("{path}.percentage"),
            format!("{v} is not 0-100"),
            v.to_string(),
        )),
    }
}

/// gRPC status names (canonical, upper snake case) to codes.
fn grpc_code(c: &GrpcCode) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    let n = match c {
        GrpcCode::Number(n) => *n,
        GrpcCode::Name(s) => NAMES.iter().position(|n| n.eq_ignore_ascii_case(s))? as u32,
    };
    (1..=16).contains(&n).then_some(n)
}

/// Whether a FaultInjection's spec is one routes can use.
pub fn check_fault(f: &FaultSpec) -> Result<(), Invalid> {
    fault(f, "spec", RouteKind::Http, true).map(|_| ())
}

/// A FaultInjection's spec, checked; `any_kind` when it is not yet known which route uses it.
fn fault(
    f: &FaultSpec,
    path: &str,
    kind: RouteKind,
    any_kind: bool,
) -> Result<dpb::Fault, Invalid> {
    let mut out = dpb::Fault::default();
    if f.delay.is_none() && f.abort.is_none() {
        return Err(invalid(
            path.to_string(),
            "a fault needs a delay, an abort or both",
            "delay",
        ));
    }
    if let Some(d) = &f.delay {
        let dp = format!("{path}.delay");
        let fixed = duration(&d.fixed_delay, &format!("{dp}.fixedDelay"))?;
        if fixed < Duration::from_millis(1) {
            return Err(invalid(
                format!("{dp}.fixedDelay"),
                "must be at least 1ms",
                d.fixed_delay.clone(),
            ));
        }
        out.delay = Some(pb_duration(fixed));
        out.delay_fraction = percent(d.percentage, &dp)?;
    }
    if let Some(a) = &f.abort {
        abort(a, path, kind, any_kind, &mut out)?;
    }
    Ok(out)
}

fn abort(
    a: &AbortSpec,
    path: &str,
    kind: RouteKind,
    any_kind: bool,
    out: &mut dpb::Fault,
) -> Result<(), Invalid> {
    let ap = format!("{path}.abort");
    match (a.http_status, &a.grpc_status) {
        (Some(s), None) if (200..=599).contains(&s) && (any_kind || kind == RouteKind::Http) => {
            out.abort_http_status = u32::from(s)
        }
        (None, Some(c)) if any_kind || kind == RouteKind::Grpc => {
            out.abort_grpc_status = grpc_code(c).ok_or_else(|| {
                invalid(
                    format!("{ap}.grpcStatus"),
                    "not a gRPC error code (1-16 or a name like UNAVAILABLE)",
                    "grpcStatus",
                )
            })?;
        }
        (Some(_), None) if kind == RouteKind::Grpc => {
            return Err(invalid(
                ap,
                "a GRPCRoute aborts with grpcStatus",
                "httpStatus",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid(
                ap,
                "an HTTPRoute aborts with httpStatus",
                "grpcStatus",
            ));
        }
        _ => {
            return Err(invalid(
                ap,
                "an abort has exactly one of httpStatus (200-599) or grpcStatus",
                "abort",
            ));
        }
    }
    out.abort_fraction = percent(a.percentage, &ap)?;
    Ok(())
}

#[cfg(test)]
mod tests;
