//! A route's filters (and the faults they use) into discovery's filters, checked.

use super::{Invalid, Mesh, RouteKind, backend_authority, duration, invalid, pb_duration};
use crate::model::Service;
use crate::model::gateway::{
    AbortSpec, FaultSpec, FilterSpec, GrpcCode, HeaderModifierSpec, PathModifierSpec, RouteFile,
};
use musubi_proto::discovery::v1 as dpb;
use std::time::Duration;

/// Fractions of faults, from a percentage with up to four decimals.
const PERCENT_DENOMINATOR: u32 = 1_000_000;

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
    let pair = |h: &crate::model::gateway::HeaderSpec| -> Result<dpb::HeaderValue, Invalid> {
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

pub(super) fn filter(
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
pub(super) fn fault(
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
