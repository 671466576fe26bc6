//! The Kubernetes source: watches Services, EndpointSlices, Pods, Namespaces and Musubi's
//! policy CRDs, keeps a cache of each (re-listing and re-watching on its own after API-server
//! restarts or dropped watches), and rebuilds the mesh state with [`build::build`] shortly
//! after any change. Proxy streams are never dropped: they see the new state, or the last good
//! one while the API server is away.
//!
//! It fails closed: policy is not served until the `MeshTLS` and `AuthorizationPolicy` watches
//! have listed (a policy without them could be wider than they say); discovery is served once
//! the core objects have listed, or after the initial-sync timeout.

pub mod build;
pub mod crd;
pub mod route_status;
pub mod status;

use crate::DiscoverySource;
use crate::model::{MeshState, Mtls};
use build::Snapshot;
use crd::{Kind, Object};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// How long to gather changes before rebuilding (a rollout touches many objects at once).
const COALESCE: Duration = Duration::from_millis(20);
/// How often to say, while policy is held back, which lists it waits for.
const WAITING_REPORT: Duration = Duration::from_secs(10);

pub struct KubeSourceConfig {
    pub client: kube::Client,
    pub trust_domain: String,
    pub cluster_domain: String,
    /// Mesh-wide default mode.
    pub mtls: Mtls,
    /// Longest wait for the first complete list of the core objects (namespaces, services,
    /// endpoint slices, pods) before serving discovery anyway. Policy waits for its own lists,
    /// however long that takes.
    pub initial_sync_timeout: Duration,
}

pub struct KubeSource {
    tx: watch::Sender<Arc<MeshState>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl DiscoverySource for KubeSource {
    fn state(&self) -> watch::Receiver<Arc<MeshState>> {
        self.tx.subscribe()
    }
}

/// The API resource of one of our CRDs (plural named: `MeshTLS` does not pluralize by rule).
pub fn crd_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(crd::GROUP, crd::VERSION, kind),
        plural,
    )
}

/// Runs one watcher into its store, waking `changed` on every change; `listed` becomes true
/// once the first complete list is in the store.
fn spawn_watch<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    what: &'static str,
    changed: Arc<Notify>,
    listed: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    tokio::spawn(async move {
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .reflect(writer);
        futures_util::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(watcher::Event::InitDone) => {
                    listed.store(true, Ordering::Release);
                    changed.notify_one();
                }
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::warn!(resource = what, error = %e, "watch failed; retrying"),
            }
        }
    })
}

/// CRD objects as the build reads them (sorted, so the build sees one order).
fn objects(listed: &AtomicBool, store: &Store<DynamicObject>) -> Option<Vec<Object>> {
    if !listed.load(Ordering::Acquire) {
        return None;
    }
    let mut out: Vec<Object> = store
        .state()
        .iter()
        .map(|o| Object {
            namespace: o.metadata.namespace.clone().unwrap_or_default(),
            name: o.metadata.name.clone().unwrap_or_default(),
            generation: o.metadata.generation,
            created: o
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.to_string()),
            spec: o.data.get("spec").cloned().unwrap_or_default(),
        })
        .collect();
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Some(out)
}

struct Stores {
    namespaces: Store<Namespace>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    mesh_tls: Store<DynamicObject>,
    authorization: Store<DynamicObject>,
    mesh_tls_listed: Arc<AtomicBool>,
    authorization_listed: Arc<AtomicBool>,
    http_routes: Store<DynamicObject>,
    grpc_routes: Store<DynamicObject>,
    faults: Store<DynamicObject>,
    route_policies: Store<DynamicObject>,
    route_policies_listed: Arc<AtomicBool>,
    http_routes_listed: Arc<AtomicBool>,
    grpc_routes_listed: Arc<AtomicBool>,
    faults_listed: Arc<AtomicBool>,
}

impl KubeSource {
    /// Starts the watches, waits (bounded) for the first full lists of the core objects,
    /// publishes the first state, and keeps it current; writes each policy object's status.
    pub async fn start(cfg: KubeSourceConfig) -> Arc<KubeSource> {
        let changed = Arc::new(Notify::new());
        let c = &cfg.client;
        let (namespaces, w_ns) = reflector::store();
        let (services, w_svc) = reflector::store();
        let (slices, w_eps) = reflector::store();
        let (pods, w_pods) = reflector::store();
        let mtls_ar = crd_resource(Kind::MeshTls.name(), Kind::MeshTls.plural());
        let authz_ar = crd_resource(
            Kind::AuthorizationPolicy.name(),
            Kind::AuthorizationPolicy.plural(),
        );
        let w_mtls = reflector::store::Writer::new(mtls_ar.clone());
        let w_authz = reflector::store::Writer::new(authz_ar.clone());
        let faults_ar = crd_resource(Kind::FaultInjection.name(), Kind::FaultInjection.plural());
        let http_ar = route_status::resource(crate::model::gateway::RouteKind::Http);
        let grpc_ar = route_status::resource(crate::model::gateway::RouteKind::Grpc);
        let w_faults = reflector::store::Writer::new(faults_ar.clone());
        let policies_ar = crd_resource(Kind::RoutePolicy.name(), Kind::RoutePolicy.plural());
        let w_policies = reflector::store::Writer::new(policies_ar.clone());
        let w_http = reflector::store::Writer::new(http_ar.clone());
        let w_grpc = reflector::store::Writer::new(grpc_ar.clone());
        let stores = Stores {
            namespaces,
            services,
            slices,
            pods,
            mesh_tls: w_mtls.as_reader(),
            authorization: w_authz.as_reader(),
            mesh_tls_listed: Arc::default(),
            authorization_listed: Arc::default(),
            http_routes: w_http.as_reader(),
            grpc_routes: w_grpc.as_reader(),
            faults: w_faults.as_reader(),
            route_policies: w_policies.as_reader(),
            route_policies_listed: Arc::default(),
            http_routes_listed: Arc::default(),
            grpc_routes_listed: Arc::default(),
            faults_listed: Arc::default(),
        };
        let mut tasks = vec![
            spawn_watch(
                Api::all(c.clone()),
                w_ns,
                "namespaces",
                changed.clone(),
                Arc::default(),
            ),
            spawn_watch(
                Api::all(c.clone()),
                w_svc,
                "services",
                changed.clone(),
                Arc::default(),
            ),
            spawn_watch(
                Api::all(c.clone()),
                w_eps,
                "endpointslices",
                changed.clone(),
                Arc::default(),
            ),
            spawn_watch(
                Api::all(c.clone()),
                w_pods,
                "pods",
                changed.clone(),
                Arc::default(),
            ),
            spawn_watch(
                Api::all_with(c.clone(), &mtls_ar),
                w_mtls,
                Kind::MeshTls.plural(),
                changed.clone(),
                stores.mesh_tls_listed.clone(),
            ),
            spawn_watch(
                Api::all_with(c.clone(), &authz_ar),
                w_authz,
                Kind::AuthorizationPolicy.plural(),
                changed.clone(),
                stores.authorization_listed.clone(),
            ),
            // Routes and faults: without their CRDs these watches keep retrying, and
            // services are served without routes meanwhile.
            spawn_watch(
                Api::all_with(c.clone(), &faults_ar),
                w_faults,
                Kind::FaultInjection.plural(),
                changed.clone(),
                stores.faults_listed.clone(),
            ),
            spawn_watch(
                Api::all_with(c.clone(), &policies_ar),
                w_policies,
                Kind::RoutePolicy.plural(),
                changed.clone(),
                stores.route_policies_listed.clone(),
            ),
            spawn_watch(
                Api::all_with(c.clone(), &http_ar),
                w_http,
                "httproutes",
                changed.clone(),
                stores.http_routes_listed.clone(),
            ),
            spawn_watch(
                Api::all_with(c.clone(), &grpc_ar),
                w_grpc,
                "grpcroutes",
                changed.clone(),
                stores.grpc_routes_listed.clone(),
            ),
        ];
        let synced = async {
            let _ = stores.namespaces.wait_until_ready().await;
            let _ = stores.services.wait_until_ready().await;
            let _ = stores.slices.wait_until_ready().await;
            let _ = stores.pods.wait_until_ready().await;
        };
        if tokio::time::timeout(cfg.initial_sync_timeout, synced)
            .await
            .is_err()
        {
            tracing::warn!(
                timeout = ?cfg.initial_sync_timeout,
                "services, endpoint slices, pods or namespaces have not listed yet; serving discovery from what is known"
            );
        }
        let mut log = ProblemLog::default();
        let first = rebuild(&cfg, &stores, &mut log);
        let (tx, _) = watch::channel(Arc::new(first.state));
        let (verdicts_tx, verdicts_rx) = watch::channel(Arc::new(first.verdicts));
        let (routes_tx, routes_rx) = watch::channel(Arc::new(first.route_verdicts));
        tasks.push(status::spawn_writer(
            cfg.client.clone(),
            status::Objects {
                mesh_tls: (mtls_ar, stores.mesh_tls.clone()),
                authorization: (authz_ar, stores.authorization.clone()),
                faults: (faults_ar, stores.faults.clone()),
                route_policies: (policies_ar, stores.route_policies.clone()),
            },
            verdicts_rx,
        ));
        tasks.push(route_status::spawn_writer(
            cfg.client.clone(),
            stores.http_routes.clone(),
            stores.grpc_routes.clone(),
            routes_rx,
        ));
        let publisher = tx.clone();
        let waiting_rx = tx.subscribe();
        let (mesh_tls_listed, authorization_listed) = (
            stores.mesh_tls_listed.clone(),
            stores.authorization_listed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                changed.notified().await;
                tokio::time::sleep(COALESCE).await;
                let built = rebuild(&cfg, &stores, &mut log);
                let state = built.state;
                publisher.send_if_modified(|current| {
                    if **current == state {
                        false
                    } else {
                        *current = Arc::new(state);
                        true
                    }
                });
                let verdicts = built.verdicts;
                verdicts_tx.send_if_modified(|current| {
                    if **current == verdicts {
                        false
                    } else {
                        *current = Arc::new(verdicts);
                        true
                    }
                });
                let routes = built.route_verdicts;
                routes_tx.send_if_modified(|current| {
                    if **current == routes {
                        false
                    } else {
                        *current = Arc::new(routes);
                        true
                    }
                });
            }
        }));
        tasks.push(tokio::spawn(report_waiting(
            waiting_rx,
            mesh_tls_listed,
            authorization_listed,
        )));
        Arc::new(KubeSource { tx, tasks })
    }
}

/// Says loudly, every 10 s while it lasts (from 10 s after the start), that policy is held
/// back and which lists it waits for; then says once that policy is served.
async fn report_waiting(
    mut state: watch::Receiver<Arc<MeshState>>,
    mesh_tls: Arc<AtomicBool>,
    authorization: Arc<AtomicBool>,
) {
    let stores_missing = || {
        let mut out = Vec::new();
        if !mesh_tls.load(Ordering::Acquire) {
            out.push(Kind::MeshTls.plural());
        }
        if !authorization.load(Ordering::Acquire) {
            out.push(Kind::AuthorizationPolicy.plural());
        }
        out.join(", ")
    };
    // The lists usually arrive within milliseconds of the core ones: say nothing before the
    // first period is over.
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + WAITING_REPORT, WAITING_REPORT);
    loop {
        if state.borrow_and_update().policy_ready {
            tracing::info!("policy lists are in; serving policy streams");
            return;
        }
        tokio::select! {
            _ = tick.tick() => tracing::warn!(
                missing = %stores_missing(),
                "NOT SERVING POLICY: waiting for these lists (are the policy.musubi.io CRDs \
                 installed, and may the controller list and watch them?); proxies accept no \
                 inbound connections until their policy arrives"
            ),
            changed = state.changed() => if changed.is_err() { return },
        }
    }
}

/// Logs each problem once, when it first appears (a rebuild follows every change, and most
/// problems outlive many changes).
#[derive(Default)]
struct ProblemLog {
    last: BTreeSet<String>,
}

impl ProblemLog {
    fn report(&mut self, problems: Vec<String>) {
        let now: BTreeSet<String> = problems.into_iter().collect();
        for p in now.difference(&self.last) {
            tracing::warn!(problem = %p, "a Kubernetes object is not used as written");
        }
        self.last = now;
    }
}

fn rebuild(cfg: &KubeSourceConfig, stores: &Stores, log: &mut ProblemLog) -> build::Built {
    let snapshot = Snapshot {
        trust_domain: cfg.trust_domain.clone(),
        cluster_domain: cfg.cluster_domain.clone(),
        mtls: cfg.mtls,
        namespaces: stores.namespaces.state(),
        services: stores.services.state(),
        slices: stores.slices.state(),
        pods: stores.pods.state(),
        mesh_tls: objects(&stores.mesh_tls_listed, &stores.mesh_tls),
        authorization: objects(&stores.authorization_listed, &stores.authorization),
        http_routes: objects(&stores.http_routes_listed, &stores.http_routes),
        grpc_routes: objects(&stores.grpc_routes_listed, &stores.grpc_routes),
        faults: objects(&stores.faults_listed, &stores.faults),
        route_policies: objects(&stores.route_policies_listed, &stores.route_policies),
    };
    let mut built = build::build(&snapshot);
    log.report(std::mem::take(&mut built.problems));
    built
}
