//! One route match into discovery's typed match, checked the way the proxy will run it.

use super::{Invalid, RouteKind, invalid};
use crate::model::gateway::{MatchSpec, MethodSpec, NamedMatchSpec};
use musubi_proto::discovery::v1 as dpb;

/// The proxy's limit on one regular expression (`musubi-proxy`'s `route::MAX_REGEX_BYTES`).
const MAX_REGEX_BYTES: usize = 1024;

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

fn named(m: &NamedMatchSpec, path: &str, header: bool) -> Result<dpb::NamedMatch, Invalid> {
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

pub(super) fn route_match(
    m: &MatchSpec,
    kind: RouteKind,
    path: &str,
) -> Result<dpb::RouteMatch, Invalid> {
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
