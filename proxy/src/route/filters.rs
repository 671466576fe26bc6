//! What a route's filters do to a request or response, as pure functions over plain data.

use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderModifier {
    /// Gateway API order: set replaces every value, add appends one, remove drops all.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
        for n in &self.remove {
            headers.remove(n);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replaces the part of the path the rule's `PathPrefix` matched.
    ReplacePrefixMatch(String),
}

/// The path after a modifier. `matched_prefix` is the prefix the request matched (stored
/// without its trailing `/`; `None` when the match was not a prefix, where only
/// `ReplaceFullPath` is valid). The results are the Gateway API's table for
/// `ReplacePrefixMatch`: `/foo/bar` with prefix `/foo` to `/xyz` is `/xyz/bar`, to `` is `/bar`.
pub fn modified_path(path: &str, modifier: &PathModifier, matched_prefix: Option<&str>) -> String {
    match modifier {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(replacement) => {
            let Some(prefix) = matched_prefix.filter(|p| path.starts_with(p)) else {
                return path.to_string();
            };
            let rest = &path[prefix.len()..];
            let head = replacement.trim_end_matches('/');
            let joined = format!("{head}{rest}");
            if joined.is_empty() {
                "/".to_string()
            } else if joined.starts_with('/') {
                joined
            } else {
                format!("/{joined}")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: StatusCode,
}

/// What the redirect is computed from.
#[derive(Debug, Clone, Copy)]
pub struct RedirectFrom<'a> {
    pub scheme: &'a str,
    /// The request's host, without port.
    pub host: &'a str,
    pub port: Option<u16>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub matched_prefix: Option<&'a str>,
}

fn default_port(scheme: &str) -> u16 {
    if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        80
    }
}

/// The `Location` of a redirect. The port, per the Gateway API: the filter's, else the
/// scheme's default when the filter changes the scheme, else the request's; a port that is the
/// scheme's default is left out.
pub fn location(r: &Redirect, from: &RedirectFrom) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(from.scheme);
    let host = r.hostname.as_deref().unwrap_or(from.host);
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => from.port,
    }
    .filter(|p| *p != default_port(scheme));
    let path = match &r.path {
        Some(m) => modified_path(from.path, m, from.matched_prefix),
        None => from.path.to_string(),
    };
    let mut out = format!("{scheme}://{host}");
    if let Some(p) = port {
        out.push_str(&format!(":{p}"));
    }
    out.push_str(&path);
    if let Some(q) = from.query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

/// A share of requests, `numerator / denominator`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    pub numerator: u32,
    pub denominator: u32,
}

impl Fraction {
    pub const ALL: Fraction = Fraction {
        numerator: 1,
        denominator: 1,
    };

    /// Whether a draw uniform in `[0, 1)` falls in the share.
    pub fn hit(&self, draw: f64) -> bool {
        draw * f64::from(self.denominator) < f64::from(self.numerator)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub authority: String,
    pub fraction: Fraction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    Http(StatusCode),
    /// A gRPC status code (1-16).
    Grpc(u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub delay: Option<(std::time::Duration, Fraction)>,
    pub abort: Option<(Abort, Fraction)>,
}

/// What a fault does to one request, from two independent draws in `[0, 1)`.
pub fn fault_outcome(
    f: &Fault,
    delay_draw: f64,
    abort_draw: f64,
) -> (Option<std::time::Duration>, Option<Abort>) {
    let delay = f
        .delay
        .filter(|(_, share)| share.hit(delay_draw))
        .map(|(d, _)| d);
    let abort = f
        .abort
        .filter(|(_, share)| share.hit(abort_draw))
        .map(|(a, _)| a);
    (delay, abort)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_prefix_match_is_the_specs_table() {
        // Request path, prefix match, replacement, result: the Gateway API's HTTPPathModifier
        // documentation, row by row.
        for (path, prefix, replacement, want) in [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
        ] {
            let stored = prefix.trim_end_matches('/');
            let got = modified_path(
                path,
                &PathModifier::ReplacePrefixMatch(replacement.into()),
                Some(stored),
            );
            assert_eq!(got, want, "{path} {prefix} {replacement}");
        }
        assert_eq!(
            modified_path("/a/b", &PathModifier::ReplaceFullPath("/new".into()), None),
            "/new"
        );
    }

    #[test]
    fn header_modifier_sets_adds_and_removes() {
        let mut h = HeaderMap::new();
        h.append("x-set", "old1".parse().unwrap());
        h.append("x-set", "old2".parse().unwrap());
        h.insert("x-add", "a".parse().unwrap());
        h.insert("x-gone", "1".parse().unwrap());
        HeaderModifier {
            set: vec![("x-set".parse().unwrap(), "new".parse().unwrap())],
            add: vec![("x-add".parse().unwrap(), "b".parse().unwrap())],
            remove: vec!["x-gone".parse().unwrap()],
        }
        .apply(&mut h);
        let all = |n: &str| -> Vec<String> {
            h.get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(all("x-set"), ["new"]);
        assert_eq!(all("x-add"), ["a", "b"]);
        assert!(all("x-gone").is_empty());
    }

    #[test]
    fn redirect_location_table() {
        let r = |scheme: Option<&str>,
                 host: Option<&str>,
                 port: Option<u16>,
                 path: Option<PathModifier>| Redirect {
            scheme: scheme.map(str::to_string),
            hostname: host.map(str::to_string),
            path,
            port,
            status: StatusCode::FOUND,
        };
        let from = RedirectFrom {
            scheme: "http",
            host: "api.shop",
            port: Some(8080),
            path: "/foo/bar",
            query: Some("q=1"),
            matched_prefix: Some("/foo"),
        };
        for (redirect, want) in [
            (
                r(None, None, None, None),
                "http://api.shop:8080/foo/bar?q=1",
            ),
            (
                r(None, Some("example.org"), None, None),
                "http://example.org:8080/foo/bar?q=1",
            ),
            (
                r(Some("https"), None, None, None),
                "https://api.shop/foo/bar?q=1",
            ),
            (
                r(Some("https"), None, Some(8443), None),
                "https://api.shop:8443/foo/bar?q=1",
            ),
            (r(None, None, Some(80), None), "http://api.shop/foo/bar?q=1"),
            (
                r(
                    None,
                    None,
                    None,
                    Some(PathModifier::ReplacePrefixMatch("/v2".into())),
                ),
                "http://api.shop:8080/v2/bar?q=1",
            ),
            (
                r(
                    None,
                    None,
                    None,
                    Some(PathModifier::ReplaceFullPath("/login".into())),
                ),
                "http://api.shop:8080/login?q=1",
            ),
        ] {
            assert_eq!(location(&redirect, &from), want, "{redirect:?}");
        }
    }

    #[test]
    fn fractions_and_faults() {
        let ten = Fraction {
            numerator: 10,
            denominator: 100,
        };
        assert!(ten.hit(0.0));
        assert!(ten.hit(0.0999));
        assert!(!ten.hit(0.1));
        assert!(
            !Fraction {
                numerator: 0,
                denominator: 100
            }
            .hit(0.0)
        );
        assert!(Fraction::ALL.hit(0.9999));
        let f = Fault {
            delay: Some((std::time::Duration::from_millis(500), ten)),
            abort: Some((
                Abort::Http(StatusCode::SERVICE_UNAVAILABLE),
                Fraction {
                    numerator: 5,
                    denominator: 100,
                },
            )),
        };
        assert_eq!(fault_outcome(&f, 0.5, 0.5), (None, None));
        assert_eq!(
            fault_outcome(&f, 0.05, 0.01),
            (
                Some(std::time::Duration::from_millis(500)),
                Some(Abort::Http(StatusCode::SERVICE_UNAVAILABLE))
            )
        );
    }
}
