//! From Kubernetes objects to the mesh state the streams serve: a pure function over a
//! snapshot of the watched objects. What makes no sense (a bad SPIFFE ID in a rule, an unknown
//! mode annotation) is reported and used the narrow way or skipped, never fatal; what the build
//! made of each policy object comes out as a [`Verdict`] for its status.

mod policy;
pub mod routes;

use super::crd::{Object, Verdict};
use crate::model::ports::{self, Claims};
use crate::model::{MeshState, Mtls, Service};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service as KService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use musubi_identity::{SpiffeId, TrustDomain};
use musubi_proto::discovery::v1 as dpb;
use musubi_proto::policy::v1 as ppb;
use policy::{Modes, PortKey};
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
    /// `None` until the watch has listed (the CRD may not be installed, or not readable).
    pub mesh_tls: Option<Vec<Object>>,
    pub authorization: Option<Vec<Object>>,
    /// Gateway API routes and Musubi faults; `None` until listed (or not installed).
    pub http_routes: Option<Vec<Object>>,
    pub grpc_routes: Option<Vec<Object>>,
    pub faults: Option<Vec<Object>>,
    pub route_policies: Option<Vec<Object>>,
}

/// What a snapshot makes: the state, a line for each problem (for the log), and a verdict for
/// each policy object (for its status).
#[derive(Debug, Default)]
pub struct Built {
    pub state: MeshState,
    pub problems: Vec<String>,
    pub verdicts: Vec<Verdict>,
    pub route_verdicts: Vec<routes::RouteVerdict>,
}

pub fn build(s: &Snapshot) -> Built {
    let mut problems = Vec::new();
    let mut verdicts = Vec::new();
    let td = match TrustDomain::new(&s.trust_domain) {
        Ok(td) => td,
        Err(e) => {
            problems.push(format!("trust domain {:?}: {e}", s.trust_domain));
            return Built {
                problems,
                ..Built::default()
            };
        }
    };
    let modes = policy::modes(
        s.mtls,
        namespace_annotations(s, &mut problems),
        s.mesh_tls.as_deref(),
        &mut problems,
        &mut verdicts,
    );
    let infos: Vec<PodInfo<'_>> = s
        .pods
        .iter()
        .filter_map(|p| PodInfo::new(p, &mut problems))
        .collect();
    let pods: HashMap<(&str, &str), &PodInfo<'_>> =
        infos.iter().map(|p| ((p.namespace, p.name), p)).collect();
    let mut services = Vec::new();
    let mut targeted = BTreeMap::new();
    let mut ctx = Ctx {
        td: &td,
        modes: &modes,
        pods: &pods,
        targeted: &mut targeted,
    };
    for svc in &s.services {
        services.extend(service(s, &mut ctx, svc));
    }
    services.sort_by(|a, b| (&a.namespace, &a.name, a.port).cmp(&(&b.namespace, &b.name, b.port)));
    let rules = policy::rules(
        s.authorization.as_deref().unwrap_or_default(),
        &mut problems,
        &mut verdicts,
    );
    let workloads = policy::workloads(
        &modes,
        &rules,
        &targeted,
        |ns, sa, port| pod_claims(&infos, ns, sa, port),
        &mut problems,
    );
    let (mut route_set, route_verdicts) = routes::build(
        s.http_routes.as_deref(),
        s.grpc_routes.as_deref(),
        s.faults.as_deref(),
        s.route_policies.as_deref(),
        &services,
        &mut verdicts,
        &mut problems,
    );
    for svc in &mut services {
        if let Some(r) = route_set.producer.remove(&svc.proto.authority) {
            svc.proto.routes = r;
        }
    }
    let state = MeshState {
        trust_domain: td.to_string(),
        cluster_domain: s.cluster_domain.clone(),
        mtls: s.mtls,
        namespace_mtls: modes.namespace.clone(),
        services,
        workloads,
        workload_mtls: modes.workload.clone(),
        consumer_routes: route_set.consumer,
        policy_ready: s.mesh_tls.is_some() && s.authorization.is_some(),
    };
    Built {
        state,
        problems,
        verdicts,
        route_verdicts,
    }
}

/// What the service loop needs besides the snapshot, and what it adds to.
struct Ctx<'a> {
    td: &'a TrustDomain,
    modes: &'a Modes,
    pods: &'a HashMap<(&'a str, &'a str), &'a PodInfo<'a>>,
    /// Ports Services target on each workload, with what each source says they speak.
    targeted: &'a mut BTreeMap<PortKey, Claims>,
}

/// What the build needs of a pod.
struct PodInfo<'a> {
    namespace: &'a str,
    name: &'a str,
    service_account: &'a str,
    meshed: bool,
    /// Its `musubi.io/opaque-ports` annotation.
    opaque: Vec<(u16, u16)>,
}

impl<'a> PodInfo<'a> {
    fn new(pod: &'a Pod, problems: &mut Vec<String>) -> Option<PodInfo<'a>> {
        let namespace = pod.metadata.namespace.as_deref()?;
        let name = pod.metadata.name.as_deref()?;
        let opaque = match pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ports::OPAQUE_PORTS_ANNOTATION))
        {
            None => vec![],
            // The narrow reading of a bad value: no port of it is opaque.
            Some(v) => ports::opaque_ports(v).unwrap_or_else(|e| {
                problems.push(format!(
                    "pod {namespace}/{name}: {}={v:?}: {e}; no port of it is opaque",
                    ports::OPAQUE_PORTS_ANNOTATION
                ));
                vec![]
            }),
        };
        Some(PodInfo {
            namespace,
            name,
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.as_deref())
                .unwrap_or("default"),
            meshed: is_meshed(pod),
            opaque,
        })
    }
}

/// For a port no Service targets (only policies name it): what the workload's pods say about
/// it, OPAQUE where their opaque-ports annotation lists it, else DETECT.
fn pod_claims(pods: &[PodInfo<'_>], ns: &str, sa: &str, port: u16) -> Claims {
    let mut claims = Claims::default();
    for p in pods
        .iter()
        .filter(|p| p.namespace == ns && p.service_account == sa)
    {
        let protocol = if ports::in_ranges(&p.opaque, port) {
            ppb::PortProtocol::Opaque
        } else {
            ppb::PortProtocol::Detect
        };
        claims.add(protocol, format!("pod {ns}/{}", p.name));
    }
    claims
}

/// Namespace modes from the `musubi.io/mtls-mode` annotation (a namespace-wide `MeshTLS`
/// overrides them).
fn namespace_annotations(s: &Snapshot, problems: &mut Vec<String>) -> BTreeMap<String, Mtls> {
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

/// One mesh service per Service port, with the endpoints of its EndpointSlices; records the
/// ports each Service targets on each workload's pods.
fn service(s: &Snapshot, ctx: &mut Ctx<'_>, svc: &KService) -> Vec<Service> {
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
        let svc_protocol = protocol(sp.app_protocol.as_deref());
        let source = format!("Service {ns}/{name} port {port}");
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
                let target_pod = ep
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"));
                let pod = target_pod.and_then(|r| {
                    ctx.pods
                        .get(&(r.namespace.as_deref().unwrap_or(ns), r.name.as_deref()?))
                });
                let (identity, plaintext_allowed) = match (target_pod, pod) {
                    (_, Some(p)) => {
                        let claim = if ports::in_ranges(&p.opaque, target_port) {
                            (
                                ppb::PortProtocol::Opaque,
                                format!(
                                    "pod {}/{} ({})",
                                    p.namespace,
                                    p.name,
                                    ports::OPAQUE_PORTS_ANNOTATION
                                ),
                            )
                        } else {
                            (ports::port_protocol(svc_protocol), source.clone())
                        };
                        ctx.targeted
                            .entry((
                                p.namespace.to_string(),
                                p.service_account.to_string(),
                                target_port,
                            ))
                            .or_default()
                            .add(claim.0, claim.1);
                        let identity = p
                            .meshed
                            .then(|| {
                                SpiffeId::workload(ctx.td, p.namespace, p.service_account).ok()
                            })
                            .flatten()
                            .map(|id| id.to_string())
                            .unwrap_or_default();
                        let plaintext = identity.is_empty()
                            && ctx.modes.plaintext_allowed(
                                p.namespace,
                                Some(p.service_account),
                                target_port,
                            );
                        (identity, plaintext)
                    }
                    // A pod not seen yet: where it runs (and whether it is meshed) is unknown.
                    (Some(_), None) => (String::new(), false),
                    // Not a pod (an address someone wrote into the slice): the namespace's mode.
                    (None, None) => (
                        String::new(),
                        ctx.modes.plaintext_allowed(ns, None, target_port),
                    ),
                };
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
                        plaintext_allowed,
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
                protocol: svc_protocol as i32,
                endpoints,
                routes: vec![],
                client_policy: None,
            },
        });
    }
    out
}

#[cfg(test)]
mod tests;
