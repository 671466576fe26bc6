//! The gRPC streams: `musubi.discovery.v1.Discovery/Watch` and `musubi.policy.v1.Policy/Watch`.
//! Each stream sends the current snapshot at once, then a new one whenever the mesh state
//! changes in a way that changes that watcher's answer.

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
}

/// The verified SPIFFE ID of the proxy calling.
fn caller<T>(req: &Request<T>) -> Result<SpiffeId, Status> {
    req.extensions()
        .get::<crate::conn::PeerId>()
        .and_then(|p| p.0.clone())
        .ok_or_else(|| Status::unauthenticated("a mesh client certificate is required"))
}

/// Sends `answer(state)` now and after every change that alters it, until the client leaves.
fn follow<T, F>(streams: &Streams, answer: F) -> Updates<T>
where
    T: Message + Default + Clone + Send + 'static,
    F: Fn(&MeshState, u64) -> T + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<T, Status>>(4);
    let mut state = streams.state.clone();
    let version = streams.version.clone();
    let mut stopping = streams.stopping.clone();
    tokio::spawn(async move {
        let mut last: Option<Vec<u8>> = None;
        loop {
            let current = state.borrow_and_update().clone();
            // Compare without the version field: it changes every time.
            let body = answer(&current, 0).encode_to_vec();
            if last.as_ref() != Some(&body) {
                let v = version.fetch_add(1, Ordering::Relaxed) + 1;
                if tx.send(Ok(answer(&current, v))).await.is_err() {
                    return;
                }
                last = Some(body);
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
        let who = caller(&req)?;
        let r = req.into_inner();
        if model::split_target(&r.target).is_none() {
            return Err(Status::invalid_argument(format!(
                "target {:?} is not host:port or ip:port",
                r.target.chars().take(256).collect::<String>()
            )));
        }
        let ns = if r.context_namespace.is_empty() {
            who.namespace().unwrap_or_default()
        } else {
            r.context_namespace
        };
        tracing::debug!(%who, target = %r.target, "discovery watch");
        Ok(Response::new(follow(self, move |s, v| {
            let mut u = model::resolve(s, &r.target, &ns);
            u.version = v;
            u
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
        let who = caller(&req)?;
        tracing::debug!(%who, "policy watch");
        Ok(Response::new(follow(self, move |s, v| {
            let mut p = model::policy_for(s, &who);
            p.version = v;
            p
        })))
    }
}
