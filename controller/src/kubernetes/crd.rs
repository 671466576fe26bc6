//! Musubi's policy CRDs (`policy.musubi.io/v1alpha1`), as the controller reads them. The
//! schemas the API server enforces are in `charts/musubi/crds/`; these types decode the spec
//! and the controller checks what a schema cannot (or what objects stored before a stricter
//! schema may still hold). What the controller made of each object goes back on its status
//! as a [`Verdict`].

use crate::model::Mtls;
use serde::Deserialize;

pub const GROUP: &str = "policy.musubi.io";
pub const VERSION: &str = "v1alpha1";

/// `MeshTLS`: the mTLS mode of a namespace, of one service account's workloads, or of some of
/// their ports. The most specific one wins (ports > service account > namespace).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshTlsSpec {
    pub mode: Mtls,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// `AuthorizationPolicy`: who may connect to some ports of one service account's workloads.
/// Several policies on the same port add up (any rule allows). Rules are decoded one by one,
/// so a bad rule is dropped alone.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub service_account: String,
    pub ports: Vec<u16>,
    pub allow: Vec<serde_json::Value>,
}

/// What an object's spec is about, read leniently (unknown fields and unreadable fields
/// aside) when the spec does not decode: enough to apply the object the narrow way.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Scope {
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// A CRD object reduced to what the build needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    /// `metadata.creationTimestamp` (RFC 3339): routes rank oldest first.
    pub created: Option<String>,
    pub spec: serde_json::Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    MeshTls,
    AuthorizationPolicy,
    FaultInjection,
    RoutePolicy,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::MeshTls => "MeshTLS",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::FaultInjection => "FaultInjection",
            Kind::RoutePolicy => "RoutePolicy",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::MeshTls => "meshtls",
            Kind::AuthorizationPolicy => "authorizationpolicies",
            Kind::FaultInjection => "faultinjections",
            Kind::RoutePolicy => "routepolicies",
        }
    }
}

/// Why an object was not used as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Some allow rules were dropped; the others apply.
    InvalidRules,
    /// The spec does not decode; the object applies the narrow way, or not at all.
    InvalidSpec,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::InvalidRules => "InvalidRules",
            Refusal::InvalidSpec => "InvalidSpec",
        }
    }
}

/// What the build made of one object: accepted as written, or not (and what happened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub generation: Option<i64>,
    /// `None`: accepted as written.
    pub refused: Option<(Refusal, String)>,
}

impl Verdict {
    pub fn new(kind: Kind, o: &Object, refused: Option<(Refusal, String)>) -> Verdict {
        Verdict {
            kind,
            namespace: o.namespace.clone(),
            name: o.name.clone(),
            generation: o.generation,
            refused,
        }
    }
}
