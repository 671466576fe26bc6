//! The seed's order service for routing tests: `order-server` (app `v1`) and
//! `order-server-canary` (app `v2`) in namespace `k1s0-service`, each behind its own proxy, a
//! client proxy `web`, and a real controller serving a mesh file with the test's routes. Plus a
//! load generator and the statistics that judge a distribution.

use crate::apps::{self, App, Seen};
use crate::mesh::{Controller, Proxy, Setup, proxy};
use crate::{Identity, eventually};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// The seed's namespace.
pub const NS: &str = "k1s0-service";

pub struct Shop {
    pub identity: Identity,
    pub controller: Controller,
    pub v1: Seen,
    pub v2: Seen,
    pub web: Proxy,
    ports: (u16, u16),
    proxies: (Proxy, Proxy),
    _apps: (App, App),
}

impl Shop {
    /// Everything running, the controller serving `routes` (mesh-file YAML: `routes:` and
    /// `faultInjections:`).
    pub async fn start(routes: &str) -> Shop {
        let identity = Identity::start().await;
        let controller = Controller::start(&identity, "{}").await;
        let (a1, v1) = apps::named("v1").await;
        let (a2, v2) = apps::named("v2").await;
        let server = |sa: &'static str, port: u16| {
            let setup = Setup {
                app_ports: vec![port],
                controller: Some(controller.endpoint()),
                ..Setup::default()
            };
            proxy(&identity, NS, sa, setup)
        };
        let p1 = server("order-v1", a1.port()).await;
        let p2 = server("order-v2", a2.port()).await;
        let shop_ports = (a1.port(), a2.port());
        let web_setup = Setup {
            controller: Some(controller.endpoint()),
            ..Setup::default()
        };
        let web = proxy(&identity, NS, "web", web_setup).await;
        let shop = Shop {
            identity,
            controller,
            v1,
            v2,
            web,
            ports: shop_ports,
            proxies: (p1, p2),
            _apps: (a1, a2),
        };
        shop.load(routes).await;
        shop
    }

    /// The mesh file: both services, with `routes` appended.
    pub fn yaml(&self, routes: &str) -> String {
        let (p1, p2) = (&self.proxies.0, &self.proxies.1);
        format!(
            r#"
services:
  - name: order-server
    namespace: k1s0-service
    port: 80
    protocol: http
    endpoints:
      - {{ address: 127.0.0.1, port: {a1}, serviceAccount: order-v1, proxyPort: {i1} }}
  - name: order-server-canary
    namespace: k1s0-service
    port: 80
    protocol: http
    endpoints:
      - {{ address: 127.0.0.1, port: {a2}, serviceAccount: order-v2, proxyPort: {i2} }}
{routes}
"#,
            a1 = self.ports.0,
            a2 = self.ports.1,
            i1 = p1.running.inbound.port(),
            i2 = p2.running.inbound.port(),
        )
    }

    /// Serves `routes` from now on; panics when the controller refuses them.
    pub async fn load(&self, routes: &str) {
        self.controller
            .edit(&self.yaml(routes))
            .await
            .unwrap_or_else(|e| panic!("the controller refused the routes: {e}"));
    }

    /// Loads `routes` and waits until the client proxy routes by them: `probe` answers true.
    pub async fn reload<F: Fn(&Answer) -> bool>(&self, routes: &str, path: &str, probe: F) {
        self.load(routes).await;
        eventually(
            "the client proxy to take the new routes",
            Duration::from_secs(10),
            || async {
                let a = get(
                    self.web.running.outbound,
                    &format!("http://order-server.{NS}{path}"),
                    &[],
                )
                .await;
                probe(&a).then_some(())
            },
        )
        .await;
    }

    pub fn outbound(&self) -> SocketAddr {
        self.web.running.outbound
    }
}

/// One response as the load generator saw it.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub app: Option<String>,
    pub body: String,
    pub took: Duration,
    pub headers: http::HeaderMap,
}

impl Answer {
    pub fn from_app(&self, name: &str) -> bool {
        self.app.as_deref() == Some(name)
    }
}

/// One HTTP/1.1 request through the explicit outbound listener.
pub async fn get(outbound: SocketAddr, uri: &str, headers: &[(&str, &str)]) -> Answer {
    let tcp = TcpStream::connect(outbound).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    one(&mut send, uri, headers).await
}

async fn one(
    send: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    uri: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = Request::get(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let started = Instant::now();
    let resp = send
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    let app = headers
        .get("x-app")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Answer {
        status,
        app,
        body,
        took: started.elapsed(),
        headers,
    }
}

/// `n` requests over `concurrency` keep-alive connections, each request on its own.
pub async fn load(
    outbound: SocketAddr,
    n: usize,
    concurrency: usize,
    uri: &str,
    headers: &[(&'static str, &'static str)],
) -> Vec<Answer> {
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let share = n / concurrency + usize::from(c < n % concurrency);
        let uri = uri.to_string();
        let headers = headers.to_vec();
        tasks.push(tokio::spawn(async move {
            let tcp = TcpStream::connect(outbound).await.unwrap();
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut out = Vec::with_capacity(share);
            for _ in 0..share {
                out.push(one(&mut send, &uri, &headers).await);
            }
            out
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// Asserts that `hits` of `n` is the share `p`, within five standard deviations of a binomial
/// sample of that size (a false alarm about once in 1.7 million runs): for n = 10,000 that is
/// ±1.5 % around 10 %, ±1.1 % around 5 %.
pub fn assert_share(what: &str, hits: usize, n: usize, p: f64) {
    let observed = hits as f64 / n as f64;
    let tolerance = 5.0 * (p * (1.0 - p) / n as f64).sqrt();
    assert!(
        (observed - p).abs() <= tolerance,
        "{what}: {hits} of {n} = {:.2} %, expected {:.2} % ± {:.2} %",
        observed * 100.0,
        p * 100.0,
        tolerance * 100.0
    );
}
