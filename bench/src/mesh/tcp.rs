//! Opaque TCP through a system: bulk throughput (one connection, the backend swallows) and new
//! connections per second (each one a fresh mTLS handshake between the proxies: connect, echo
//! one byte, close). Plus the reference the throughput target is stated against: rustls alone,
//! one TLS 1.3 connection over loopback with the same certificates, in this process.

use super::topology::Targets;
use anyhow::{Context, Result, bail};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const CHUNK: usize = 64 * 1024;

/// Opens an opaque stream to the backend's TCP service through `t` (CONNECT when the system
/// is addressed as an HTTP proxy).
async fn open(t: &Targets) -> Result<TcpStream> {
    let mut tcp = TcpStream::connect(&t.tcp).await?;
    tcp.set_nodelay(true)?;
    if let Some(authority) = &t.tcp_connect {
        tcp.write_all(
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let b = tcp.read_u8().await.context("CONNECT response")?;
            head.push(b);
            if head.len() > 4096 {
                bail!("CONNECT response too long");
            }
        }
        if !head.starts_with(b"HTTP/1.1 200") {
            bail!("CONNECT refused: {}", String::from_utf8_lossy(&head));
        }
    }
    Ok(tcp)
}

/// Writes as fast as possible for `duration`, then waits until the far end has taken
/// everything (its EOF): gigabits per second.
async fn pump<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, duration: Duration) -> Result<f64> {
    let buf = vec![0x5au8; CHUNK];
    s.write_all(b"S").await?;
    let started = Instant::now();
    let mut bytes = 0u64;
    while started.elapsed() < duration {
        s.write_all(&buf).await?;
        bytes += CHUNK as u64;
    }
    s.shutdown().await?;
    let mut sink = [0u8; 16];
    while s.read(&mut sink).await? > 0 {}
    Ok(bytes as f64 * 8.0 / started.elapsed().as_secs_f64() / 1e9)
}

pub async fn throughput(t: &Targets, duration: Duration) -> Result<f64> {
    pump(open(t).await?, duration).await
}

/// Connect–echo–close loops on `workers` connections at once for `duration`: connections/s.
pub async fn handshakes(t: &Targets, workers: usize, duration: Duration) -> Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (t, done, failed) = (t.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < duration {
                let ok = async {
                    let mut s = open(&t).await?;
                    s.write_all(b"E!").await?;
                    let echoed = s.read_u8().await?;
                    anyhow::ensure!(echoed == b'!', "wrong echo");
                    Ok::<_, anyhow::Error>(())
                }
                .await;
                match ok {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} connections failed");
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// rustls alone: one mutual-TLS 1.3 connection over loopback with Musubi's own configurations
/// and SVIDs, the server swallowing what it reads.
pub async fn rustls_alone(identity: &musubi_tests::Identity, duration: Duration) -> Result<f64> {
    use musubi_identity::tls;
    let server_store = identity.svid("bench", "server").await;
    let client_store = identity.svid("bench", "client").await;
    let bundle = identity.ca.bundle.clone();
    let server_cfg = tls::server_config(server_store, &bundle, tls::ClientAuth::Required, &[])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let client_cfg = tls::client_config(
        Some(client_store),
        &bundle,
        tls::ServerIdentity::Exactly(identity.id("bench", "server")),
        &[],
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut s = acceptor.accept(tcp).await?;
        let mut buf = vec![0u8; CHUNK];
        while s.read(&mut buf).await? > 0 {}
        s.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("server.bench")?.to_owned();
    let s = tokio_rustls::TlsConnector::from(client_cfg)
        .connect(name, tcp)
        .await?;
    let gbps = pump(s, duration).await?;
    server.await??;
    Ok(gbps)
}
