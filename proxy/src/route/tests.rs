use super::*;
use http::Method;
use musubi_proto::discovery::v1 as pb;

fn path(kind: pb::MatchKind, value: &str) -> Option<pb::StringMatch> {
    Some(pb::StringMatch {
        kind: kind as i32,
        value: value.into(),
    })
}

fn backend(authority: &str, weight: u32) -> pb::WeightedBackend {
    pb::WeightedBackend {
        authority: authority.into(),
        weight,
        ..Default::default()
    }
}

fn route(name: &str, rank: u32, index: u32, matches: Vec<pb::RouteMatch>, to: &str) -> pb::Route {
    pb::Route {
        name: name.into(),
        matches,
        backends: vec![backend(to, 1)],
        rank,
        rule_index: index,
        ..Default::default()
    }
}

fn prefix(p: &str) -> pb::RouteMatch {
    pb::RouteMatch {
        path: path(pb::MatchKind::Prefix, p),
        ..Default::default()
    }
}

fn header(name: &str, value: &str) -> pb::NamedMatch {
    pb::NamedMatch {
        name: name.into(),
        kind: pb::MatchKind::Exact as i32,
        value: value.into(),
    }
}

/// The backend a request is routed to, or "404" / "unrouted".
fn target(table: &RouteTable, method: Method, uri: &str, headers: &[(&str, &str)]) -> String {
    let mut req = http::Request::builder().method(method).uri(uri);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let req = req.body(()).unwrap();
    match table.select(&Head::of(&req)) {
        RouteDecision::Unrouted => "unrouted".into(),
        RouteDecision::NoMatch => "404".into(),
        RouteDecision::Matched { rule, .. } => rule.backends[0].authority.clone(),
    }
}

#[test]
fn precedence_between_routes_is_the_specs() {
    // Written from the Gateway API text: exact path, then longest prefix, then method, then
    // most headers, then most query params; ties to the oldest route (lower rank), then the
    // first rule in its route.
    let routes = vec![
        route("shop/catch-all", 0, 0, vec![], "all"),
        route("shop/prefix", 1, 0, vec![prefix("/api")], "prefix"),
        route("shop/longer", 2, 0, vec![prefix("/api/v2")], "longer"),
        route(
            "shop/exact",
            3,
            0,
            vec![pb::RouteMatch {
                path: path(pb::MatchKind::Exact, "/api/v2/login"),
                ..Default::default()
            }],
            "exact",
        ),
        route(
            "shop/method",
            4,
            0,
            vec![pb::RouteMatch {
                method: "POST".into(),
                ..prefix("/api")
            }],
            "method",
        ),
        route(
            "shop/canary",
            5,
            0,
            vec![pb::RouteMatch {
                header_matches: vec![header("x-canary", "true")],
                ..prefix("/api")
            }],
            "canary",
        ),
        route(
            "shop/canary-v",
            6,
            0,
            vec![pb::RouteMatch {
                header_matches: vec![header("x-canary", "true")],
                query_params: vec![header("v", "2")],
                ..prefix("/api")
            }],
            "canary-v",
        ),
        // Same match as shop/canary, younger: loses the tie.
        route(
            "shop/canary-younger",
            7,
            0,
            vec![pb::RouteMatch {
                header_matches: vec![header("x-canary", "true")],
                ..prefix("/api")
            }],
            "younger",
        ),
        // Two rules of one route with the same match: the first wins.
        route("shop/rules", 8, 0, vec![prefix("/rules")], "first-rule"),
        route("shop/rules", 8, 1, vec![prefix("/rules")], "second-rule"),
    ];
    let (table, errors) = compile(&routes);
    assert!(errors.is_empty(), "{errors:?}");
    let canary = [("x-canary", "true")];
    for (method, uri, headers, want) in [
        (Method::GET, "/", &[][..], "all"),
        (Method::GET, "/apix", &[], "all"),
        (Method::GET, "/api", &[], "prefix"),
        (Method::GET, "/api/v1/users", &[], "prefix"),
        (Method::GET, "/api/v2/users", &[], "longer"),
        (Method::GET, "/api/v2/login", &[], "exact"),
        (Method::POST, "/api/v2/login", &[], "exact"),
        (Method::POST, "/api/v1", &canary, "method"),
        (Method::GET, "/api/v1", &canary, "canary"),
        (Method::GET, "/api/v1?v=2", &canary, "canary-v"),
        (Method::GET, "/api/v2/x", &canary, "longer"),
        (Method::GET, "/rules/a", &[], "first-rule"),
    ] {
        assert_eq!(
            target(&table, method.clone(), uri, headers),
            want,
            "{method} {uri} {headers:?}"
        );
    }
}

#[test]
fn no_routes_is_unrouted_and_no_match_is_404() {
    let (empty, _) = compile(&[]);
    assert_eq!(target(&empty, Method::GET, "/", &[]), "unrouted");
    let (table, _) = compile(&[route("shop/api", 0, 0, vec![prefix("/api")], "api")]);
    assert_eq!(target(&table, Method::GET, "/other", &[]), "404");
}

#[test]
fn bad_rules_are_left_out_alone_with_a_reason() {
    let good = route("shop/good", 0, 0, vec![prefix("/good")], "good");
    let bad_regex = route(
        "shop/regex",
        1,
        0,
        vec![pb::RouteMatch {
            path: path(pb::MatchKind::Regex, "/(unclosed"),
            ..Default::default()
        }],
        "x",
    );
    let huge_regex = route(
        "shop/huge",
        1,
        0,
        vec![pb::RouteMatch {
            path: path(pb::MatchKind::Regex, &"a".repeat(2000)),
            ..Default::default()
        }],
        "x",
    );
    let filter = |kind| pb::RouteFilter { kind: Some(kind) };
    let with = |name: &str, filters: Vec<pb::RouteFilter>| pb::Route {
        filters,
        ..route(name, 2, 0, vec![prefix("/f")], "x")
    };
    let cases = vec![
        (bad_regex, "regular expression"),
        (huge_regex, "over 1024"),
        (
            route(
                "shop/path",
                1,
                0,
                vec![pb::RouteMatch {
                    path: path(pb::MatchKind::Exact, "no-slash"),
                    ..Default::default()
                }],
                "x",
            ),
            "does not start with /",
        ),
        (
            route(
                "shop/header",
                1,
                0,
                vec![pb::RouteMatch {
                    header_matches: vec![header("bad header", "1")],
                    ..Default::default()
                }],
                "x",
            ),
            "not a header name",
        ),
        (
            pb::Route {
                backends: vec![backend("a", 2_000_000)],
                ..route("shop/weight", 1, 0, vec![], "x")
            },
            "over 1000000",
        ),
        (
            with("shop/unknown-filter", vec![pb::RouteFilter { kind: None }]),
            "does not know",
        ),
        (
            with(
                "shop/redirect-status",
                vec![filter(pb::route_filter::Kind::RequestRedirect(
                    pb::RequestRedirect {
                        status_code: 200,
                        ..Default::default()
                    },
                ))],
            ),
            "status 200",
        ),
        (
            with(
                "shop/both",
                vec![
                    filter(pb::route_filter::Kind::RequestRedirect(Default::default())),
                    filter(pb::route_filter::Kind::UrlRewrite(Default::default())),
                ],
            ),
            "cannot both",
        ),
        (
            with(
                "shop/fault",
                vec![filter(pb::route_filter::Kind::Fault(pb::Fault {
                    abort_http_status: 700,
                    abort_fraction: Some(pb::Fraction {
                        numerator: 5,
                        denominator: 100,
                    }),
                    ..Default::default()
                }))],
            ),
            "not 200-599",
        ),
        (
            with(
                "shop/fraction",
                vec![filter(pb::route_filter::Kind::RequestMirror(
                    pb::RequestMirror {
                        authority: "m:80".into(),
                        fraction: Some(pb::Fraction {
                            numerator: 3,
                            denominator: 2,
                        }),
                    },
                ))],
            ),
            "more than all",
        ),
        (
            pb::Route {
                timeout: Some(prost_types::Duration {
                    seconds: 1,
                    nanos: 0,
                }),
                backend_timeout: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                ..route("shop/timeouts", 1, 0, vec![], "x")
            },
            "longer than request",
        ),
        (
            pb::Route {
                filters: vec![filter(pb::route_filter::Kind::UrlRewrite(pb::UrlRewrite {
                    path: Some(pb::PathModifier {
                        kind: Some(pb::path_modifier::Kind::ReplacePrefixMatch("/v2".into())),
                    }),
                    ..Default::default()
                }))],
                ..route(
                    "shop/prefix-rewrite",
                    1,
                    0,
                    vec![pb::RouteMatch {
                        path: path(pb::MatchKind::Exact, "/a"),
                        ..Default::default()
                    }],
                    "x",
                )
            },
            "needs every match to be a PathPrefix",
        ),
    ];
    for (bad, says) in cases {
        let name = bad.name.clone();
        let (table, errors) = compile(&[good.clone(), bad]);
        assert_eq!(errors.len(), 1, "{name}: {errors:?}");
        assert!(
            errors[0].to_string().contains(says),
            "{name}: {}",
            errors[0]
        );
        assert!(errors[0].to_string().contains(&name), "{}", errors[0]);
        assert_eq!(table.rules.len(), 1, "{name}: the good rule stays");
        assert_eq!(target(&table, Method::GET, "/good", &[]), "good");
    }
}

#[test]
fn backend_draws_follow_the_weights() {
    let (table, _) = compile(&[pb::Route {
        backends: vec![
            backend("stable", 90),
            backend("canary", 10),
            backend("never", 0),
        ],
        ..route("shop/split", 0, 0, vec![], "x")
    }]);
    let rule = &table.rules[0];
    assert_eq!(rule.total_weight(), 100);
    // Every draw in [0, total) maps to exactly the weight's share.
    let mut counts = std::collections::BTreeMap::new();
    for draw in 0..rule.total_weight() {
        *counts
            .entry(rule.backend(draw).unwrap().authority.clone())
            .or_insert(0) += 1;
    }
    assert_eq!(counts.get("stable"), Some(&90));
    assert_eq!(counts.get("canary"), Some(&10));
    assert_eq!(counts.get("never"), None);
    let (zero, _) = compile(&[pb::Route {
        backends: vec![backend("a", 0)],
        ..route("shop/zero", 0, 0, vec![], "x")
    }]);
    assert!(
        zero.rules[0].pick_backend().is_none(),
        "all weights zero: no backend (500)"
    );
}

#[test]
fn grpc_rules_match_only_grpc_requests() {
    let (table, errors) = compile(&[
        pb::Route {
            kind: pb::RouteKind::Grpc as i32,
            matches: vec![pb::RouteMatch {
                grpc: Some(pb::GrpcMethodMatch {
                    kind: pb::MatchKind::Exact as i32,
                    service: "shop.Cart".into(),
                    method: String::new(),
                }),
                ..Default::default()
            }],
            ..route("shop/grpc", 0, 0, vec![], "cart")
        },
        route("shop/http", 1, 0, vec![], "http"),
    ]);
    assert!(errors.is_empty(), "{errors:?}");
    let grpc = [("content-type", "application/grpc")];
    assert_eq!(
        target(&table, Method::POST, "/shop.Cart/Add", &grpc),
        "cart"
    );
    assert_eq!(
        target(&table, Method::POST, "/shop.Other/Add", &grpc),
        "http"
    );
    assert_eq!(target(&table, Method::POST, "/shop.Cart/Add", &[]), "http");
}

#[test]
fn timeouts_convert_and_zero_disables() {
    let (table, _) = compile(&[pb::Route {
        timeout: Some(prost_types::Duration {
            seconds: 10,
            nanos: 0,
        }),
        backend_timeout: Some(prost_types::Duration {
            seconds: 0,
            nanos: 0,
        }),
        ..route("shop/t", 0, 0, vec![], "x")
    }]);
    assert_eq!(
        table.rules[0].timeouts,
        Timeouts {
            request: Some(std::time::Duration::from_secs(10)),
            backend_request: None
        }
    );
}
