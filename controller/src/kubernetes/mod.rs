//! The Kubernetes source: watches Services, EndpointSlices, Pods, Namespaces and Musubi's
//! policy CRDs, keeps a cache of each (re-listing and re-watching on its own after API-server
//! restarts or dropped watches), and rebuilds the mesh state with [`build::build`] shortly
//! after any change. Proxy streams are never dropped: they see the new state, or the last good
//! one while the API server is away.

pub mod build;
pub mod crd;

use crate::DiscoverySource;
use crate::model::{MeshState, Mtls};
use build::Snapshot;
use crd::Named;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// How long to gather changes before rebuilding (a rollout touches many objects at once).
const COALESCE: Duration = Duration::from_millis(20);

pub struct KubeSourceConfig {
    pub client: kube::Client,
    pub trust_domain: String,
    pub cluster_domain: String,
    /// Mesh-wide default mode.
    pub mtls: Mtls,
    /// Longest wait for the first complete list of the core objects before serving anyway.
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

/// Runs one watcher into its store, waking `changed` on every change.
fn spawn_watch<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    what: &'static str,
    changed: Arc<Notify>,
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
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::warn!(resource = what, error = %e, "watch failed; retrying"),
            }
        }
    })
}

/// Decodes the specs of CRD objects; a spec that does not decode is reported and skipped.
fn specs<T: DeserializeOwned>(
    kind: &str,
    objects: Vec<Arc<DynamicObject>>,
    problems: &mut Vec<String>,
) -> Vec<Named<T>> {
    let mut out = Vec::new();
    for o in objects {
        let namespace = o.metadata.namespace.clone().unwrap_or_default();
        let name = o.metadata.name.clone().unwrap_or_default();
        let spec = o.data.get("spec").cloned().unwrap_or_default();
        match serde_json::from_value::<T>(spec) {
            Ok(spec) => out.push(Named {
                namespace,
                name,
                spec,
            }),
            Err(e) => problems.push(format!("{kind} {namespace}/{name}: {e}; ignored")),
        }
    }
    out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out
}

struct Stores {
    namespaces: Store<Namespace>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    mesh_tls: Store<DynamicObject>,
    authorization: Store<DynamicObject>,
}

impl KubeSource {
    /// Starts the watches, waits (bounded) for the first full lists, publishes the first
    /// state, and keeps it current.
    pub async fn start(cfg: KubeSourceConfig) -> Arc<KubeSource> {
        let changed = Arc::new(Notify::new());
        let c = &cfg.client;
        let (namespaces, w_ns) = reflector::store();
        let (services, w_svc) = reflector::store();
        let (slices, w_eps) = reflector::store();
        let (pods, w_pods) = reflector::store();
        let mtls_ar = crd_resource("MeshTLS", "meshtls");
        let authz_ar = crd_resource("AuthorizationPolicy", "authorizationpolicies");
        let w_mtls = reflector::store::Writer::new(mtls_ar.clone());
        let w_authz = reflector::store::Writer::new(authz_ar.clone());
        let stores = Stores {
            namespaces,
            services,
            slices,
            pods,
            mesh_tls: w_mtls.as_reader(),
            authorization: w_authz.as_reader(),
        };
        let mut tasks = vec![
            spawn_watch(Api::all(c.clone()), w_ns, "namespaces", changed.clone()),
            spawn_watch(Api::all(c.clone()), w_svc, "services", changed.clone()),
            spawn_watch(
                Api::all(c.clone()),
                w_eps,
                "endpointslices",
                changed.clone(),
            ),
            spawn_watch(Api::all(c.clone()), w_pods, "pods", changed.clone()),
            spawn_watch(
                Api::all_with(c.clone(), &mtls_ar),
                w_mtls,
                "meshtls",
                changed.clone(),
            ),
            spawn_watch(
                Api::all_with(c.clone(), &authz_ar),
                w_authz,
                "authorizationpolicies",
                changed.clone(),
            ),
        ];
        let synced = async {
            let _ = stores.namespaces.wait_until_ready().await;
            let _ = stores.services.wait_until_ready().await;
            let _ = stores.slices.wait_until_ready().await;
            let _ = stores.pods.wait_until_ready().await;
            let _ = stores.mesh_tls.wait_until_ready().await;
            let _ = stores.authorization.wait_until_ready().await;
        };
        if tokio::time::timeout(cfg.initial_sync_timeout, synced)
            .await
            .is_err()
        {
            tracing::warn!(
                "not every watch has listed yet (are the CRDs installed?); serving what is known"
            );
        }
        let first = snapshot_state(&cfg, &stores);
        let (tx, _) = watch::channel(Arc::new(first));
        let publisher = tx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                changed.notified().await;
                tokio::time::sleep(COALESCE).await;
                let state = snapshot_state(&cfg, &stores);
                publisher.send_if_modified(|current| {
                    if **current == state {
                        false
                    } else {
                        *current = Arc::new(state);
                        true
                    }
                });
            }
        }));
        Arc::new(KubeSource { tx, tasks })
    }
}

fn snapshot_state(cfg: &KubeSourceConfig, stores: &Stores) -> MeshState {
    let mut problems = Vec::new();
    let snapshot = Snapshot {
        trust_domain: cfg.trust_domain.clone(),
        cluster_domain: cfg.cluster_domain.clone(),
        mtls: cfg.mtls,
        namespaces: stores.namespaces.state(),
        services: stores.services.state(),
        slices: stores.slices.state(),
        pods: stores.pods.state(),
        mesh_tls: specs("MeshTLS", stores.mesh_tls.state(), &mut problems),
        authorization: specs(
            "AuthorizationPolicy",
            stores.authorization.state(),
            &mut problems,
        ),
    };
    let (state, more) = build::build(&snapshot);
    for p in problems.iter().chain(&more) {
        tracing::warn!(problem = %p, "skipped a Kubernetes object");
    }
    state
}
