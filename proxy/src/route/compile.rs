//! Discovery's route rules (protobuf) into a [`RouteTable`]. Every rule is checked on its own:
//! one that does not compile is left out with its reason (for the log and /debug), the rest
//! route. The controller refuses such rules first; this is the proxy's own guard.

use super::filters::{
    Abort, Fault, Fraction, HeaderModifier, Mirror, PathModifier, Redirect, Rewrite,
};
use super::matching::{GrpcMatch, Match, PathMatch, ValueMatch};
use super::{Backend, Filter, RetryPolicy, RouteTable, Rule, Timeouts};
use http::{HeaderName, HeaderValue, Method, StatusCode};
use musubi_proto::discovery::v1 as pb;
use regex::{Regex, RegexBuilder};
use std::sync::Arc;
use std::time::Duration;

/// Longest regular expression accepted, and the most memory one may compile to.
pub const MAX_REGEX_BYTES: usize = 1024;
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Gateway API's weight range.
pub const MAX_WEIGHT: u32 = 1_000_000;
/// Most rules one service's table holds; rules past it are left out.
pub const MAX_RULES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route {route} rule {rule}: {reason}")]
pub struct RouteError {
    pub route: String,
    pub rule: String,
    pub reason: String,
}

/// Compiles what discovery sent; returns the table and each rule it left out.
pub fn compile(routes: &[pb::Route]) -> (RouteTable, Vec<RouteError>) {
    let mut rules = Vec::new();
    let mut errors = Vec::new();
    for r in routes {
        let rule_label = if r.rule_name.is_empty() {
            r.rule_index.to_string()
        } else {
            r.rule_name.clone()
        };
        if rules.len() == MAX_RULES {
            errors.push(RouteError {
                route: r.name.clone(),
                rule: rule_label,
                reason: format!("more than {MAX_RULES} rules for one service"),
            });
            continue;
        }
        match rule(r, &rule_label) {
            Ok(rule) => rules.push(rule),
            Err(reason) => errors.push(RouteError {
                route: r.name.clone(),
                rule: rule_label,
                reason,
            }),
        }
    }
    (RouteTable::new(rules), errors)
}

fn rule(r: &pb::Route, label: &str) -> Result<Rule, String> {
    let grpc = pb::RouteKind::try_from(r.kind) == Ok(pb::RouteKind::Grpc);
    let mut matches = r
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| route_match(m, grpc).map_err(|e| format!("matches[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if matches.is_empty() {
        // No matches: every request (Gateway API: prefix "/"; GRPCRoute: any method).
        matches.push(Match {
            path: PathMatch::Prefix(String::new()),
            headers: vec![],
            query: vec![],
            method: None,
            grpc: grpc.then_some(GrpcMatch {
                service: None,
                method: None,
            }),
        });
    }
    let filters = filter_list(&r.filters).map_err(|e| format!("filters: {e}"))?;
    let redirects = filters.iter().any(|f| matches!(f, Filter::Redirect(_)));
    if redirects && filters.iter().any(|f| matches!(f, Filter::Rewrite(_))) {
        return Err("filters: RequestRedirect and URLRewrite cannot both be set".into());
    }
    let prefix_modifier = filters.iter().any(|f| match f {
        Filter::Redirect(Redirect { path, .. }) | Filter::Rewrite(Rewrite { path, .. }) => {
            matches!(path, Some(PathModifier::ReplacePrefixMatch(_)))
        }
        _ => false,
    });
    if prefix_modifier
        && matches
            .iter()
            .any(|m| m.grpc.is_some() || !matches!(m.path, PathMatch::Prefix(_)))
    {
        return Err("filters: ReplacePrefixMatch needs every match to be a PathPrefix".into());
    }
    let mut backends = Vec::new();
    for (i, b) in r.backends.iter().enumerate() {
        if b.weight > MAX_WEIGHT {
            return Err(format!(
                "backends[{i}]: weight {} is over {MAX_WEIGHT}",
                b.weight
            ));
        }
        let invalid = if !b.invalid.is_empty() {
            Some(b.invalid.clone())
        } else if b.authority.is_empty() {
            Some("backend names no service".into())
        } else {
            None
        };
        let backend_filters =
            filter_list(&b.filters).map_err(|e| format!("backends[{i}].filters: {e}"))?;
        if let Some(f) = backend_filters
            .iter()
            .find(|f| !matches!(f, Filter::RequestHeaders(_) | Filter::ResponseHeaders(_)))
        {
            return Err(format!(
                "backends[{i}].filters: only header modifiers apply to one backend, not {}",
                filter_name(f)
            ));
        }
        backends.push(Backend {
            authority: b.authority.clone(),
            weight: b.weight,
            filters: backend_filters,
            invalid,
        });
    }
    let timeouts = Timeouts {
        request: duration(r.timeout.as_ref()).map_err(|e| format!("timeouts.request: {e}"))?,
        backend_request: duration(r.backend_timeout.as_ref())
            .map_err(|e| format!("timeouts.backendRequest: {e}"))?,
    };
    if let (Some(req), Some(backend)) = (timeouts.request, timeouts.backend_request)
        && backend > req
    {
        return Err(format!(
            "timeouts: backendRequest ({backend:?}) is longer than request ({req:?})"
        ));
    }
    let retry = match &r.retry {
        None => None,
        Some(p) => Some(RetryPolicy {
            attempts: p.attempts,
            http_codes: p
                .http_codes
                .iter()
                .map(|c| {
                    u16::try_from(*c)
                        .ok()
                        .filter(|c| (400..=599).contains(c))
                        .ok_or_else(|| format!("retry: code {c} is not 400-599"))
                })
                .collect::<Result<_, _>>()?,
            backoff: duration(p.backoff.as_ref()).map_err(|e| format!("retry.backoff: {e}"))?,
        }),
    };
    Ok(Rule {
        route: Arc::from(r.name.as_str()),
        rule: Arc::from(label),
        grpc,
        matches,
        backends,
        filters,
        timeouts,
        retry,
        rank: r.rank,
        index: r.rule_index,
    })
}

fn filter_name(f: &Filter) -> &'static str {
    match f {
        Filter::RequestHeaders(_) => "RequestHeaderModifier",
        Filter::ResponseHeaders(_) => "ResponseHeaderModifier",
        Filter::Redirect(_) => "RequestRedirect",
        Filter::Rewrite(_) => "URLRewrite",
        Filter::Mirror(_) => "RequestMirror",
        Filter::Fault(_) => "FaultInjection",
    }
}

/// `None` for absent or zero (Gateway API: `0s` disables).
fn duration(d: Option<&prost_types::Duration>) -> Result<Option<Duration>, String> {
    let Some(d) = d else { return Ok(None) };
    match (u64::try_from(d.seconds), u32::try_from(d.nanos)) {
        (Ok(secs), Ok(nanos)) if nanos < 1_000_000_000 => {
            let d = Duration::new(secs, nanos);
            Ok((!d.is_zero()).then_some(d))
        }
        _ => Err(format!(
            "{}s {}ns is not a valid duration",
            d.seconds, d.nanos
        )),
    }
}

/// The whole value must match: Gateway API regular expressions are matched against the whole
/// path or value (like Envoy's RE2 matches), so `/v[0-9]` does not match `/v2/users`.
fn regex(pattern: &str) -> Result<Regex, String> {
    if pattern.len() > MAX_REGEX_BYTES {
        return Err(format!(
            "regular expression of {} bytes is over {MAX_REGEX_BYTES}",
            pattern.len()
        ));
    }
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("regular expression {pattern:?}: {e}"))
}

fn value_match(kind: i32, value: &str, what: &str) -> Result<ValueMatch, String> {
    match pb::MatchKind::try_from(kind) {
        Ok(pb::MatchKind::Exact) => Ok(ValueMatch::Exact(value.to_string())),
        Ok(pb::MatchKind::Regex) => regex(value).map(ValueMatch::Regex),
        _ => Err(format!(
            "{what}: match type {kind} is not Exact or RegularExpression"
        )),
    }
}

fn route_match(m: &pb::RouteMatch, grpc: bool) -> Result<Match, String> {
    let path = match &m.path {
        Some(p) => {
            let kind = pb::MatchKind::try_from(p.kind)
                .map_err(|_| format!("path: match type {} is unknown", p.kind))?;
            if kind != pb::MatchKind::Regex && !p.value.starts_with('/') {
                return Err(format!("path: {:?} does not start with /", p.value));
            }
            match kind {
                pb::MatchKind::Exact => PathMatch::Exact(p.value.clone()),
                pb::MatchKind::Prefix => {
                    PathMatch::Prefix(p.value.trim_end_matches('/').to_string())
                }
                pb::MatchKind::Regex => {
                    PathMatch::Regex(regex(&p.value).map_err(|e| format!("path: {e}"))?)
                }
            }
        }
        None if !m.path_prefix.is_empty() => {
            if !m.path_prefix.starts_with('/') {
                return Err(format!("path: {:?} does not start with /", m.path_prefix));
            }
            PathMatch::Prefix(m.path_prefix.trim_end_matches('/').to_string())
        }
        None => PathMatch::Prefix(String::new()),
    };
    let mut headers = Vec::new();
    let legacy = m
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), pb::MatchKind::Exact as i32, v.as_str()));
    let typed = m
        .header_matches
        .iter()
        .map(|h| (h.name.as_str(), h.kind, h.value.as_str()));
    for (name, kind, value) in legacy.chain(typed) {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("headers: {name:?} is not a header name"))?;
        headers.push((n, value_match(kind, value, &format!("headers {name:?}"))?));
    }
    let mut query = Vec::new();
    for q in &m.query_params {
        if q.name.is_empty() {
            return Err("queryParams: empty name".into());
        }
        query.push((
            q.name.clone(),
            value_match(q.kind, &q.value, &format!("queryParams {:?}", q.name))?,
        ));
    }
    let method = if m.method.is_empty() {
        None
    } else {
        Some(
            Method::from_bytes(m.method.as_bytes())
                .map_err(|_| format!("method: {:?} is not a method", m.method))?,
        )
    };
    let grpc = if grpc {
        let g = m.grpc.clone().unwrap_or_default();
        let part = |v: &str, what: &str| -> Result<Option<ValueMatch>, String> {
            if v.is_empty() {
                Ok(None)
            } else {
                value_match(g.kind, v, what).map(Some)
            }
        };
        Some(GrpcMatch {
            service: part(&g.service, "method.service")?,
            method: part(&g.method, "method.method")?,
        })
    } else if m.grpc.is_some() {
        return Err("a gRPC method match in an HTTP route".into());
    } else {
        None
    };
    Ok(Match {
        path,
        headers,
        query,
        method,
        grpc,
    })
}

fn header_value(h: &pb::HeaderValue, what: &str) -> Result<(HeaderName, HeaderValue), String> {
    let n = HeaderName::from_bytes(h.name.as_bytes())
        .map_err(|_| format!("{what}: {:?} is not a header name", h.name))?;
    let v = HeaderValue::from_str(&h.value)
        .map_err(|_| format!("{what}: the value of {:?} is not a header value", h.name))?;
    Ok((n, v))
}

fn modifier(m: &pb::HeaderModifier, what: &str) -> Result<HeaderModifier, String> {
    Ok(HeaderModifier {
        set: m
            .set
            .iter()
            .map(|h| header_value(h, what))
            .collect::<Result<_, _>>()?,
        add: m
            .add
            .iter()
            .map(|h| header_value(h, what))
            .collect::<Result<_, _>>()?,
        remove: m
            .remove
            .iter()
            .map(|n| {
                HeaderName::from_bytes(n.as_bytes())
                    .map_err(|_| format!("{what}: {n:?} is not a header name"))
            })
            .collect::<Result<_, _>>()?,
    })
}

fn path_modifier(p: &Option<pb::PathModifier>, what: &str) -> Result<Option<PathModifier>, String> {
    let Some(kind) = p.as_ref().and_then(|p| p.kind.clone()) else {
        return Ok(None);
    };
    let (m, v) = match kind {
        pb::path_modifier::Kind::ReplaceFullPath(v) => {
            (PathModifier::ReplaceFullPath(v.clone()), v)
        }
        pb::path_modifier::Kind::ReplacePrefixMatch(v) => {
            (PathModifier::ReplacePrefixMatch(v.clone()), v)
        }
    };
    if !v.is_empty() && !v.starts_with('/') {
        return Err(format!("{what}.path: {v:?} does not start with /"));
    }
    if v.contains(['?', '#']) || v.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(format!("{what}.path: {v:?} is not a path"));
    }
    Ok(Some(m))
}

fn hostname(h: &str, what: &str) -> Result<Option<String>, String> {
    if h.is_empty() {
        return Ok(None);
    }
    if h.len() > 253
        || !h
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(format!("{what}.hostname: {h:?} is not a hostname"));
    }
    Ok(Some(h.to_ascii_lowercase()))
}

fn fraction(f: Option<&pb::Fraction>, what: &str) -> Result<Option<Fraction>, String> {
    let Some(f) = f else { return Ok(None) };
    let denominator = if f.denominator == 0 {
        100
    } else {
        f.denominator
    };
    if f.numerator > denominator {
        return Err(format!(
            "{what}: {}/{} is more than all",
            f.numerator, denominator
        ));
    }
    Ok(Some(Fraction {
        numerator: f.numerator,
        denominator,
    }))
}

fn filter_list(list: &[pb::RouteFilter]) -> Result<Vec<Filter>, String> {
    list.iter()
        .enumerate()
        .map(|(i, f)| filter(f).map_err(|e| format!("[{i}] {e}")))
        .collect()
}

fn filter(f: &pb::RouteFilter) -> Result<Filter, String> {
    use pb::route_filter::Kind;
    match &f.kind {
        None => Err("a filter this proxy does not know (newer controller?)".into()),
        Some(Kind::RequestHeaderModifier(m)) => Ok(Filter::RequestHeaders(modifier(
            m,
            "RequestHeaderModifier",
        )?)),
        Some(Kind::ResponseHeaderModifier(m)) => Ok(Filter::ResponseHeaders(modifier(
            m,
            "ResponseHeaderModifier",
        )?)),
        Some(Kind::RequestRedirect(r)) => {
            let what = "RequestRedirect";
            let status = match r.status_code {
                0 => StatusCode::MOVED_PERMANENTLY,
                301 | 302 | 303 | 307 | 308 => StatusCode::from_u16(r.status_code as u16)
                    .map_err(|_| format!("{what}: status {}", r.status_code))?,
                other => {
                    return Err(format!(
                        "{what}: status {other} is not 301, 302, 303, 307 or 308"
                    ));
                }
            };
            let scheme = match r.scheme.to_ascii_lowercase().as_str() {
                "" => None,
                s @ ("http" | "https") => Some(s.to_string()),
                other => return Err(format!("{what}: scheme {other:?} is not http or https")),
            };
            let port = match r.port {
                0 => None,
                p => {
                    Some(u16::try_from(p).map_err(|_| format!("{what}: port {p} is not 1-65535"))?)
                }
            };
            Ok(Filter::Redirect(Redirect {
                scheme,
                hostname: hostname(&r.hostname, what)?,
                path: path_modifier(&r.path, what)?,
                port,
                status,
            }))
        }
        Some(Kind::UrlRewrite(r)) => Ok(Filter::Rewrite(Rewrite {
            hostname: hostname(&r.hostname, "URLRewrite")?,
            path: path_modifier(&r.path, "URLRewrite")?,
        })),
        Some(Kind::RequestMirror(m)) => {
            if m.authority.is_empty() {
                return Err("RequestMirror: names no service".into());
            }
            Ok(Filter::Mirror(Mirror {
                authority: m.authority.clone(),
                fraction: fraction(m.fraction.as_ref(), "RequestMirror")?.unwrap_or(Fraction::ALL),
            }))
        }
        Some(Kind::Fault(f)) => {
            let what = "FaultInjection";
            let delay = match (
                duration(f.delay.as_ref()).map_err(|e| format!("{what}.delay: {e}"))?,
                fraction(f.delay_fraction.as_ref(), what)?,
            ) {
                (Some(d), Some(share)) => Some((d, share)),
                _ => None,
            };
            let abort_kind = match (f.abort_http_status, f.abort_grpc_status) {
                (0, 0) => None,
                (s, 0) => Some(Abort::Http(
                    u16::try_from(s)
                        .ok()
                        .filter(|s| (200..=599).contains(s))
                        .and_then(|s| StatusCode::from_u16(s).ok())
                        .ok_or_else(|| format!("{what}: HTTP status {s} is not 200-599"))?,
                )),
                (0, g) => Some(Abort::Grpc(
                    u16::try_from(g)
                        .ok()
                        .filter(|g| (1..=16).contains(g))
                        .ok_or_else(|| format!("{what}: gRPC status {g} is not 1-16"))?,
                )),
                _ => return Err(format!("{what}: abort with both an HTTP and a gRPC status")),
            };
            let abort = match (abort_kind, fraction(f.abort_fraction.as_ref(), what)?) {
                (Some(a), Some(share)) => Some((a, share)),
                _ => None,
            };
            Ok(Filter::Fault(Fault { delay, abort }))
        }
    }
}
