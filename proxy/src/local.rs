//! Connections from the inbound proxy to the local application on 127.0.0.1: HTTP/1.1 ones
//! kept per port for reuse, and one multiplexed HTTP/2 connection per port.
//!
//! A connection goes back to its port's idle list when the response body has been read to the
//! end, from the task that read it; hyper-util's pooling client spawns a task per request to
//! wait for that moment instead. A connection whose body was abandoned, or that was upgraded,
//! is not reused: hyper closes it. Only connections ready for a request are taken, so a
//! request never waits behind another one.

use crate::http::Body;
use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper::{Request, Response};
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Idle connections kept per port; more are closed when they come back.
const MAX_IDLE_PER_PORT: usize = 256;
/// An idle connection older than this is closed instead of reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("application on port {port}: connecting: {reason}")]
    Connect { port: u16, reason: std::io::Error },
    #[error("application on port {port}: {reason}")]
    Http { port: u16, reason: hyper::Error },
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

#[derive(Default)]
pub struct LocalHttp1 {
    idle: Mutex<HashMap<u16, Vec<Idle>>>,
}

impl LocalHttp1 {
    /// Sends `req` (its URI in origin form) to `127.0.0.1:port` on an idle connection, or a new
    /// one when none is ready. A request an idle connection could not take (the application
    /// closed it meanwhile) is sent again on a new connection.
    pub async fn send(
        self: &Arc<Self>,
        port: u16,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, LocalError> {
        while let Some(mut sender) = self.take_idle(port) {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.returning(port, sender, resp)),
                Err(e) => req = unsent(port, e)?,
            }
        }
        let mut sender = connect(port).await?;
        match sender.send_request(req).await {
            Ok(resp) => Ok(self.returning(port, sender, resp)),
            Err(reason) => Err(LocalError::Http { port, reason }),
        }
    }

    fn take_idle(&self, port: u16) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.get_mut(&port)?;
        while let Some(i) = list.pop() {
            if i.sender.is_ready() && i.since.elapsed() < IDLE_TIMEOUT {
                return Some(i.sender);
            }
        }
        None
    }

    /// Keeps a connection whose last response is complete. hyper marks it ready once it has
    /// also finished sending the request; that has nearly always happened by now, and
    /// otherwise a task waits for it, so that taking an idle connection never waits.
    fn put_idle(self: Arc<Self>, port: u16, mut sender: SendRequest<Body>) {
        if !sender.is_ready() {
            if !sender.is_closed() {
                tokio::spawn(async move {
                    if sender.ready().await.is_ok() {
                        self.put_idle(port, sender);
                    }
                });
            }
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let list = idle.entry(port).or_default();
        // Oldest first: drop those past the timeout, and the oldest when over the cap.
        let now = Instant::now();
        let stale = list
            .iter()
            .take_while(|i| now.duration_since(i.since) >= IDLE_TIMEOUT)
            .count();
        list.drain(..stale);
        if list.len() >= MAX_IDLE_PER_PORT {
            list.remove(0);
        }
        list.push(Idle { sender, since: now });
    }

    fn returning(
        self: &Arc<Self>,
        port: u16,
        sender: SendRequest<Body>,
        resp: Response<Incoming>,
    ) -> Response<Body> {
        let upgraded = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        let (parts, body) = resp.into_parts();
        let back = (!upgraded).then(|| (Arc::clone(self), port, sender));
        let body = Returning {
            body,
            done: false,
            back,
        };
        Response::from_parts(
            parts,
            http_body_util::BodyExt::boxed(http_body_util::BodyExt::map_err(
                body,
                crate::http::BoxError::from,
            )),
        )
    }
}

/// One HTTP/2 connection per application port, shared by every request to that port. The
/// request's own URI (scheme and authority) is sent as is: the application sees the authority
/// the caller addressed, while the connection goes to 127.0.0.1.
#[derive(Default)]
pub struct LocalHttp2 {
    conns: Mutex<HashMap<u16, http2::SendRequest<Body>>>,
}

impl LocalHttp2 {
    pub async fn send(
        &self,
        port: u16,
        mut req: Request<Body>,
    ) -> Result<Response<Incoming>, LocalError> {
        let open = {
            let conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
            conns.get(&port).filter(|s| !s.is_closed()).cloned()
        };
        if let Some(mut sender) = open
            && sender.ready().await.is_ok()
        {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                // The connection went away before taking it: send it on a new one.
                Err(e) => req = unsent(port, e)?,
            }
        }
        let mut sender = connect_h2(port).await?;
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(port, sender.clone());
        sender
            .send_request(req)
            .await
            .map_err(|reason| LocalError::Http { port, reason })
    }
}

async fn connect_h2(port: u16) -> Result<http2::SendRequest<Body>, LocalError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|reason| LocalError::Connect { port, reason })?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .map_err(|reason| LocalError::Http { port, reason })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(port, error = %e, "HTTP/2 connection to the application ended");
        }
    });
    Ok(sender)
}

async fn connect(port: u16) -> Result<SendRequest<Body>, LocalError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|reason| LocalError::Connect { port, reason })?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|reason| LocalError::Http { port, reason })?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(port, error = %e, "connection to the application ended");
        }
    });
    Ok(sender)
}

/// A response body that gives its connection back once it has been read to the end.
struct Returning {
    body: Incoming,
    done: bool,
    back: Option<(Arc<LocalHttp1>, u16, SendRequest<Body>)>,
}

impl Returning {
    fn give_back(&mut self) {
        if let Some((pool, port, sender)) = self.back.take() {
            pool.put_idle(port, sender);
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                self.done = true;
                self.give_back();
            }
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // A body the server never polled because it was empty, or one read to its last byte
        // without the final poll: the connection is reusable. Otherwise it is dropped.
        if self.done || self.body.is_end_stream() {
            self.give_back();
        }
    }
}

/// A request the connection refused before taking it comes back to be sent on another one;
/// one it took and then failed is an error.
fn unsent(
    port: u16,
    mut e: hyper::client::conn::TrySendError<Request<Body>>,
) -> Result<Request<Body>, LocalError> {
    match e.take_message() {
        Some(req) => Ok(req),
        None => Err(LocalError::Http {
            port,
            reason: e.into_error(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::full;
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;

    /// A real HTTP/1.1 application: answers `body`'s length in bytes of `x`, closes the
    /// connection after the response when the path is `/close`, and counts its connections.
    async fn app() -> (u16, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let close = req.uri().path() == "/close";
                    let mut resp = Response::new(full(vec![b'x'; 64 * 1024]));
                    if close {
                        resp.headers_mut()
                            .insert(http::header::CONNECTION, "close".parse().unwrap());
                    }
                    Ok::<_, hyper::Error>(resp)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        (port, accepted)
    }

    fn get(path: &'static str) -> Request<Body> {
        Request::builder().uri(path).body(full("")).unwrap()
    }

    async fn read_all(pool: &Arc<LocalHttp1>, port: u16, path: &'static str) -> usize {
        let resp = pool.send(port, get(path)).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes().len()
    }

    #[tokio::test]
    async fn a_connection_read_to_the_end_is_reused() {
        let (port, accepted) = app().await;
        let pool = Arc::new(LocalHttp1::default());
        for _ in 0..5 {
            assert_eq!(read_all(&pool, port, "/").await, 64 * 1024);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn abandoned_and_closed_connections_are_not_reused() {
        let (port, accepted) = app().await;
        let pool = Arc::new(LocalHttp1::default());
        // The body is dropped unread: that connection is closed, the next request opens one.
        drop(pool.send(port, get("/")).await.unwrap());
        assert_eq!(read_all(&pool, port, "/").await, 64 * 1024);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // The application closes after this response: the next request still succeeds.
        assert_eq!(read_all(&pool, port, "/close").await, 64 * 1024);
        assert_eq!(read_all(&pool, port, "/").await, 64 * 1024);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn concurrent_requests_use_separate_connections_and_then_share_them() {
        let (port, accepted) = app().await;
        let pool = Arc::new(LocalHttp1::default());
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(pool.send(port, get("/")).await.unwrap());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        for resp in held {
            resp.into_body().collect().await.unwrap();
        }
        for _ in 0..6 {
            read_all(&pool, port, "/").await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_application_that_is_not_listening_is_named() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let pool = Arc::new(LocalHttp1::default());
        let err = pool.send(port, get("/")).await.unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("application on port {port}: connecting")),
            "{err}"
        );
    }
}
