//! The test gRPC application (`musubi.test.v1.Echo`), served with tonic on 127.0.0.1.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    tonic::include_proto!("musubi.test.v1");
}

use pb::Msg;
use pb::echo_server::{Echo, EchoServer};

#[derive(Default, Clone)]
pub struct EchoApp {
    /// Slow calls whose handler was dropped before finishing (the client cancelled).
    pub cancelled: Arc<AtomicUsize>,
}

fn client_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get("musubi-client-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string()
}

struct CountOnDrop(Arc<AtomicUsize>, bool);

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

type ChatStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoApp {
    async fn unary(&self, req: Request<Msg>) -> Result<Response<Msg>, Status> {
        let id = client_id(&req);
        let msg = req.into_inner();
        if msg.text == "fail" {
            let mut status = Status::failed_precondition("told to fail");
            status.metadata_mut().insert(
                "x-detail",
                "from-the-app".parse().unwrap_or_else(|_| unreachable!()),
            );
            return Err(status);
        }
        Ok(Response::new(Msg {
            text: msg.text,
            delay_ms: 0,
            client_id: id,
        }))
    }

    type ChatStream = ChatStream;

    async fn chat(&self, req: Request<Streaming<Msg>>) -> Result<Response<ChatStream>, Status> {
        let id = client_id(&req);
        let mut inbound = req.into_inner();
        let out = async_stream(move |tx| async move {
            while let Some(Ok(m)) = inbound.next().await {
                if m.text == "fail" {
                    // After normal headers and messages: the status goes in the trailers.
                    let _ = tx
                        .send(Err(Status::unavailable("told to fail mid-stream")))
                        .await;
                    break;
                }
                let reply = Msg {
                    text: format!("re:{}", m.text),
                    delay_ms: 0,
                    client_id: id.clone(),
                };
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(out))
    }

    async fn slow(&self, req: Request<Msg>) -> Result<Response<Msg>, Status> {
        let mut guard = CountOnDrop(self.cancelled.clone(), false);
        let msg = req.into_inner();
        tokio::time::sleep(Duration::from_millis(u64::from(msg.delay_ms))).await;
        guard.1 = true;
        Ok(Response::new(Msg {
            text: msg.text,
            delay_ms: msg.delay_ms,
            client_id: String::new(),
        }))
    }
}

fn async_stream<F, Fut>(f: F) -> ChatStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Msg, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

pub struct GrpcApp {
    pub addr: SocketAddr,
    pub app: EchoApp,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn serve() -> GrpcApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("addr: {e}"));
    let app = EchoApp::default();
    let svc = EchoServer::new(app.clone());
    let task = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await;
    });
    GrpcApp { addr, app, task }
}
