//! The benchmark's backend, run as its own process (`musubi-bench backend`) so it can be pinned
//! and kept out of the proxies' accounting: HTTP/1.1 and h2c answering every request with a
//! 1 KB body, gRPC health checks (what fortio's gRPC mode calls), and a TCP service that echoes
//! (first byte `E`) or swallows (first byte `S`) what it gets.

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Body size of every HTTP response.
pub const BODY_BYTES: usize = 1024;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// HTTP/1.1 + h2c listener.
    #[arg(long)]
    pub http: SocketAddr,
    /// gRPC (h2c) listener serving grpc.health.v1.Health.
    #[arg(long)]
    pub grpc: SocketAddr,
    /// TCP echo/sink listener.
    #[arg(long)]
    pub tcp: SocketAddr,
}

pub async fn run(a: Args) -> Result<()> {
    let http = TcpListener::bind(a.http).await?;
    let tcp = TcpListener::bind(a.tcp).await?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let grpc = tonic::transport::Server::builder()
        .add_service(health)
        .serve(a.grpc);
    tokio::spawn(serve_tcp(tcp));
    tokio::spawn(serve_http(http));
    grpc.await?;
    Ok(())
}

async fn serve_http(listener: TcpListener) {
    let body = Bytes::from(vec![b'x'; BODY_BYTES]);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn serve_tcp(listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(tcp_conn(tcp));
    }
}

async fn tcp_conn(mut tcp: TcpStream) -> std::io::Result<()> {
    let mode = tcp.read_u8().await?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if mode == b'E' {
            tcp.write_all(&buf[..n]).await?;
        }
    }
}
