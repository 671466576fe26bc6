//! From Kubernetes objects to the mesh state the streams serve: a pure function over a
//! snapshot of the watched objects. Objects that make no sense (a bad SPIFFE ID in a policy,
//! an unknown mode annotation) are skipped and reported, never fatal.

use super::crd::{AuthorizationPolicySpec, MeshTlsSpec, Named};
use crate::model::{self, MeshState, Mtls, Service};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service as KService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use musubi_identity::{SpiffeId, TrustDomain};
use musubi_proto::discovery::v1 as dpb;
use musubi_proto::policy::v1 as ppb;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

/// Namespace annotation for the mTLS mode of its workloads.
pub const MTLS_ANNOTATION: &str = "musubi.io/mtls-mode";
/// A pod carrying a container of this name runs the Musubi proxy.
pub const PROXY_CONTAINER: &str = "musubi-proxy";
/// EndpointSlice label naming its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Everything the controller watches, as of one moment.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub trust_domain: String,
    pub cluster_domain: String,
    /// Mesh-wide default mode (the chart's `mtls.mode`, STRICT unless set).
    pub mtls: Mtls,
    pub namespaces: Vec<Arc<Namespace>>,
    pub services: Vec<Arc<KService>>,
    pub slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<Pod>>,
    pub mesh_tls: Vec<Named<MeshTlsSpec>>,
    pub authorization: Vec<Named<AuthorizationPolicySpec>>,
}

/// The state, and a line for each object that was skipped.
pub fn build(s: &Snapshot) -> (MeshState, Vec<String>) {
    let mut problems = Vec::new();
    let td = match TrustDomain::new(&s.trust_domain) {
        Ok(td) => td,
        Err(e) => {
            problems.push(format!("trust domain {:?}: {e}", s.trust_domain));
            return (MeshState::default(), problems);
        }
    };
    let namespace_mtls = namespace_modes(s, &mut problems);
    let pods: HashMap<(&str, &str), &Pod> = s
        .pods
        .iter()
        .filter_map(|p| {
            Some((
                (
                    p.metadata.namespace.as_deref()?,
                    p.metadata.name.as_deref()?,
                ),
                p.as_ref(),
            ))
        })
        .collect();
    let mut services = Vec::new();
    for svc in &s.services {
        services.extend(service(s, &td, svc, &pods));
    }
    services.sort_by(|a, b| (&a.namespace, &a.name, a.port).cmp(&(&b.namespace, &b.name, b.port)));
    let (workloads, workload_mtls) = workload_policies(s, &namespace_mtls, &mut problems);
    let state = MeshState {
        trust_domain: td.to_string(),
        cluster_domain: s.cluster_domain.clone(),
        mtls: s.mtls,
        namespace_mtls,
        services,
        workloads,
        workload_mtls,
    };
    (state, problems)
}

/// Namespace modes: the annotation, overridden by a namespace-wide `MeshTLS`.
fn namespace_modes(s: &Snapshot, problems: &mut Vec<String>) -> BTreeMap<String, Mtls> {
    let mut out = BTreeMap::new();
    for ns in &s.namespaces {
        let Some(name) = &ns.metadata.name else {
            continue;
        };
        if let Some(v) = ns
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(MTLS_ANNOTATION))
        {
            match Mtls::parse(v) {
                Some(m) => {
                    out.insert(name.clone(), m);
                }
                None => problems.push(format!(
                    "namespace {name}: {MTLS_ANNOTATION}={v:?} is not STRICT or PERMISSIVE; ignored"
                )),
            }
        }
    }
    for m in &s.mesh_tls {
        if m.spec.service_account.is_none() && m.spec.ports.is_empty() {
            out.insert(m.namespace.clone(), m.spec.mode);
        }
    }
    out
}

fn is_meshed(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.containers.iter().any(|c| c.name == PROXY_CONTAINER)
            || s.init_containers
                .iter()
                .flatten()
                .any(|c| c.name == PROXY_CONTAINER)
    })
}

fn protocol(app_protocol: Option<&str>) -> dpb::Protocol {
    match app_protocol.map(str::to_ascii_lowercase).as_deref() {
        Some("http" | "http1" | "kubernetes.io/http") => dpb::Protocol::Http1,
        Some("http2" | "h2c" | "grpc" | "kubernetes.io/h2c") => dpb::Protocol::Http2,
        Some("tcp" | "opaque" | "mysql" | "redis" | "postgres") => dpb::Protocol::Opaque,
        _ => dpb::Protocol::Detect,
    }
}

/// One mesh service per Service port, with the endpoints of its EndpointSlices.
fn service(
    s: &Snapshot,
    td: &TrustDomain,
    svc: &KService,
    pods: &HashMap<(&str, &str), &Pod>,
) -> Vec<Service> {
    let (Some(name), Some(ns)) = (&svc.metadata.name, &svc.metadata.namespace) else {
        return vec![];
    };
    let Some(spec) = &svc.spec else {
        return vec![];
    };
    let addresses: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let slices: Vec<&EndpointSlice> = s
        .slices
        .iter()
        .filter(|e| {
            e.metadata.namespace.as_deref() == Some(ns)
                && e.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    == Some(name)
        })
        .map(Arc::as_ref)
        .collect();
    let mut out = Vec::new();
    for sp in spec.ports.iter().flatten() {
        let Ok(port) = u16::try_from(sp.port) else {
            continue;
        };
        let port_name = sp.name.clone().unwrap_or_default();
        let mut endpoints = Vec::new();
        for slice in &slices {
            let Some(target) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.clone().unwrap_or_default() == port_name)
            else {
                continue;
            };
            let Some(target_port) = target.port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            for ep in slice.endpoints.iter().flatten() {
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                let pod = ep
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| {
                        pods.get(&(r.namespace.as_deref().unwrap_or(ns), r.name.as_deref()?))
                    });
                let identity = pod
                    .filter(|p| is_meshed(p))
                    .and_then(|p| {
                        let sa = p
                            .spec
                            .as_ref()
                            .and_then(|s| s.service_account_name.as_deref())
                            .unwrap_or("default");
                        SpiffeId::workload(td, ns, sa).ok()
                    })
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                for address in &ep.addresses {
                    if address.parse::<IpAddr>().is_err() {
                        continue;
                    }
                    endpoints.push(dpb::Endpoint {
                        address: address.clone(),
                        port: u32::from(target_port),
                        identity: identity.clone(),
                        weight: 1,
                        ready,
                        proxy_port: 0,
                        labels: Default::default(),
                        transport: dpb::Transport::Musubi as i32,
                        plaintext_allowed: false,
                    });
                }
            }
        }
        endpoints.sort_by(|a, b| (&a.address, a.port).cmp(&(&b.address, b.port)));
        endpoints.dedup_by(|a, b| a.address == b.address && a.port == b.port);
        out.push(Service {
            name: name.clone(),
            namespace: ns.clone(),
            port,
            addresses: addresses.clone(),
            proto: dpb::Service {
                name: name.clone(),
                namespace: ns.clone(),
                authority: format!("{name}.{ns}.svc.{}:{port}", s.cluster_domain),
                port: u32::from(port),
                protocol: protocol(sp.app_protocol.as_deref()) as i32,
                endpoints,
                routes: vec![],
                client_policy: None,
            },
        });
    }
    out
}

type Workloads = (
    BTreeMap<(String, String), Vec<ppb::PortPolicy>>,
    BTreeMap<(String, String), Mtls>,
);

/// Per-workload port policies from `MeshTLS` (with a service account) and
/// `AuthorizationPolicy` objects.
fn workload_policies(
    s: &Snapshot,
    namespace_mtls: &BTreeMap<String, Mtls>,
    problems: &mut Vec<String>,
) -> Workloads {
    let mut workload_mtls = BTreeMap::new();
    let mut port_mtls: BTreeMap<(String, String, u16), Mtls> = BTreeMap::new();
    for m in &s.mesh_tls {
        let Some(sa) = &m.spec.service_account else {
            if !m.spec.ports.is_empty() {
                problems.push(format!(
                    "MeshTLS {}/{}: ports need a serviceAccount; the object is ignored",
                    m.namespace, m.name
                ));
            }
            continue;
        };
        let key = (m.namespace.clone(), sa.clone());
        if m.spec.ports.is_empty() {
            workload_mtls.insert(key, m.spec.mode);
        } else {
            for p in &m.spec.ports {
                port_mtls.insert((m.namespace.clone(), sa.clone(), *p), m.spec.mode);
            }
        }
    }
    let mut rules: BTreeMap<(String, String, u16), Vec<ppb::AuthorizationRule>> = BTreeMap::new();
    for a in &s.authorization {
        let path = format!("AuthorizationPolicy {}/{}", a.namespace, a.name);
        let parsed: Result<Vec<_>, _> = a
            .spec
            .allow
            .iter()
            .enumerate()
            .map(|(i, r)| model::rule(r, &format!("{path}: allow[{i}]")))
            .collect();
        match parsed {
            Ok(r) => {
                for p in &a.spec.ports {
                    rules
                        .entry((a.namespace.clone(), a.spec.service_account.clone(), *p))
                        .or_default()
                        .extend(r.iter().cloned());
                }
            }
            Err(e) => problems.push(format!("{e}; the policy is ignored")),
        }
    }
    let keys: BTreeSet<(String, String, u16)> =
        port_mtls.keys().chain(rules.keys()).cloned().collect();
    let mut workloads: BTreeMap<(String, String), Vec<ppb::PortPolicy>> = BTreeMap::new();
    for (ns, sa, port) in keys {
        let mode = port_mtls
            .get(&(ns.clone(), sa.clone(), port))
            .or_else(|| workload_mtls.get(&(ns.clone(), sa.clone())))
            .or_else(|| namespace_mtls.get(&ns))
            .copied()
            .unwrap_or(s.mtls);
        let authorization = rules
            .get(&(ns.clone(), sa.clone(), port))
            .map(|r| ppb::Authorization { rules: r.clone() });
        workloads
            .entry((ns, sa))
            .or_default()
            .push(ppb::PortPolicy {
                port: u32::from(port),
                mtls: model::mtls_pb(mode),
                authorization,
                protocol: 0,
                authorities: vec![],
            });
    }
    (workloads, workload_mtls)
}

#[cfg(test)]
mod tests;
