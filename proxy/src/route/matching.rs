//! Whether a request matches a rule's match, and which of several matching ones wins: the
//! Gateway API precedence rules, as a sort key over plain data.

use http::{HeaderMap, Method};
use regex::Regex;
use std::cmp::Reverse;

/// What a route looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct Head<'a> {
    pub method: &'a Method,
    /// The path without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// `content-type: application/grpc…`
    pub grpc: bool,
}

impl<'a> Head<'a> {
    pub fn of<B>(req: &'a http::Request<B>) -> Head<'a> {
        Head {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
            grpc: is_grpc(req.headers()),
        }
    }
}

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise prefix, stored without its trailing `/` ("" for "/"): `/foo` matches
    /// `/foo`, `/foo/` and `/foo/bar`, never `/foobar`.
    Prefix(String),
    /// The whole path must match.
    Regex(Regex),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                path.starts_with(p.as_str())
                    && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

#[derive(Debug, Clone)]
pub enum ValueMatch {
    Exact(String),
    /// The whole value must match.
    Regex(Regex),
}

impl ValueMatch {
    pub fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(want) => v == want,
            ValueMatch::Regex(r) => r.is_match(v),
        }
    }

    fn len(&self) -> usize {
        match self {
            ValueMatch::Exact(s) => s.len(),
            ValueMatch::Regex(r) => r.as_str().len(),
        }
    }
}

/// GRPCRoute's method match over `/<service>/<method>`; `None` is any.
#[derive(Debug, Clone)]
pub struct GrpcMatch {
    pub service: Option<ValueMatch>,
    pub method: Option<ValueMatch>,
}

#[derive(Debug, Clone)]
pub struct Match {
    pub path: PathMatch,
    pub headers: Vec<(http::HeaderName, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
    pub method: Option<Method>,
    /// Set for GRPCRoute rules: only gRPC requests match, by service and method.
    pub grpc: Option<GrpcMatch>,
}

impl Match {
    pub fn matches(&self, head: &Head) -> bool {
        if let Some(g) = &self.grpc {
            if !head.grpc || !grpc_matches(g, head.path) {
                return false;
            }
        } else if !self.path.matches(head.path) {
            return false;
        }
        if self.method.as_ref().is_some_and(|m| m != head.method) {
            return false;
        }
        // Every header match needs a value that matches (several values: any of them).
        let headers_ok = self.headers.iter().all(|(name, want)| {
            head.headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| want.matches(v))
        });
        headers_ok
            && self
                .query
                .iter()
                .all(|(name, want)| query_value(head.query, name).is_some_and(|v| want.matches(v)))
    }

    /// Orders matches best first (smaller is better): the Gateway API's precedence for the
    /// match itself; callers add the route's rank and rule position for ties.
    ///
    /// HTTPRoute: an exact path, then a regular expression (the spec leaves regex to the
    /// implementation; longer patterns first), then the longest prefix; then a method match;
    /// then the most header matches; then the most query parameter matches. GRPCRoute: the
    /// longest service, then the longest method, then the most header matches. gRPC rules come
    /// before HTTP rules (only gRPC requests reach them).
    pub fn precedence(&self) -> MatchKey {
        match &self.grpc {
            Some(g) => MatchKey {
                kind: 0,
                path_class: 0,
                path_len: Reverse(g.service.as_ref().map_or(0, ValueMatch::len)),
                method: Reverse(g.method.as_ref().map_or(0, ValueMatch::len)),
                headers: Reverse(self.headers.len()),
                query: Reverse(self.query.len()),
            },
            None => {
                let (path_class, path_len) = match &self.path {
                    PathMatch::Exact(p) => (0, p.len()),
                    PathMatch::Regex(r) => (1, r.as_str().len()),
                    PathMatch::Prefix(p) => (2, p.len()),
                };
                MatchKey {
                    kind: 1,
                    path_class,
                    path_len: Reverse(path_len),
                    method: Reverse(usize::from(self.method.is_some())),
                    headers: Reverse(self.headers.len()),
                    query: Reverse(self.query.len()),
                }
            }
        }
    }
}

/// See [`Match::precedence`]; compared field by field, smaller first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MatchKey {
    kind: u8,
    path_class: u8,
    path_len: Reverse<usize>,
    method: Reverse<usize>,
    headers: Reverse<usize>,
    query: Reverse<usize>,
}

fn grpc_matches(g: &GrpcMatch, path: &str) -> bool {
    let Some((service, method)) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .filter(|(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'))
    else {
        return false;
    };
    g.service.as_ref().is_none_or(|s| s.matches(service))
        && g.method.as_ref().is_none_or(|m| m.matches(method))
}

/// The first value of query parameter `name` (names are case-sensitive; values are compared
/// as sent, without percent-decoding, like the Gateway API conformance tests expect).
pub fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn re(s: &str) -> Regex {
        Regex::new(&format!("^(?:{s})$")).unwrap()
    }

    fn head<'a>(
        method: &'a Method,
        path: &'a str,
        query: Option<&'a str>,
        h: &'a HeaderMap,
    ) -> Head<'a> {
        Head {
            method,
            path,
            query,
            headers: h,
            grpc: is_grpc(h),
        }
    }

    fn m(path: PathMatch) -> Match {
        Match {
            path,
            headers: vec![],
            query: vec![],
            method: None,
            grpc: None,
        }
    }

    #[test]
    fn path_table() {
        let prefix = |p: &str| PathMatch::Prefix(p.trim_end_matches('/').to_string());
        for (matcher, path, want) in [
            (prefix("/foo"), "/foo", true),
            (prefix("/foo"), "/foo/", true),
            (prefix("/foo"), "/foo/bar", true),
            (prefix("/foo"), "/foobar", false),
            (prefix("/foo/"), "/foo", true),
            (prefix("/foo/"), "/foo/bar", true),
            (prefix("/"), "/anything", true),
            (prefix("/"), "/", true),
            (PathMatch::Exact("/foo".into()), "/foo", true),
            (PathMatch::Exact("/foo".into()), "/foo/", false),
            (PathMatch::Regex(re("/v[0-9]+/.*")), "/v2/users", true),
            (PathMatch::Regex(re("/v[0-9]+/.*")), "/x/v2/users", false),
            (PathMatch::Regex(re("/v[0-9]+")), "/v2/users", false),
        ] {
            assert_eq!(matcher.matches(path), want, "{matcher:?} {path}");
        }
    }

    #[test]
    fn headers_query_method_table() {
        let mut hm = HeaderMap::new();
        hm.insert("x-canary", "true".parse().unwrap());
        hm.append("x-multi", "a".parse().unwrap());
        hm.append("x-multi", "b".parse().unwrap());
        let get = Method::GET;
        let post = Method::POST;
        let base = || m(PathMatch::Prefix(String::new()));
        let with_header = |n: &str, v: ValueMatch| Match {
            headers: vec![(n.parse().unwrap(), v)],
            ..base()
        };
        let with_query = |n: &str, v: ValueMatch| Match {
            query: vec![(n.to_string(), v)],
            ..base()
        };
        let cases: Vec<(Match, &Method, Option<&str>, bool)> = vec![
            (
                with_header("x-canary", ValueMatch::Exact("true".into())),
                &get,
                None,
                true,
            ),
            (
                with_header("X-Canary", ValueMatch::Exact("true".into())),
                &get,
                None,
                true,
            ),
            (
                with_header("x-canary", ValueMatch::Exact("TRUE".into())),
                &get,
                None,
                false,
            ),
            (
                with_header("x-missing", ValueMatch::Exact("".into())),
                &get,
                None,
                false,
            ),
            (
                with_header("x-multi", ValueMatch::Exact("b".into())),
                &get,
                None,
                true,
            ),
            (
                with_header("x-canary", ValueMatch::Regex(re("t.*"))),
                &get,
                None,
                true,
            ),
            (
                with_header("x-canary", ValueMatch::Regex(re("ru"))),
                &get,
                None,
                false,
            ),
            (
                with_query("v", ValueMatch::Exact("2".into())),
                &get,
                Some("a=1&v=2"),
                true,
            ),
            (
                with_query("v", ValueMatch::Exact("2".into())),
                &get,
                Some("V=2"),
                false,
            ),
            (
                with_query("v", ValueMatch::Exact("2".into())),
                &get,
                None,
                false,
            ),
            (
                with_query("flag", ValueMatch::Exact("".into())),
                &get,
                Some("flag"),
                true,
            ),
            (
                Match {
                    method: Some(Method::POST),
                    ..base()
                },
                &post,
                None,
                true,
            ),
            (
                Match {
                    method: Some(Method::POST),
                    ..base()
                },
                &get,
                None,
                false,
            ),
        ];
        for (i, (matcher, method, query, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                matcher.matches(&head(method, "/x", query, &hm)),
                want,
                "case {i}: {matcher:?}"
            );
        }
    }

    #[test]
    fn grpc_table() {
        let mut grpc = HeaderMap::new();
        grpc.insert("content-type", "application/grpc+proto".parse().unwrap());
        let plain = HeaderMap::new();
        let g = |service: Option<&str>, method: Option<&str>| Match {
            grpc: Some(GrpcMatch {
                service: service.map(|s| ValueMatch::Exact(s.into())),
                method: method.map(|s| ValueMatch::Exact(s.into())),
            }),
            ..m(PathMatch::Prefix(String::new()))
        };
        let post = Method::POST;
        for (matcher, path, headers, want) in [
            (
                g(Some("shop.Cart"), Some("Add")),
                "/shop.Cart/Add",
                &grpc,
                true,
            ),
            (
                g(Some("shop.Cart"), Some("Add")),
                "/shop.Cart/Remove",
                &grpc,
                false,
            ),
            (g(Some("shop.Cart"), None), "/shop.Cart/Remove", &grpc, true),
            (g(None, Some("Add")), "/other.Svc/Add", &grpc, true),
            (g(None, None), "/a/b", &grpc, true),
            (g(None, None), "/a/b", &plain, false),
            (g(None, None), "/a/b/c", &grpc, false),
            (g(None, None), "/a", &grpc, false),
        ] {
            assert_eq!(
                matcher.matches(&head(&post, path, None, headers)),
                want,
                "{path}"
            );
        }
    }

    #[test]
    fn precedence_follows_the_spec_order() {
        let exact = m(PathMatch::Exact("/a".into()));
        let regex = m(PathMatch::Regex(re("/a.*")));
        let long_prefix = m(PathMatch::Prefix("/a/b".into()));
        let short_prefix = m(PathMatch::Prefix("/a".into()));
        let method = Match {
            method: Some(Method::GET),
            ..m(PathMatch::Prefix("/a".into()))
        };
        let two_headers = Match {
            headers: vec![
                ("x-1".parse().unwrap(), ValueMatch::Exact("1".into())),
                ("x-2".parse().unwrap(), ValueMatch::Exact("2".into())),
            ],
            ..m(PathMatch::Prefix("/a".into()))
        };
        let one_header_one_query = Match {
            headers: vec![("x-1".parse().unwrap(), ValueMatch::Exact("1".into()))],
            query: vec![("q".into(), ValueMatch::Exact("1".into()))],
            ..m(PathMatch::Prefix("/a".into()))
        };
        let one_header = Match {
            headers: vec![("x-1".parse().unwrap(), ValueMatch::Exact("1".into()))],
            ..m(PathMatch::Prefix("/a".into()))
        };
        let want = [
            &exact,
            &regex,
            &long_prefix,
            &method,
            &two_headers,
            &one_header_one_query,
            &one_header,
            &short_prefix,
        ];
        for pair in want.windows(2) {
            assert!(
                pair[0].precedence() < pair[1].precedence(),
                "{:?} before {:?}",
                pair[0],
                pair[1]
            );
        }
    }
}
