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

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PortPolicy {
    pub mtls: MtlsMode,
    /// `None`: everyone the mTLS mode lets in is allowed.
    pub allow: Option<Vec<Rule>>,
}

impl PortPolicy {
    pub const STRICT: PortPolicy = PortPolicy {
        mtls: MtlsMode::Strict,
        allow: None,
    };
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InboundPolicy {
    pub version: u64,
    pub default: PortPolicy,
    pub ports: HashMap<u16, PortPolicy>,
}

impl Default for InboundPolicy {
    /// Mesh default: STRICT, any authenticated client.
    fn default() -> Self {
        InboundPolicy {
            version: 0,
            default: PortPolicy::STRICT,
            ports: HashMap::new(),
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
    #[error("authorization rule #{0} names no client")]
    EmptyRule(usize),
    #[error("authorization rule #{index}: {reason}")]
    BadIdentity { index: usize, reason: String },
}

fn port_policy(p: &pb::PortPolicy) -> Result<PortPolicy, PolicyError> {
    let mtls = match pb::MtlsMode::try_from(p.mtls).unwrap_or(pb::MtlsMode::Strict) {
        pb::MtlsMode::Permissive => MtlsMode::Permissive,
        pb::MtlsMode::Strict | pb::MtlsMode::Unspecified => MtlsMode::Strict,
    };
    let allow = match &p.authorization {
        None => None,
        Some(a) => Some(
            a.rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    use pb::authorization_rule::Client;
                    match &r.client {
                        Some(Client::Identity(id)) => SpiffeId::parse(id)
                            .map(|id| Rule::Identity(id.to_string()))
                            .map_err(|e| PolicyError::BadIdentity {
                                index: i,
                                reason: e.to_string(),
                            }),
                        Some(Client::Namespace(ns)) => Ok(Rule::Namespace(ns.clone())),
                        Some(Client::AnyAuthenticated(true)) => Ok(Rule::AnyAuthenticated),
                        Some(Client::Any(true)) => Ok(Rule::Any),
                        _ => Err(PolicyError::EmptyRule(i)),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(PortPolicy { mtls, allow })
}

impl TryFrom<&pb::InboundPolicy> for InboundPolicy {
    type Error = PolicyError;
    fn try_from(p: &pb::InboundPolicy) -> Result<Self, PolicyError> {
        let default = match &p.default_policy {
            Some(d) => port_policy(d)?,
            None => PortPolicy::STRICT,
        };
        let mut ports = HashMap::new();
        for pp in &p.ports {
            let port = u16::try_from(pp.port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or(PolicyError::BadPort(pp.port))?;
            ports.insert(port, port_policy(pp)?);
        }
        Ok(InboundPolicy {
            version: p.version,
            default,
            ports,
        })
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
            },
        );
        policy.ports.insert(
            81,
            PortPolicy {
                mtls: MtlsMode::Permissive,
                allow: None,
            },
        );
        policy.ports.insert(
            82,
            PortPolicy {
                mtls: MtlsMode::Strict,
                allow: Some(vec![Rule::Namespace("shop".into())]),
            },
        );
        policy.ports.insert(
            83,
            PortPolicy {
                mtls: MtlsMode::Permissive,
                allow: Some(vec![Rule::AnyAuthenticated]),
            },
        );
        policy.ports.insert(
            84,
            PortPolicy {
                mtls: MtlsMode::Strict,
                allow: Some(vec![]),
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
    fn from_proto() {
        use pb::authorization_rule::Client;
        let p = pb::InboundPolicy {
            version: 7,
            default_policy: Some(pb::PortPolicy {
                port: 0,
                mtls: pb::MtlsMode::Permissive as i32,
                authorization: None,
                protocol: 0,
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
            }],
        };
        let got = InboundPolicy::try_from(&p).unwrap();
        assert_eq!(got.version, 7);
        assert_eq!(got.default.mtls, MtlsMode::Permissive);
        assert_eq!(got.port(8080).mtls, MtlsMode::Strict);
        assert_eq!(got.port(8080).allow.as_ref().unwrap().len(), 2);

        let mut bad = p.clone();
        bad.ports[0].port = 70000;
        assert_eq!(
            InboundPolicy::try_from(&bad),
            Err(PolicyError::BadPort(70000))
        );
        let mut bad = p.clone();
        bad.ports[0].authorization = Some(pb::Authorization {
            rules: vec![pb::AuthorizationRule { client: None }],
        });
        assert_eq!(
            InboundPolicy::try_from(&bad),
            Err(PolicyError::EmptyRule(0))
        );
        let mut bad = p;
        bad.ports[0].authorization = Some(pb::Authorization {
            rules: vec![pb::AuthorizationRule {
                client: Some(Client::Identity("nope".into())),
            }],
        });
        assert!(matches!(
            InboundPolicy::try_from(&bad),
            Err(PolicyError::BadIdentity { .. })
        ));
    }
}
