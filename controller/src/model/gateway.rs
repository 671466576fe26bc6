//! Routes in the shape of Gateway API's `HTTPRoute` / `GRPCRoute` specs (standard channel,
//! v1.x) and Musubi's `FaultInjection`: what the mesh file's `routes` and `faultInjections`
//! hold, field for field, so a route moves between the file and Kubernetes unchanged.
//! Documented in `docs/mesh-file.md` and `docs/routing.md`.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum RouteKind {
    #[default]
    #[serde(rename = "HTTPRoute")]
    Http,
    #[serde(rename = "GRPCRoute")]
    Grpc,
}

/// A route of the mesh file: the object's name and namespace, then its spec.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteFile {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub kind: RouteKind,
    pub parent_refs: Vec<ParentRef>,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// GAMMA: a Service as parent. A route in the Service's namespace is a producer route (every
/// client); one in another namespace is a consumer route (clients in the route's namespace).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    /// Absent: every port of the Service.
    #[serde(default)]
    pub port: Option<u16>,
    /// Not supported for a Service parent (name the `port` instead).
    #[serde(default)]
    pub section_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<MatchSpec>,
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MatchSpec {
    /// HTTPRoute only.
    #[serde(default)]
    pub path: Option<PathMatchSpec>,
    #[serde(default)]
    pub headers: Vec<NamedMatchSpec>,
    /// HTTPRoute only.
    #[serde(default)]
    pub query_params: Vec<NamedMatchSpec>,
    /// HTTPRoute: an HTTP method (`GET`); GRPCRoute: `{type, service, method}`.
    #[serde(default)]
    pub method: Option<MethodSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MethodSpec {
    Http(String),
    Grpc(GrpcMethodSpec),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcMethodSpec {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathMatchSpec {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NamedMatchSpec {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FilterSpec {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub request_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default)]
    pub response_header_modifier: Option<HeaderModifierSpec>,
    #[serde(default)]
    pub request_redirect: Option<RedirectSpec>,
    #[serde(default)]
    pub url_rewrite: Option<RewriteSpec>,
    #[serde(default)]
    pub request_mirror: Option<MirrorSpec>,
    #[serde(default)]
    pub extension_ref: Option<ExtensionRef>,
    /// Read so that a `CORS` filter is refused by its type, with a clear reason.
    #[serde(default)]
    pub cors: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderModifierSpec {
    #[serde(default)]
    pub set: Vec<HeaderSpec>,
    #[serde(default)]
    pub add: Vec<HeaderSpec>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderSpec {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathModifierSpec {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub replace_full_path: Option<String>,
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RedirectSpec {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub status_code: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RewriteSpec {
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub path: Option<PathModifierSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MirrorSpec {
    pub backend_ref: BackendObject,
    /// 0-100; with `fraction`, exactly one. Neither: every request.
    #[serde(default)]
    pub percent: Option<u32>,
    #[serde(default)]
    pub fraction: Option<FractionSpec>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FractionSpec {
    pub numerator: u32,
    /// Default 100.
    #[serde(default)]
    pub denominator: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExtensionRef {
    pub group: String,
    pub kind: String,
    pub name: String,
}

/// A Service to send to: `name` in `namespace` (default: the route's) on `port` (default: the
/// parent's port).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendObject {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(flatten)]
    pub object: BackendObject,
    /// 0-1,000,000, default 1; 0 sends nothing.
    #[serde(default)]
    pub weight: Option<u32>,
    /// Header modifiers for this backend only.
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    /// GEP-2257 durations (`10s`, `1m30s`, `500ms`); `0s` disables.
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub backend_request: Option<String>,
}

/// Musubi's `FaultInjection` (group `policy.musubi.io`): what an `ExtensionRef` filter points at.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultInjectionFile {
    pub name: String,
    pub namespace: String,
    #[serde(flatten)]
    pub spec: FaultSpec,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultSpec {
    #[serde(default)]
    pub delay: Option<DelaySpec>,
    #[serde(default)]
    pub abort: Option<AbortSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DelaySpec {
    pub fixed_delay: String,
    /// 0-100 (fractions allowed, like Istio's `percentage.value`). Absent: no delay.
    #[serde(default)]
    pub percentage: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AbortSpec {
    /// HTTPRoute: the status to answer with (200-599).
    #[serde(default)]
    pub http_status: Option<u16>,
    /// GRPCRoute: a gRPC code, by number (1-16) or name (`UNAVAILABLE`).
    #[serde(default)]
    pub grpc_status: Option<GrpcCode>,
    #[serde(default)]
    pub percentage: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum GrpcCode {
    Number(u32),
    Name(String),
}

/// Musubi's `RoutePolicy` (group `policy.musubi.io`): what Gateway API has no field for,
/// attached to routes by `targetRefs` (Gateway API policy attachment): timeouts for GRPCRoute
/// rules, which have none (and for HTTPRoute rules without their own). The resilience work adds
/// retries here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RoutePolicyFile {
    pub name: String,
    pub namespace: String,
    #[serde(flatten)]
    pub spec: RoutePolicySpec,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RoutePolicySpec {
    pub target_refs: Vec<TargetRef>,
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
}

/// A route in the policy's namespace; `sectionName` names one rule (by its `name`), else every
/// rule of the route.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub section_name: Option<String>,
}
