//! Small real applications for the mesh tests: an HTTP server that describes what it received,
//! and a TCP echo server. They run on 127.0.0.1 and stop when dropped.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub struct App {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// Answers every request with a line describing it:
/// `version=HTTP/1.1 client-id=<musubi-client-id or -> host=<Host or :authority> path=<path>
/// trailer-client-id=<musubi-client-id in the trailers, -, or none without trailers> body=<body>`.
/// `/slow` waits 300 ms first. An `Upgrade` request is accepted with 101 and the connection
/// then echoes bytes back.
async fn describe(mut req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.headers().contains_key(http::header::UPGRADE) {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on_upgrade.await {
                let mut io = TokioIo::new(up);
                let mut buf = [0u8; 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(Full::new(Bytes::new()))
            .unwrap_or_default();
        return Ok(resp);
    }
    if req.uri().path() == "/slow" {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    };
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_else(|| header("host"));
    let line = format!(
        "version={:?} client-id={} host={} path={}",
        req.version(),
        header("musubi-client-id"),
        host,
        req.uri().path()
    );
    let collected = req.into_body().collect().await.ok();
    let trailer = collected
        .as_ref()
        .and_then(|c| c.trailers())
        .map(|t| {
            t.get("musubi-client-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        })
        .unwrap_or_else(|| "none".into());
    let body = collected.map(|b| b.to_bytes()).unwrap_or_default();
    Ok(Response::new(Full::new(Bytes::from(format!(
        "{line} trailer-client-id={trailer} body={}",
        String::from_utf8_lossy(&body)
    )))))
}

/// An HTTP server speaking HTTP/1.1 and HTTP/2 (prior knowledge) on one port.
pub async fn http() -> App {
    http_on(TcpListener::bind("127.0.0.1:0").await.unwrap())
}

/// Like [`http`], on a listener the caller bound (e.g. inside a network namespace).
pub fn http_on(listener: TcpListener) -> App {
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder
                    .serve_connection_with_upgrades(
                        TokioIo::new(tcp),
                        hyper::service::service_fn(describe),
                    )
                    .await;
            });
        }
    });
    App { addr, task }
}

/// Like [`http`], but HTTP/1.1 only: an HTTP/2 preface is a protocol error to it.
pub async fn http1_only() -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(describe)),
            );
        }
    });
    App { addr, task }
}

/// Echoes every byte back, prefixed once with `echo:`.
pub async fn tcp_echo() -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if tcp.write_all(b"echo:").await.is_err() {
                    return;
                }
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    App { addr, task }
}

/// What a test holds of [`holding`]: each `/hold` request that arrived, and the release.
pub struct Hold {
    pub arrived: tokio::sync::mpsc::UnboundedReceiver<String>,
    pub release: tokio::sync::watch::Sender<bool>,
}

/// Like [`http`], but a request for `/hold` waits (after announcing itself with its path on
/// `arrived`) until `release` is set: a request that is in flight for exactly as long as the
/// test wants.
pub async fn holding() -> (App, Hold) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
    let (release, released) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let arrived = arrived_tx.clone();
            let released = released.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let arrived = arrived.clone();
                let mut released = released.clone();
                async move {
                    if req.uri().path() == "/hold" {
                        let _ = arrived.send(req.uri().to_string());
                        let _ = released.wait_for(|r| *r).await;
                    }
                    describe(req).await
                }
            });
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    (App { addr, task }, Hold { arrived, release })
}

/// What a test sees of a [`named`] application: how many requests reached it, and the line it
/// answered the last one with.
#[derive(Clone, Default)]
pub struct Seen {
    pub hits: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub last: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Seen {
    pub fn hits(&self) -> u64 {
        self.hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn last(&self) -> String {
        self.last.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// An HTTP server (HTTP/1.1 and HTTP/2) that answers `app=<name> ` followed by [`http`]'s
/// description and every `x-*` request header (`x-canary=true`), and whose `/sleep/<ms>` waits
/// that long first: one side of a split, a mirror, a slow backend.
pub async fn named(name: &'static str) -> (App, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let s = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let s = s.clone();
                async move {
                    s.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some(ms) = req.uri().path().strip_prefix("/sleep/") {
                        let ms: u64 = ms.parse().unwrap_or(0);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    let mut xs: Vec<String> = req
                        .headers()
                        .iter()
                        .filter(|(n, _)| n.as_str().starts_with("x-"))
                        .map(|(n, v)| format!("{n}={}", v.to_str().unwrap_or("?")))
                        .collect();
                    xs.sort();
                    let described = describe(req).await?;
                    let body = described.into_body().collect().await;
                    let body = body.map(|b| b.to_bytes()).unwrap_or_default();
                    let line = format!(
                        "app={name} {} {}",
                        String::from_utf8_lossy(&body),
                        xs.join(" ")
                    );
                    if let Ok(mut last) = s.last.lock() {
                        *last = line.clone();
                    }
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("x-app", name)
                            .body(Full::new(Bytes::from(line)))
                            .unwrap_or_default(),
                    )
                }
            });
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    (App { addr, task }, seen)
}
