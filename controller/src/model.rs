//! The mesh file's shape and what it means: validation into [`MeshState`], and the pure
//! decisions the streams serve from it (`resolve`, `policy_for`). Documented in
//! `docs/mesh-file.md`.

pub mod gateway;
pub mod ports;
pub mod routes;

use musubi_identity::{SpiffeId, TrustDomain};
use musubi_proto::discovery::v1 as dpb;
use musubi_proto::policy::v1 as ppb;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mtls {
    #[default]
    Strict,
    Permissive,
}

impl Mtls {
    /// `STRICT` or `PERMISSIVE`, in any case (flags, namespace annotations).
    pub fn parse(v: &str) -> Option<Mtls> {
        match v.to_ascii_uppercase().as_str() {
            "STRICT" => Some(Mtls::Strict),
            "PERMISSIVE" => Some(Mtls::Permissive),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshFile {
    #[serde(default = "cluster_local")]
    pub trust_domain: String,
    #[serde(default = "cluster_local")]
    pub cluster_domain: String,
    #[serde(default)]
    pub mtls: Mtls,
    #[serde(default)]
    pub namespaces: BTreeMap<String, NamespaceFile>,
    #[serde(default)]
    pub services: Vec<ServiceFile>,
    #[serde(default)]
    pub workloads: Vec<WorkloadFile>,
    /// Gateway API `HTTPRoute` / `GRPCRoute` objects with a Service as parent (GAMMA).
    #[serde(default)]
    pub routes: Vec<gateway::RouteFile>,
    /// Musubi `FaultInjection` objects, used by routes through `ExtensionRef` filters.
    #[serde(default)]
    pub fault_injections: Vec<gateway::FaultInjectionFile>,
    /// Musubi `RoutePolicy` objects: timeouts for GRPCRoute rules (and HTTPRoute rules without
    /// their own).
    #[serde(default)]
    pub route_policies: Vec<gateway::RoutePolicyFile>,
}

fn cluster_local() -> String {
    "cluster.local".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceFile {
    pub mtls: Option<Mtls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceFile {
    pub name: String,
    pub namespace: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub endpoints: Vec<EndpointFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointFile {
    pub address: String,
    pub port: u16,
    pub service_account: Option<String>,
    #[serde(default)]
    pub proxy_port: u16,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default = "yes")]
    pub ready: bool,
    /// `musubi` (default) or `h2-mtls` for a peer that is not a Musubi proxy.
    #[serde(default)]
    pub transport: Option<String>,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadFile {
    pub namespace: String,
    pub service_account: String,
    #[serde(default)]
    pub ports: Vec<PortFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortFile {
    pub port: u16,
    pub mtls: Option<Mtls>,
    pub allow: Option<Vec<AllowFile>>,
    /// What the application speaks here; absent: what the services targeting the port say.
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowFile {
    pub identity: Option<String>,
    pub namespace: Option<String>,
    pub authenticated: Option<bool>,
    pub any: Option<bool>,
}

/// A validated mesh: what the streams answer from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeshState {
    pub trust_domain: String,
    pub cluster_domain: String,
    pub mtls: Mtls,
    pub namespace_mtls: BTreeMap<String, Mtls>,
    pub services: Vec<Service>,
    /// Keyed by (namespace, service account).
    pub workloads: BTreeMap<(String, String), Vec<ppb::PortPolicy>>,
    /// A workload's mode for ports without a policy of their own (Kubernetes `MeshTLS` for a
    /// service account); keyed by (namespace, service account).
    pub workload_mtls: BTreeMap<(String, String), Mtls>,
    /// Consumer routes (GAMMA): keyed by (the clients' namespace, the Service's authority); for
    /// those clients they replace the Service's own (producer) routes.
    pub consumer_routes: BTreeMap<(String, String), Vec<dpb::Route>>,
    /// Whether everything policy is made of is known (Kubernetes: the `MeshTLS` and
    /// `AuthorizationPolicy` watches have listed; always for a mesh file). Until then policy
    /// streams answer nothing: a policy built without them could be wider than they say.
    pub policy_ready: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub port: u16,
    pub addresses: Vec<IpAddr>,
    pub proto: dpb::Service,
}

/// A semantic problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct Invalid {
    pub path: String,
    pub problem: String,
    /// Text to look for to find the line (the offending value).
    pub needle: String,
}

fn invalid(path: String, problem: impl Into<String>, needle: impl Into<String>) -> Invalid {
    Invalid {
        path,
        problem: problem.into(),
        needle: needle.into(),
    }
}

fn parse_protocol(p: Option<&str>, path: &str) -> Result<dpb::Protocol, Invalid> {
    Ok(match p.unwrap_or("detect") {
        "detect" => dpb::Protocol::Detect,
        "http" | "http1" => dpb::Protocol::Http1,
        "http2" | "grpc" => dpb::Protocol::Http2,
        "opaque" | "tcp" => dpb::Protocol::Opaque,
        other => {
            return Err(invalid(
                format!("{path}.protocol"),
                format!("{other:?} is not one of detect, http, http2, grpc, opaque"),
                other,
            ));
        }
    })
}

pub(crate) fn rule(a: &AllowFile, path: &str) -> Result<ppb::AuthorizationRule, Invalid> {
    use ppb::authorization_rule::Client;
    let client = match (&a.identity, &a.namespace, a.authenticated, a.any) {
        (Some(id), None, None, None) => {
            SpiffeId::parse(id)
                .map_err(|e| invalid(format!("{path}.identity"), e.to_string(), id.clone()))?;
            Client::Identity(id.clone())
        }
        (None, Some(ns), None, None) => Client::Namespace(ns.clone()),
        (None, None, Some(true), None) => Client::AnyAuthenticated(true),
        (None, None, None, Some(true)) => Client::Any(true),
        _ => {
            return Err(invalid(
                path.to_string(),
                "an allow rule is exactly one of identity, namespace, authenticated: true, any: true",
                "allow",
            ));
        }
    };
    Ok(ppb::AuthorizationRule {
        client: Some(client),
    })
}

pub(crate) fn mtls_pb(m: Mtls) -> i32 {
    match m {
        Mtls::Strict => ppb::MtlsMode::Strict as i32,
        Mtls::Permissive => ppb::MtlsMode::Permissive as i32,
    }
}

/// The mode of a namespace: its own, else the mesh's.
fn namespace_mode(state_ns: &BTreeMap<String, Mtls>, mesh: Mtls, ns: &str) -> Mtls {
    state_ns.get(ns).copied().unwrap_or(mesh)
}

impl MeshFile {
    pub fn validate(&self) -> Result<MeshState, Invalid> {
        self.check().map(|(state, _)| state)
    }

    /// Like [`MeshFile::validate`], with the problems that do not refuse the file (protocol
    /// conflicts between services, decided the safe way), each naming where it is.
    pub fn check(&self) -> Result<(MeshState, Vec<String>), Invalid> {
        let td = TrustDomain::new(&self.trust_domain).map_err(|e| {
            invalid(
                "trustDomain".into(),
                e.to_string(),
                self.trust_domain.clone(),
            )
        })?;
        let namespace_mtls: BTreeMap<String, Mtls> = self
            .namespaces
            .iter()
            .filter_map(|(k, v)| v.mtls.map(|m| (k.clone(), m)))
            .collect();
        let mut services: Vec<Service> = Vec::new();
        // Ports services target on each workload, with what each service says they speak.
        let mut declared: BTreeMap<(String, String), BTreeMap<u16, ports::Claims>> =
            BTreeMap::new();
        for (i, s) in self.services.iter().enumerate() {
            let path = format!("services[{i}]");
            SpiffeId::workload(&td, &s.namespace, &s.name)
                .map_err(|e| invalid(format!("{path}.name"), e.to_string(), s.name.clone()))?;
            if s.port == 0 {
                return Err(invalid(
                    format!("{path}.port"),
                    "must be 1-65535",
                    "port: 0",
                ));
            }
            if services
                .iter()
                .any(|o| o.name == s.name && o.namespace == s.namespace && o.port == s.port)
            {
                return Err(invalid(
                    path.to_string(),
                    "duplicate service (same name, namespace and port)",
                    s.name.clone(),
                ));
            }
            let proto = parse_protocol(s.protocol.as_deref(), &path)?;
            let mut addresses = Vec::new();
            for (j, a) in s.addresses.iter().enumerate() {
                addresses.push(a.parse::<IpAddr>().map_err(|_| {
                    invalid(
                        format!("{path}.addresses[{j}]"),
                        format!("{a:?} is not an IP address"),
                        a.clone(),
                    )
                })?);
            }
            let mut endpoints = Vec::new();
            for (j, e) in s.endpoints.iter().enumerate() {
                let ep_path = format!("{path}.endpoints[{j}]");
                e.address.parse::<IpAddr>().map_err(|_| {
                    invalid(
                        format!("{ep_path}.address"),
                        format!("{:?} is not an IP address", e.address),
                        e.address.clone(),
                    )
                })?;
                if e.port == 0 {
                    return Err(invalid(
                        format!("{ep_path}.port"),
                        "must be 1-65535",
                        "port: 0",
                    ));
                }
                let identity = match &e.service_account {
                    Some(sa) => {
                        let id = SpiffeId::workload(&td, &s.namespace, sa).map_err(|err| {
                            invalid(
                                format!("{ep_path}.serviceAccount"),
                                err.to_string(),
                                sa.clone(),
                            )
                        })?;
                        declared
                            .entry((s.namespace.clone(), sa.clone()))
                            .or_default()
                            .entry(e.port)
                            .or_default()
                            .add(
                                ports::port_protocol(proto),
                                format!("{path} ({}.{})", s.name, s.namespace),
                            );
                        id.to_string()
                    }
                    None => String::new(),
                };
                // Unmeshed: reached in plaintext only where its namespace says so.
                let plaintext_allowed = identity.is_empty()
                    && namespace_mode(&namespace_mtls, self.mtls, &s.namespace) == Mtls::Permissive;
                let transport = match e.transport.as_deref() {
                    None | Some("musubi") => dpb::Transport::Musubi,
                    Some("h2-mtls") => dpb::Transport::H2Mtls,
                    Some(other) => {
                        return Err(invalid(
                            format!("{ep_path}.transport"),
                            format!("{other:?} is not musubi or h2-mtls"),
                            other,
                        ));
                    }
                };
                endpoints.push(dpb::Endpoint {
                    address: e.address.clone(),
                    port: u32::from(e.port),
                    identity,
                    weight: e.weight,
                    ready: e.ready,
                    proxy_port: u32::from(e.proxy_port),
                    labels: Default::default(),
                    transport: transport as i32,
                    plaintext_allowed,
                });
            }
            services.push(Service {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                port: s.port,
                addresses,
                proto: dpb::Service {
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    authority: format!(
                        "{}.{}.svc.{}:{}",
                        s.name, s.namespace, self.cluster_domain, s.port
                    ),
                    port: u32::from(s.port),
                    protocol: proto as i32,
                    endpoints,
                    routes: vec![],
                    client_policy: None,
                },
            });
        }
        let mut route_set = routes::build(
            &self.routes,
            &self.fault_injections,
            &self.route_policies,
            &services,
        )?;
        for s in &mut services {
            if let Some(r) = route_set.producer.remove(&s.proto.authority) {
                s.proto.routes = r;
            }
        }
        let mut warnings = Vec::new();
        let mut workloads = BTreeMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let path = format!("workloads[{i}]");
            SpiffeId::workload(&td, &w.namespace, &w.service_account).map_err(|e| {
                invalid(
                    format!("{path}.serviceAccount"),
                    e.to_string(),
                    w.service_account.clone(),
                )
            })?;
            let mut ports: Vec<ppb::PortPolicy> = Vec::new();
            let key = (w.namespace.clone(), w.service_account.clone());
            let targeted = declared.remove(&key).unwrap_or_default();
            for (j, p) in w.ports.iter().enumerate() {
                let pp = format!("{path}.ports[{j}]");
                if p.port == 0 {
                    return Err(invalid(format!("{pp}.port"), "must be 1-65535", "port: 0"));
                }
                if ports.iter().any(|o| o.port == u32::from(p.port)) {
                    return Err(invalid(
                        format!("{pp}.port"),
                        format!("port {} is listed twice", p.port),
                        format!("port: {}", p.port),
                    ));
                }
                let protocol = match &p.protocol {
                    Some(explicit) => ports::port_protocol(parse_protocol(Some(explicit), &pp)?),
                    None => decide(
                        &targeted,
                        p.port,
                        &w.namespace,
                        &w.service_account,
                        &mut warnings,
                    ),
                };
                let authorization = match &p.allow {
                    None => None,
                    Some(rules) => Some(ppb::Authorization {
                        rules: rules
                            .iter()
                            .enumerate()
                            .map(|(k, r)| rule(r, &format!("{pp}.allow[{k}]")))
                            .collect::<Result<_, _>>()?,
                    }),
                };
                let mode = p
                    .mtls
                    .or_else(|| self.namespaces.get(&w.namespace).and_then(|n| n.mtls))
                    .unwrap_or(self.mtls);
                ports.push(ppb::PortPolicy {
                    port: u32::from(p.port),
                    mtls: mtls_pb(mode),
                    authorization,
                    protocol: protocol as i32,
                    authorities: vec![],
                });
            }
            // Ports services target but the workload does not list: declared, with the
            // namespace's mode and no authorization of their own.
            let mode = namespace_mode(&namespace_mtls, self.mtls, &w.namespace);
            for port in targeted.keys() {
                if !ports.iter().any(|o| o.port == u32::from(*port)) {
                    let protocol = decide(
                        &targeted,
                        *port,
                        &w.namespace,
                        &w.service_account,
                        &mut warnings,
                    );
                    ports.push(declared_port(*port, mode, protocol));
                }
            }
            ports.sort_by_key(|p| p.port);
            if workloads.insert(key, ports).is_some() {
                return Err(invalid(
                    path,
                    "duplicate workload (same namespace and service account)",
                    w.service_account.clone(),
                ));
            }
        }
        // Workloads the file lists no ports for: every port a service targets on them.
        for ((ns, sa), targeted) in declared {
            let mode = namespace_mode(&namespace_mtls, self.mtls, &ns);
            let ports = targeted
                .keys()
                .map(|port| {
                    let protocol = decide(&targeted, *port, &ns, &sa, &mut warnings);
                    declared_port(*port, mode, protocol)
                })
                .collect();
            workloads.insert((ns, sa), ports);
        }
        let state = MeshState {
            trust_domain: td.to_string(),
            cluster_domain: self.cluster_domain.clone(),
            mtls: self.mtls,
            namespace_mtls,
            services,
            workloads,
            workload_mtls: BTreeMap::new(),
            consumer_routes: route_set.consumer,
            policy_ready: true,
        };
        Ok((state, warnings))
    }
}

/// The protocol services give `port` of workload `ns/sa`; a disagreement goes to `warnings`.
fn decide(
    targeted: &BTreeMap<u16, ports::Claims>,
    port: u16,
    ns: &str,
    sa: &str,
    warnings: &mut Vec<String>,
) -> ppb::PortProtocol {
    let Some(claims) = targeted.get(&port) else {
        return ppb::PortProtocol::Detect;
    };
    let d = claims.decide();
    if let Some(c) = d.conflict {
        warnings.push(format!(
            "port {port} of workload {ns}/{sa}: {c}; set workloads[].ports[].protocol to decide"
        ));
    }
    d.protocol
}

/// A declared port without a policy entry of its own.
pub(crate) fn declared_port(port: u16, mode: Mtls, protocol: ppb::PortProtocol) -> ppb::PortPolicy {
    ppb::PortPolicy {
        port: u32::from(port),
        mtls: mtls_pb(mode),
        authorization: None,
        protocol: protocol as i32,
        authorities: vec![],
    }
}

/// What is behind `target` (`host:port` or `ip:port`), for a watcher in `context_namespace`.
pub fn resolve(state: &MeshState, target: &str, context_namespace: &str) -> dpb::ServiceUpdate {
    resolve_for(state, target, context_namespace, context_namespace)
}

/// Like [`resolve`], for a client whose verified identity is in `client_namespace`: consumer
/// routes of that namespace replace the Service's own routes.
pub fn resolve_for(
    state: &MeshState,
    target: &str,
    context_namespace: &str,
    client_namespace: &str,
) -> dpb::ServiceUpdate {
    let mut u = resolve_service(state, target, context_namespace);
    if let Some(s) = u.service.as_mut()
        && let Some(r) = state
            .consumer_routes
            .get(&(client_namespace.to_string(), s.authority.clone()))
    {
        s.routes = r.clone();
    }
    u
}

fn resolve_service(state: &MeshState, target: &str, context_namespace: &str) -> dpb::ServiceUpdate {
    let found = split_target(target).and_then(|(host, port)| {
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            return state.services.iter().find(|s| {
                (s.port == port && s.addresses.contains(&ip))
                    || s.proto.endpoints.iter().any(|e| {
                        e.port == u32::from(port) && e.address.parse::<IpAddr>().ok() == Some(ip)
                    })
            });
        }
        let parts: Vec<&str> = host.split('.').collect();
        let (name, ns) = match parts.as_slice() {
            [name] => (*name, context_namespace),
            [name, ns] => (*name, *ns),
            [name, ns, "svc"] => (*name, *ns),
            [name, ns, "svc", rest @ ..] if rest.join(".") == state.cluster_domain => (*name, *ns),
            _ => return None,
        };
        state
            .services
            .iter()
            .find(|s| s.name == name && s.namespace == ns && s.port == port)
    });
    match found {
        Some(s) => dpb::ServiceUpdate {
            unknown: false,
            service: Some(s.proto.clone()),
            version: 0,
        },
        None => dpb::ServiceUpdate {
            unknown: true,
            service: None,
            version: 0,
        },
    }
}

/// `host:port` (IPv6 in brackets); `None` when there is no valid port.
pub fn split_target(target: &str) -> Option<(&str, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    if host.is_empty() {
        return None;
    }
    Some((host, port))
}

/// The canonical authorities of the services with an endpoint of workload `id` on `port`: the
/// names the workload's proxy labels inbound metrics by (never a name a client chose).
fn services_targeting(state: &MeshState, id: &str, port: u32) -> Vec<String> {
    let mut out: Vec<String> = state
        .services
        .iter()
        .filter(|s| {
            s.proto
                .endpoints
                .iter()
                .any(|e| e.port == port && e.identity == id)
        })
        .map(|s| s.proto.authority.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The inbound policy of the workload `id` runs as.
pub fn policy_for(state: &MeshState, id: &SpiffeId) -> ppb::InboundPolicy {
    let names = id.workload_names();
    let ns = names
        .as_ref()
        .map(|w| w.namespace.clone())
        .unwrap_or_default();
    let namespace_mode = state.namespace_mtls.get(&ns).copied().unwrap_or(state.mtls);
    let default_mode = names
        .as_ref()
        .and_then(|w| {
            state
                .workload_mtls
                .get(&(w.namespace.clone(), w.service_account.clone()))
        })
        .copied()
        .unwrap_or(namespace_mode);
    let mut ports = names
        .and_then(|w| {
            state
                .workloads
                .get(&(w.namespace, w.service_account))
                .cloned()
        })
        .unwrap_or_default();
    for p in &mut ports {
        p.authorities = services_targeting(state, id.as_str(), p.port);
    }
    ppb::InboundPolicy {
        version: 0,
        default_policy: Some(ppb::PortPolicy {
            port: 0,
            mtls: mtls_pb(default_mode),
            authorization: None,
            protocol: 0,
            authorities: vec![],
        }),
        ports,
    }
}

#[cfg(test)]
mod tests;
