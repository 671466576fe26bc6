//! The gRPC streams: `musubi.discovery.v1.Discovery/Watch` and `musubi.policy.v1.Policy/Watch`.
//! Each stream sends the current snapshot at once (a policy stream: once the source knows
//! everything policy is made of), then a new one whenever the mesh state changes in a way that
//! changes that watcher's answer. Each client holds a bounded number of streams.

use crate::limits::{Client, MAX_NAMESPACE_BYTES, Refused, Slot, Slots, StreamKind};
use crate::model::{self, MeshState};
use musubi_identity::SpiffeId;
use musubi_proto::discovery::v1 as dpb;
use musubi_proto::policy::v1 as ppb;
use prost::Message;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

type Updates<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Clone)]
pub struct Streams {
    pub state: watch::Receiver<Arc<MeshState>>,
    pub version: Arc<AtomicU64>,
    /// Becomes true when the controller stops: every stream ends, so shutdown can complete.
    pub stopping: watch::Receiver<bool>,
    pub slots: Arc<Slots>,
}

/// The proxy calling: its verified SPIFFE ID, and where it calls from.
fn caller<T>(streams: &Streams, kind: StreamKind, req: &Request<T>) -> Result<Client, Status> {
    let peer = req.extensions().get::<crate::conn::PeerId>();
    match peer.and_then(|p| p.id.clone()) {
        Some(id) => Ok((id, peer.and_then(|p| p.addr).map(|a| a.ip()))),
        None => Err(refuse(
            streams,
            kind,
            Refused::Unauthenticated,
            Status::unauthenticated("a mesh client certificate is required"),
        )),
    }
}

fn refuse(streams: &Streams, kind: StreamKind, why: Refused, status: Status) -> Status {
    streams.slots.metrics().count_refusal(kind, why);
    status
}

/// Sends `answer(state)` now and after every change that alters it, until the client leaves;
/// sends nothing while `answer` has none. The stream holds `slot` until it ends.
fn follow<T, F>(streams: &Streams, slot: Slot, answer: F) -> Updates<T>
where
    T: Message + Default + Clone + Send + 'static,
    F: Fn(&MeshState, u64) -> Option<T> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<T, Status>>(4);
    let mut state = streams.state.clone();
    let version = streams.version.clone();
    let mut stopping = streams.stopping.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let mut last: Option<Vec<u8>> = None;
        loop {
            let current = state.borrow_and_update().clone();
            // Compare without the version field: it changes every time.
            let body = answer(&current, 0).map(|a| a.encode_to_vec());
            if let Some(body) = body.filter(|b| last.as_ref() != Some(b)) {
                let v = version.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(update) = answer(&current, v) {
                    if tx.send(Ok(update)).await.is_err() {
                        return;
                    }
                    last = Some(body);
                }
            }
            tokio::select! {
                changed = state.changed() => if changed.is_err() { return },
                _ = tx.closed() => return,
                _ = stopping.wait_for(|s| *s) => return,
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl dpb::discovery_server::Discovery for Streams {
    type WatchStream = Updates<dpb::ServiceUpdate>;

    async fn watch(
        &self,
        req: Request<dpb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let kind = StreamKind::Discovery;
        let client = caller(self, kind, &req)?;
        let r = req.into_inner();
        let max = self.slots.limits().max_target_bytes;
        if r.target.len() > max {
            return Err(refuse(
                self,
                kind,
                Refused::TargetTooLong,
                Status::invalid_argument(format!(
                    "target is {} bytes; the limit is {max}",
                    r.target.len()
                )),
            ));
        }
        if model::split_target(&r.target).is_none() {
            return Err(refuse(
                self,
                kind,
                Refused::InvalidTarget,
                Status::invalid_argument(format!(
                    "target {:?} is not host:port or ip:port",
                    r.target
                )),
            ));
        }
        if r.context_namespace.len() > MAX_NAMESPACE_BYTES {
            return Err(refuse(
                self,
                kind,
                Refused::InvalidNamespace,
                Status::invalid_argument(format!(
                    "context_namespace is {} bytes; a namespace name is at most {MAX_NAMESPACE_BYTES}",
                    r.context_namespace.len()
                )),
            ));
        }
        let who = client.0.clone();
        let slot = self.slots.acquire(kind, client)?;
        // Consumer routes follow the verified identity's namespace, never a claimed one.
        let client_ns = who.namespace().unwrap_or_default();
        let ns = if r.context_namespace.is_empty() {
            client_ns.clone()
        } else {
            r.context_namespace
        };
        tracing::debug!(%who, target = %r.target, "discovery watch");
        Ok(Response::new(follow(self, slot, move |s, v| {
            let mut u = model::resolve_for(s, &r.target, &ns, &client_ns);
            u.version = v;
            Some(u)
        })))
    }
}

#[tonic::async_trait]
impl ppb::policy_server::Policy for Streams {
    type WatchStream = Updates<ppb::InboundPolicy>;

    async fn watch(
        &self,
        req: Request<ppb::PolicyRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let kind = StreamKind::Policy;
        let client = caller(self, kind, &req)?;
        let who: SpiffeId = client.0.clone();
        let slot = self.slots.acquire(kind, client)?;
        tracing::debug!(%who, "policy watch");
        // Nothing until the source knows all policy is made of: never a wider policy.
        Ok(Response::new(follow(self, slot, move |s, v| {
            s.policy_ready.then(|| {
                let mut p = model::policy_for(s, &who);
                p.version = v;
                p
            })
        })))
    }
}
