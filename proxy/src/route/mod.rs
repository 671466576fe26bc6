//! Routes: a discovery snapshot's route rules compiled once into a [`RouteTable`], and the
//! pure decision of where one request goes ([`RouteTable::select`], [`Rule::backend`]).
//! Matching and precedence follow the Gateway API (`matching`); what filters do is in
//! `filters`. A rule that does not compile is left out alone, with its reason; the others
//! still route.

mod compile;
pub mod filters;
pub mod matching;

pub use compile::{RouteError, compile};
pub use filters::{
    Abort, Fault, Fraction, HeaderModifier, Mirror, PathModifier, Redirect, Rewrite,
};
pub use matching::{Head, Match, MatchKey, PathMatch};

use musubi_proto::discovery::v1 as pb;
use std::sync::Arc;
use std::time::Duration;

/// A service's compiled table, with the discovery rules it came from (two snapshots are equal
/// when their rules are) and the rules it left out.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    pub table: Arc<RouteTable>,
    pub errors: Arc<[RouteError]>,
    source: Arc<[pb::Route]>,
}

impl Routes {
    pub fn from_pb(routes: &[pb::Route]) -> Routes {
        let (table, errors) = compile(routes);
        Routes {
            table: Arc::new(table),
            errors: errors.into(),
            source: routes.into(),
        }
    }
}

impl PartialEq for Routes {
    fn eq(&self, other: &Routes) -> bool {
        self.source == other.source
    }
}

impl Eq for Routes {}

/// For /debug/config: each rule as "<route> <rule>", and each rule left out with its reason.
impl serde::Serialize for Routes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let rules: Vec<String> = self
            .table
            .rules
            .iter()
            .map(|r| format!("{} {}", r.route, r.rule))
            .collect();
        let refused: Vec<String> = self.errors.iter().map(|e| e.to_string()).collect();
        let mut st = s.serialize_struct("Routes", 2)?;
        st.serialize_field("rules", &rules)?;
        st.serialize_field("refused", &refused)?;
        st.end()
    }
}

/// Every rule of a service's routes, with its matches ranked best first.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    pub rules: Vec<Rule>,
    /// (rule, match) pairs, best first.
    order: Vec<(usize, usize)>,
}

/// One rule of a route.
#[derive(Debug, Clone)]
pub struct Rule {
    /// "<namespace>/<route name>" (metric label `route`).
    pub route: Arc<str>,
    /// The rule's name, else its index.
    pub rule: Arc<str>,
    pub grpc: bool,
    pub matches: Vec<Match>,
    pub backends: Vec<Backend>,
    pub filters: Vec<Filter>,
    pub timeouts: Timeouts,
    pub retry: Option<RetryPolicy>,
    rank: u32,
    index: u32,
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub authority: String,
    pub weight: u32,
    pub filters: Vec<Filter>,
    /// The controller could not resolve it: its share answers 500 with this reason.
    pub invalid: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
    Fault(Fault),
}

/// GEP-1742. `None` is no timeout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// From the request's arrival to the end of its response, retries included.
    pub request: Option<Duration>,
    /// One attempt at a backend, to the end of its response.
    pub backend_request: Option<Duration>,
}

/// Carried for the resilience work; routing itself does not retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub http_codes: Vec<u16>,
    pub backoff: Option<Duration>,
}

/// Where one request goes.
#[derive(Debug, Clone, Copy)]
pub enum RouteDecision<'a> {
    /// The service has no routes: its own endpoints, as without routing.
    Unrouted,
    /// It has routes and none matches: 404.
    NoMatch,
    Matched {
        rule: &'a Rule,
        /// The matched `PathPrefix` (without its trailing `/`), for prefix rewrites.
        prefix: Option<&'a str>,
    },
}

impl RouteTable {
    fn new(rules: Vec<Rule>) -> RouteTable {
        let mut order: Vec<(usize, usize)> = rules
            .iter()
            .enumerate()
            .flat_map(|(r, rule)| (0..rule.matches.len()).map(move |m| (r, m)))
            .collect();
        order.sort_by_key(|&(r, m)| {
            let rule = &rules[r];
            (rule.matches[m].precedence(), rule.rank, rule.index, m)
        });
        RouteTable { rules, order }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn select<'a>(&'a self, head: &Head) -> RouteDecision<'a> {
        if self.rules.is_empty() {
            return RouteDecision::Unrouted;
        }
        for &(r, m) in &self.order {
            let rule = &self.rules[r];
            let matcher = &rule.matches[m];
            if matcher.matches(head) {
                let prefix = match (&matcher.path, &matcher.grpc) {
                    (PathMatch::Prefix(p), None) => Some(p.as_str()),
                    _ => None,
                };
                return RouteDecision::Matched { rule, prefix };
            }
        }
        RouteDecision::NoMatch
    }
}

impl Rule {
    pub fn total_weight(&self) -> u64 {
        self.backends.iter().map(|b| u64::from(b.weight)).sum()
    }

    /// The backend for a draw uniform in `[0, total_weight)`; `None` when every weight is 0.
    pub fn backend(&self, mut draw: u64) -> Option<&Backend> {
        for b in &self.backends {
            let w = u64::from(b.weight);
            if draw < w {
                return Some(b);
            }
            draw -= w;
        }
        None
    }

    /// Draws a backend at random, by weight.
    pub fn pick_backend(&self) -> Option<&Backend> {
        match self.total_weight() {
            0 => None,
            total => self.backend(fastrand::u64(..total)),
        }
    }
}

#[cfg(test)]
mod tests;
