//! SPIFFE IDs for workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Parsing and the trust-domain rules come from the `spiffe` crate (the SPIFFE spec's reference
//! rules); this module adds the mesh's shape of path on top.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Why a string is not an acceptable SPIFFE ID or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("invalid SPIFFE ID {input:?}: {reason}")]
    Spiffe { input: String, reason: String },
    #[error("invalid trust domain {input:?}: {reason}")]
    TrustDomain { input: String, reason: String },
    #[error("invalid {what} {input:?}: must be 1-{max} characters of a-z, 0-9, '-' or '.'")]
    Name {
        what: &'static str,
        input: String,
        max: usize,
    },
}

/// A trust domain: the authority part of a SPIFFE ID, stored lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(spiffe::TrustDomain);

impl TrustDomain {
    pub fn new(name: &str) -> Result<Self, IdError> {
        // `spiffe::TrustDomain::new` also accepts a whole SPIFFE ID; a trust domain here is a name.
        if name.contains("://") || name.contains('/') {
            return Err(IdError::TrustDomain {
                input: name.to_string(),
                reason: "a trust domain is a bare name, without scheme or path".into(),
            });
        }
        spiffe::TrustDomain::new(name)
            .map(TrustDomain)
            .map_err(|e| IdError::TrustDomain {
                input: name.to_string(),
                reason: e.to_string(),
            })
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TrustDomain::new(s)
    }
}

/// A validated SPIFFE ID. The URI text is kept alongside (shared, so clones are cheap): the
/// proxy puts it in a metric label or a header on every request.
#[derive(Debug, Clone)]
pub struct SpiffeId {
    id: spiffe::SpiffeId,
    text: Arc<str>,
}

// Equality, hashing and order follow the URI text, which the parsed form determines.
impl PartialEq for SpiffeId {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for SpiffeId {}

impl std::hash::Hash for SpiffeId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.text.hash(state);
    }
}

impl PartialOrd for SpiffeId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SpiffeId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.text.cmp(&other.text)
    }
}

/// The Kubernetes names a workload identity is made of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Workload {
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    /// Parses any valid SPIFFE ID (with a non-empty path: workload IDs always have one).
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let id = spiffe::SpiffeId::new(s).map_err(|e| IdError::Spiffe {
            input: s.to_string(),
            reason: e.to_string(),
        })?;
        if id.path().is_empty() {
            return Err(IdError::Spiffe {
                input: s.to_string(),
                reason: "a workload ID needs a path; this names only the trust domain".into(),
            });
        }
        let text = Arc::from(id.to_string());
        Ok(SpiffeId { id, text })
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service_account>`, with both names checked as
    /// Kubernetes names (a subset of what SPIFFE allows in a path segment).
    pub fn workload(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdError> {
        check_k8s_name("namespace", namespace, 63)?;
        check_k8s_name("service account", service_account, 253)?;
        Self::parse(&format!(
            "spiffe://{td}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.id.trust_domain().clone())
    }

    pub fn trust_domain_name(&self) -> &str {
        self.id.trust_domain_name()
    }

    pub fn path(&self) -> &str {
        self.id.path()
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.id.is_member_of(&td.0)
    }

    /// The full URI.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The full URI, shared (a reference count, no copy).
    pub fn shared(&self) -> Arc<str> {
        self.text.clone()
    }

    /// The namespace and service account, when the path has the mesh's
    /// `/ns/<namespace>/sa/<service-account>` shape.
    pub fn workload_names(&self) -> Option<Workload> {
        let mut parts = self.path().strip_prefix('/')?.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa)) if parts.next().is_none() => {
                Some(Workload {
                    namespace: ns.to_string(),
                    service_account: sa.to_string(),
                })
            }
            _ => None,
        }
    }

    pub fn namespace(&self) -> Option<String> {
        self.workload_names().map(|w| w.namespace)
    }

    /// The full URI, as it appears in a certificate's SAN.
    pub fn uri(&self) -> String {
        self.text.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

fn check_k8s_name(what: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(IdError::Name {
            what,
            input: s.to_string(),
            max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    #[test]
    fn parse_table() {
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("spiffe://cluster.local/ns/a/sa/x", Ok("cluster.local")),
            ("spiffe://Cluster.Local/ns/a/sa/x", Ok("cluster.local")),
            ("spiffe://td/anything/else", Ok("td")),
            ("", Err("cannot be empty")),
            ("http://cluster.local/ns/a", Err("scheme")),
            ("spiffe://cluster.local", Err("needs a path")),
            ("spiffe:///ns/a", Err("trust domain is missing")),
            ("spiffe://cluster.local/ns//sa/x", Err("empty segments")),
            ("spiffe://cluster.local/ns/a/sa/x/", Err("trailing slash")),
            ("spiffe://cluster.local/ns/../sa/x", Err("dot segments")),
            ("spiffe://cluster.local/ns/a b", Err("path segment")),
            ("spiffe://clu$ter/ns/a", Err("trust domain may only")),
        ];
        for (input, want) in cases {
            match (SpiffeId::parse(input), want) {
                (Ok(id), Ok(td)) => assert_eq!(id.trust_domain_name(), *td, "{input}"),
                (Err(e), Err(reason)) => {
                    assert!(e.to_string().contains(reason), "{input}: {e}")
                }
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn workload_round_trip() {
        let id = SpiffeId::workload(&td(), "shop", "web").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(
            id.workload_names(),
            Some(Workload {
                namespace: "shop".into(),
                service_account: "web".into()
            })
        );
        let parsed: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(parsed, id);
    }

    #[test]
    fn workload_names_only_for_mesh_shape() {
        for s in [
            "spiffe://td/ns/a",
            "spiffe://td/ns/a/sa/b/c",
            "spiffe://td/sa/a/ns/b",
            "spiffe://td/x/a/sa/b",
        ] {
            assert_eq!(SpiffeId::parse(s).unwrap().workload_names(), None, "{s}");
        }
    }

    #[test]
    fn workload_rejects_bad_names() {
        for (ns, sa) in [
            ("", "x"),
            ("a", ""),
            ("A", "x"),
            ("a", "x_y"),
            ("-a", "x"),
            ("a", "x."),
            ("a/b", "x"),
        ] {
            let err = SpiffeId::workload(&td(), ns, sa).unwrap_err();
            assert!(matches!(err, IdError::Name { .. }), "{ns}/{sa}: {err}");
        }
        assert!(SpiffeId::workload(&td(), &"a".repeat(64), "x").is_err());
    }

    #[test]
    fn trust_domain_rules() {
        assert_eq!(
            TrustDomain::new("Example.ORG").unwrap().as_str(),
            "example.org"
        );
        assert!(TrustDomain::new("spiffe://example.org").is_err());
        assert!(TrustDomain::new("example.org/x").is_err());
        assert!(TrustDomain::new("").is_err());
        let id = SpiffeId::workload(&td(), "a", "b").unwrap();
        assert!(id.is_member_of(&td()));
        assert!(!id.is_member_of(&TrustDomain::new("other").unwrap()));
    }
}
