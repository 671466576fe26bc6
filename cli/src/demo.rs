//! The demo mesh `musubi up` runs when given no mesh file: `web` (HTTP) → `api` (HTTP) →
//! `store` (gRPC), each a separate process behind its own proxy. They reach each other only
//! through their outbound proxy, by service name, as applications in a mesh do.

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};

pub mod pb {
    tonic::include_proto!("musubi.demo.v1");
}

/// Which demo application to run.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum App {
    Web,
    Api,
    Store,
}

fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| format!("{name} is not set (musubi up sets it)"))
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

fn caller<B>(req: &Request<B>) -> String {
    req.headers()
        .get("musubi-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(unauthenticated)")
        .to_string()
}

/// HTTP GET through the local outbound proxy (the application uses it as its HTTP proxy).
async fn get_via_proxy(
    outbound: &str,
    authority: &str,
    path: &str,
) -> Result<(StatusCode, String)> {
    let tcp = tokio::net::TcpStream::connect(outbound).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req =
        Request::get(format!("http://{authority}{path}")).body(Full::<Bytes>::new(Bytes::new()))?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn serve_http<F, Fut>(handler: F) -> Result<()>
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send,
{
    let port: u16 = env("PORT")?.parse().context("PORT")?;
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let handler = Arc::new(handler);
    loop {
        let (tcp, _) = listener.accept().await?;
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

pub async fn run(app: App) -> Result<()> {
    match app {
        App::Web => {
            let outbound = env("MUSUBI_OUTBOUND")?;
            let api = env("MUSUBI_SERVICE_API")?;
            serve_http(move |req| {
                let (outbound, api) = (outbound.clone(), api.clone());
                async move {
                    let who = caller(&req);
                    match get_via_proxy(&outbound, &api, "/items/greeting").await {
                        Ok((status, body)) => text(
                            status,
                            format!("web: you are {who}\nweb → api ({api}): {status}\n{body}"),
                        ),
                        Err(e) => text(StatusCode::BAD_GATEWAY, format!("web → api failed: {e}\n")),
                    }
                }
            })
            .await
        }
        App::Api => {
            let outbound = env("MUSUBI_OUTBOUND")?;
            let store = env("MUSUBI_SERVICE_STORE")?;
            let channel = Endpoint::from_shared(format!("http://{outbound}"))?
                .origin(format!("http://{store}").parse()?)
                .connect_lazy();
            serve_http(move |req| {
                let channel: Channel = channel.clone();
                let store = store.clone();
                async move {
                    let who = caller(&req);
                    let key = req.uri().path().trim_start_matches("/items/").to_string();
                    let mut client = pb::store_client::StoreClient::new(channel);
                    match client.get(pb::GetRequest { key }).await {
                        Ok(item) => {
                            let item = item.into_inner();
                            text(
                                StatusCode::OK,
                                format!(
                                    "api: called by {who}\napi → store ({store}, gRPC): {}={}\nstore: called by {}\n",
                                    item.key, item.value, item.seen_caller
                                ),
                            )
                        }
                        Err(status) => text(StatusCode::BAD_GATEWAY, format!("api → store failed: {status}\n")),
                    }
                }
            })
            .await
        }
        App::Store => {
            let port: u16 = env("PORT")?.parse().context("PORT")?;
            tonic::transport::Server::builder()
                .add_service(pb::store_server::StoreServer::new(Store))
                .serve(([127, 0, 0, 1], port).into())
                .await?;
            Ok(())
        }
    }
}

struct Store;

#[tonic::async_trait]
impl pb::store_server::Store for Store {
    async fn get(
        &self,
        req: tonic::Request<pb::GetRequest>,
    ) -> Result<tonic::Response<pb::Item>, tonic::Status> {
        let caller = req
            .metadata()
            .get("musubi-client-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(unauthenticated)")
            .to_string();
        let key = req.into_inner().key;
        let value = match key.as_str() {
            "greeting" => "hello from the store".to_string(),
            other => format!("no item {other:?}"),
        };
        Ok(tonic::Response::new(pb::Item {
            key,
            value,
            seen_caller: caller,
        }))
    }
}
