//! Inbound policy: per port, whether mesh mTLS is required and who may connect; and the pure
//! authorization decision over it.

use musubi_identity::{SpiffeId, TrustDomain};
use musubi_proto::policy::v1 as pb;
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MtlsMode {
    Strict,
    Permissive,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Rule {
    Identity(String),
    Namespace(String),
    AnyAuthenticated,
    Any,
}

/// What the application speaks on a port; the server side decides by it what may reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum PortProtocol {
    /// Decided from the first bytes; anything that may be HTTP is served as HTTP.
    #[default]
    Detect,
    /// An HTTP/1.1 application: requests reach it as HTTP/1.1.
    Http1,
    /// An HTTP/2 application (gRPC, h2c): requests reach it as HTTP/2.
    Http2,
    /// Bytes pass untouched; no HTTP features and no `musubi-client-id`.
    Opaque,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PortPolicy {
    pub mtls: MtlsMode,
    /// `None`: everyone the mTLS mode lets in is allowed.
    pub allow: Option<Vec<Rule>>,
    pub protocol: PortProtocol,
    /// The Services that target this port (canonical authorities), for metric labels.
    pub services: Vec<ServiceName>,
}

impl PortPolicy {
    pub const STRICT: PortPolicy = PortPolicy {
        mtls: MtlsMode::Strict,
        allow: None,
        protocol: PortProtocol::Detect,
        services: Vec::new(),
    };

    /// The canonical authority of the Service a request addressed, if it is one of this
    /// port's: `name`, `name.ns`, `name.ns.svc` or the full name, with the Service's port or
    /// none. Anything else (an IP address, a made-up Host) names no Service.
    pub fn service_for(&self, authority: &str) -> Option<&ServiceName> {
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, p.parse::<u16>().ok()),
            _ => (authority, None),
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        self.services.iter().find(|s| {
            port.is_none_or(|p| p == s.port) && s.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
        })
    }
}

/// A Service that targets a port, and the host names it answers to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceName {
    /// `name.namespace.svc.<cluster-domain>:port`.
    pub canonical: String,
    #[serde(skip)]
    pub hosts: Vec<String>,
    #[serde(skip)]
    pub port: u16,
}

impl ServiceName {
    /// From `name.namespace.svc.<cluster-domain>:port`; `None` when it is not of that shape.
    pub fn parse(canonical: &str) -> Option<ServiceName> {
        let (host, port) = canonical.rsplit_once(':')?;
        let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
        let labels: Vec<&str> = host.split('.').collect();
        if labels.len() < 4 || labels[2] != "svc" || labels.iter().any(|l| l.is_empty()) {
            return None;
        }
        let hosts = vec![
            labels[0].to_string(),
            labels[..2].join("."),
            labels[..3].join("."),
            host.to_string(),
        ];
        Some(ServiceName {
            canonical: canonical.to_string(),
            hosts,
            port,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InboundPolicy {
    pub version: u64,
    pub default: PortPolicy,
    /// Every port here is a declared application port of the workload.
    pub ports: HashMap<u16, PortPolicy>,
    /// Rules the controller sent that could not be used; each was dropped alone (narrowing).
    #[serde(skip)]
    pub dropped: Vec<PolicyError>,
}

impl Default for InboundPolicy {
    /// Mesh default: STRICT, any authenticated client.
    fn default() -> Self {
        InboundPolicy {
            version: 0,
            default: PortPolicy::STRICT,
            ports: HashMap::new(),
            dropped: Vec::new(),
        }
    }
}

impl InboundPolicy {
    pub fn port(&self, port: u16) -> &PortPolicy {
        self.ports.get(&port).unwrap_or(&self.default)
    }
}

/// Who is connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Verified by mesh mTLS.
    Mesh(SpiffeId),
    /// Plaintext (or non-mesh TLS): no identity.
    Unauthenticated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Plaintext on a STRICT port.
    DenyPlaintext,
    /// No rule allows this client.
    DenyUnauthorized,
}

impl Decision {
    pub fn label(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::DenyPlaintext => "deny_plaintext",
            Decision::DenyUnauthorized => "deny_unauthorized",
        }
    }
}

fn matches(rule: &Rule, peer: &Peer, td: &TrustDomain) -> bool {
    match (rule, peer) {
        (Rule::Any, _) => true,
        (_, Peer::Unauthenticated) => false,
        (Rule::AnyAuthenticated, Peer::Mesh(id)) => id.is_member_of(td),
        (Rule::Identity(want), Peer::Mesh(id)) => *want == id.to_string(),
        (Rule::Namespace(ns), Peer::Mesh(id)) => {
            id.is_member_of(td) && id.namespace().as_deref() == Some(ns.as_str())
        }
    }
}

/// Whether `peer` may talk to `port`.
pub fn authorize(policy: &InboundPolicy, port: u16, peer: &Peer, td: &TrustDomain) -> Decision {
    let p = policy.port(port);
    if *peer == Peer::Unauthenticated && p.mtls == MtlsMode::Strict {
        return Decision::DenyPlaintext;
    }
    match &p.allow {
        None => Decision::Allow,
        Some(rules) if rules.iter().any(|r| matches(r, peer, td)) => Decision::Allow,
        Some(_) => Decision::DenyUnauthorized,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("port {0} is not a valid port")]
    BadPort(u32),
    #[error("port {port}: authorization rule #{index} names no client")]
    EmptyRule { port: u32, index: usize },
    #[error("port {port}: authorization rule #{index}: {reason}")]
    BadIdentity {
        port: u32,
        index: usize,
        reason: String,
    },
}

/// One port's policy. A rule that cannot be used is dropped alone and reported: with fewer
/// rules the port allows fewer clients, never more (an empty list allows nobody).
fn port_policy(p: &pb::PortPolicy, dropped: &mut Vec<PolicyError>) -> PortPolicy {
    let mtls = match pb::MtlsMode::try_from(p.mtls).unwrap_or(pb::MtlsMode::Strict) {
        pb::MtlsMode::Permissive => MtlsMode::Permissive,
        pb::MtlsMode::Strict | pb::MtlsMode::Unspecified => MtlsMode::Strict,
    };
    let protocol = match pb::PortProtocol::try_from(p.protocol).unwrap_or(pb::PortProtocol::Detect)
    {
        pb::PortProtocol::Detect => PortProtocol::Detect,
        pb::PortProtocol::Http1 => PortProtocol::Http1,
        pb::PortProtocol::Http2 => PortProtocol::Http2,
        pb::PortProtocol::Opaque => PortProtocol::Opaque,
    };
    let allow = p.authorization.as_ref().map(|a| {
        let mut rules = Vec::with_capacity(a.rules.len());
        for (index, r) in a.rules.iter().enumerate() {
            use pb::authorization_rule::Client;
            let rule = match &r.client {
                Some(Client::Identity(id)) => SpiffeId::parse(id)
                    .map(|id| Rule::Identity(id.to_string()))
                    .map_err(|e| PolicyError::BadIdentity {
                        port: p.port,
                        index,
                        reason: e.to_string(),
                    }),
                Some(Client::Namespace(ns)) => Ok(Rule::Namespace(ns.clone())),
                Some(Client::AnyAuthenticated(true)) => Ok(Rule::AnyAuthenticated),
                Some(Client::Any(true)) => Ok(Rule::Any),
                _ => Err(PolicyError::EmptyRule {
                    port: p.port,
                    index,
                }),
            };
            match rule {
                Ok(rule) => rules.push(rule),
                Err(e) => dropped.push(e),
            }
        }
        rules
    });
    let services = p
        .authorities
        .iter()
        .filter_map(|a| ServiceName::parse(a))
        .collect();
    PortPolicy {
        mtls,
        allow,
        protocol,
        services,
    }
}

impl From<&pb::InboundPolicy> for InboundPolicy {
    /// Never fails: what cannot be used is dropped (and listed in `dropped`) in the direction
    /// that lets fewer clients in. A port entry with an invalid number names no port anyone
    /// can connect to, so dropping it loses nothing.
    fn from(p: &pb::InboundPolicy) -> Self {
        let mut dropped = Vec::new();
        let default = match &p.default_policy {
            Some(d) => port_policy(d, &mut dropped),
            None => PortPolicy::STRICT,
        };
        let mut ports = HashMap::new();
        for pp in &p.ports {
            match u16::try_from(pp.port).ok().filter(|p| *p > 0) {
                Some(port) => {
                    ports.insert(port, port_policy(pp, &mut dropped));
                }
                None => dropped.push(PolicyError::BadPort(pp.port)),
            }
        }
        InboundPolicy {
            version: p.version,
            default,
            ports,
            dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn mesh(s: &str) -> Peer {
        Peer::Mesh(SpiffeId::parse(s).unwrap())
    }

    #[test]
    fn authorize_table() {
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let mut policy = InboundPolicy::default();
        policy.ports.insert(
            80,
            PortPolicy {
                mtls: MtlsMode::Strict,
                allow: Some(vec![Rule::Identity(web.into())]),
                protocol: PortProtocol::Detect,
                services: vec![],
            },
        );
        policy.ports.insert(
            81,
            PortPolicy {
                mtls: MtlsMode::Permissive,
                allow: None,
                protocol: PortProtocol::Detect,
                services: vec![],
            },
        );
        policy.ports.insert(
            82,
            PortPolicy {
                mtls: MtlsMode::Strict,
                allow: Some(vec![Rule::Namespace("shop".into())]),
                protocol: PortProtocol::Detect,
                services: vec![],
            },
        );
        policy.ports.insert(
            83,
            PortPolicy {
                mtls: MtlsMode::Permissive,
                allow: Some(vec![Rule::AnyAuthenticated]),
                protocol: PortProtocol::Detect,
                services: vec![],
            },
        );
        policy.ports.insert(
            84,
            PortPolicy {
                mtls: MtlsMode::Strict,
                allow: Some(vec![]),
                protocol: PortProtocol::Detect,
                services: vec![],
            },
        );
        use Decision::*;
        let cases = [
            (80, mesh(web), Allow),
            (
                80,
                mesh("spiffe://cluster.local/ns/shop/sa/db"),
                DenyUnauthorized,
            ),
            (80, Peer::Unauthenticated, DenyPlaintext),
            (81, Peer::Unauthenticated, Allow),
            (81, mesh(web), Allow),
            (82, mesh("spiffe://cluster.local/ns/shop/sa/any"), Allow),
            (
                82,
                mesh("spiffe://cluster.local/ns/other/sa/web"),
                DenyUnauthorized,
            ),
            (
                82,
                mesh("spiffe://evil.org/ns/shop/sa/web"),
                DenyUnauthorized,
            ),
            (83, Peer::Unauthenticated, DenyUnauthorized),
            (83, mesh(web), Allow),
            (84, mesh(web), DenyUnauthorized),
            (9999, mesh(web), Allow),
            (9999, Peer::Unauthenticated, DenyPlaintext),
        ];
        for (port, peer, want) in cases {
            assert_eq!(
                authorize(&policy, port, &peer, &td()),
                want,
                "{port} {peer:?}"
            );
        }
    }

    #[test]
    fn service_names_table() {
        let mut p = PortPolicy::STRICT;
        p.services = [
            "api.shop.svc.cluster.local:80",
            "api-v2.shop.svc.cluster.local:8080",
        ]
        .iter()
        .filter_map(|a| ServiceName::parse(a))
        .collect();
        let cases = [
            ("api", Some("api.shop.svc.cluster.local:80")),
            ("api:80", Some("api.shop.svc.cluster.local:80")),
            ("API.shop", Some("api.shop.svc.cluster.local:80")),
            ("api.shop.svc:80", Some("api.shop.svc.cluster.local:80")),
            (
                "api.shop.svc.cluster.local.:80",
                Some("api.shop.svc.cluster.local:80"),
            ),
            (
                "api-v2.shop:8080",
                Some("api-v2.shop.svc.cluster.local:8080"),
            ),
            ("api:8080", None),
            ("api.other", None),
            ("10.0.0.1:80", None),
            ("junk-1234.example.com", None),
            ("[::1]:80", None),
        ];
        for (authority, want) in cases {
            assert_eq!(
                p.service_for(authority).map(|s| s.canonical.as_str()),
                want,
                "{authority}"
            );
        }
        assert!(ServiceName::parse("api:80").is_none());
        assert!(ServiceName::parse("api.shop.svc.cluster.local").is_none());
    }

    #[test]
    fn from_proto() {
        use pb::authorization_rule::Client;
        let p = pb::InboundPolicy {
            version: 7,
            default_policy: Some(pb::PortPolicy {
                port: 0,
                mtls: pb::MtlsMode::Permissive as i32,
                authorization: None,
                protocol: 0,
                authorities: vec![],
            }),
            ports: vec![pb::PortPolicy {
                port: 8080,
                mtls: 0,
                authorization: Some(pb::Authorization {
                    rules: vec![
                        pb::AuthorizationRule {
                            client: Some(Client::Identity(
                                "spiffe://cluster.local/ns/a/sa/b".into(),
                            )),
                        },
                        pb::AuthorizationRule {
                            client: Some(Client::Namespace("a".into())),
                        },
                    ],
                }),
                protocol: 0,
                authorities: vec![],
            }],
        };
        let got = InboundPolicy::from(&p);
        assert_eq!(got.version, 7);
        assert_eq!(got.default.mtls, MtlsMode::Permissive);
        assert_eq!(got.port(8080).mtls, MtlsMode::Strict);
        assert_eq!(got.port(8080).allow.as_ref().unwrap().len(), 2);
        assert!(got.dropped.is_empty());

        let protocol = |v: pb::PortProtocol| {
            let mut q = p.clone();
            q.ports[0].protocol = v as i32;
            InboundPolicy::from(&q).port(8080).protocol
        };
        assert_eq!(protocol(pb::PortProtocol::Http1), PortProtocol::Http1);
        assert_eq!(protocol(pb::PortProtocol::Http2), PortProtocol::Http2);
        assert_eq!(protocol(pb::PortProtocol::Opaque), PortProtocol::Opaque);
        assert_eq!(protocol(pb::PortProtocol::Detect), PortProtocol::Detect);

        // What cannot be used is dropped alone, so the policy only ever gets narrower.
        let mut bad = p.clone();
        bad.ports[0].port = 70000;
        let got = InboundPolicy::from(&bad);
        assert!(got.ports.is_empty());
        assert_eq!(got.dropped, vec![PolicyError::BadPort(70000)]);
        let rules = |rules: Vec<pb::AuthorizationRule>| {
            let mut q = p.clone();
            q.ports[0].authorization = Some(pb::Authorization { rules });
            InboundPolicy::from(&q)
        };
        let namespace = pb::AuthorizationRule {
            client: Some(Client::Namespace("a".into())),
        };
        let got = rules(vec![
            pb::AuthorizationRule { client: None },
            pb::AuthorizationRule {
                client: Some(Client::Identity("nope".into())),
            },
            namespace,
        ]);
        assert_eq!(
            got.port(8080).allow,
            Some(vec![Rule::Namespace("a".into())]),
            "the good rule stays"
        );
        assert_eq!(got.dropped.len(), 2);
        assert!(matches!(
            got.dropped[0],
            PolicyError::EmptyRule {
                port: 8080,
                index: 0
            }
        ));
        assert!(matches!(
            got.dropped[1],
            PolicyError::BadIdentity {
                port: 8080,
                index: 1,
                ..
            }
        ));
        let got = rules(vec![pb::AuthorizationRule {
            client: Some(Client::Identity("spiffe://x/../y".into())),
        }]);
        assert_eq!(
            got.port(8080).allow,
            Some(vec![]),
            "all rules bad: nobody is allowed"
        );
        let web = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/web").unwrap();
        assert_eq!(
            authorize(&got, 8080, &Peer::Mesh(web), &td()),
            Decision::DenyUnauthorized
        );
    }
}
