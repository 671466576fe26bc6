//! Musubi's policy CRDs (`policy.musubi.io/v1alpha1`), as the controller reads them. The
//! schemas the API server enforces are in `charts/musubi/crds/`; these types decode the spec
//! and the controller checks what a schema cannot (SPIFFE IDs, exactly-one-of rules).

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
/// Several policies on the same port add up (any rule allows).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub service_account: String,
    pub ports: Vec<u16>,
    pub allow: Vec<crate::model::AllowFile>,
}

/// A CRD object reduced to what the build needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named<T> {
    pub namespace: String,
    pub name: String,
    pub spec: T,
}
