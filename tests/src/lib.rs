//! Support for Musubi's cross-process tests: start the identity service in-process with a
//! local token issuer, obtain real SVIDs through it, run Envoy as a peer, and wait for
//! conditions instead of sleeping.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: fail loudly

pub mod apiserver;
pub mod apps;
pub mod envoy;
pub mod grpc;
pub mod mesh;
pub mod netns;
pub mod routing;

use musubi_identity::client::{self, RemoteCertSource, TokenSource};
use musubi_identity::renew::{RenewPolicy, Renewal};
use musubi_identity::service::run::{self, RunningService, ServiceConfig};
use musubi_identity::service::server::ServeLimits;
use musubi_identity::testing::TestCa;
use musubi_identity::token::local::LocalIssuer;
use musubi_identity::{CredentialStore, SpiffeId};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

pub const TOKEN_ISSUER: &str = "https://musubi.test/issuer";

/// Polls `cond` until it yields `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// An identity service on 127.0.0.1 with a fresh CA and a local token issuer.
pub struct Identity {
    pub ca: TestCa,
    pub tokens: LocalIssuer,
    pub service: RunningService,
}

impl Identity {
    pub async fn start() -> Identity {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut ServiceConfig)) -> Identity {
        musubi_identity::crypto::install_default();
        let ca = TestCa::new("cluster.local");
        let tokens = LocalIssuer::generate(TOKEN_ISSUER).expect("local token issuer");
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(ca, tokens, grpc, tweak).await
    }

    /// Stops the service, keeping its CA and token issuer, and the address it served on.
    pub async fn stop(self) -> (TestCa, LocalIssuer, std::net::SocketAddr) {
        let addr = self.service.grpc_addr;
        self.service.shutdown().await;
        (self.ca, self.tokens, addr)
    }

    /// Starts a service for an existing CA and token issuer on `grpc`.
    pub async fn start_on(
        ca: TestCa,
        tokens: LocalIssuer,
        grpc: TcpListener,
        tweak: impl FnOnce(&mut ServiceConfig),
    ) -> Identity {
        musubi_identity::crypto::install_default();
        let mut cfg = ServiceConfig {
            bundle: ca.bundle.clone(),
            issuer_pem: (
                ca.issuer_pem.cert_pem.clone().into_bytes(),
                ca.issuer_pem.key_pem.clone().into_bytes(),
            ),
            issuer_files: None,
            reload_every: Duration::from_secs(1),
            validator: Arc::new(tokens.validator()),
            svid_ttl: Duration::from_secs(3600),
            namespace: "musubi".into(),
            grpc,
            admin: Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            limits: ServeLimits::default(),
            max_inflight: 1024,
        };
        tweak(&mut cfg);
        let service = run::start(cfg).await.expect("identity service starts");
        Identity {
            ca,
            tokens,
            service,
        }
    }

    pub fn addr(&self) -> String {
        self.service.grpc_addr.to_string()
    }

    /// A renewal client for `ns/sa` that authenticates with a freshly minted token.
    pub fn renewal(&self, ns: &str, sa: &str) -> Renewal {
        let token = self
            .tokens
            .mint(ns, sa, Duration::from_secs(600))
            .expect("mint");
        self.renewal_with_token(ns, sa, TokenSource::Fixed(token))
    }

    pub fn renewal_with_token(&self, ns: &str, sa: &str, token: TokenSource) -> Renewal {
        let channel = client::connect(&self.addr(), &self.ca.bundle, self.service.id.clone())
            .expect("channel");
        Renewal {
            id: self.ca.id(ns, sa),
            source: Arc::new(RemoteCertSource::new(channel, token)),
            store: CredentialStore::new(),
            bundle: self.ca.bundle.clone(),
            policy: RenewPolicy::default(),
        }
    }

    /// A store holding an SVID for `ns/sa` issued by the service over gRPC.
    pub async fn svid(&self, ns: &str, sa: &str) -> Arc<CredentialStore> {
        let renewal = self.renewal(ns, sa);
        renewal.renew_once().await.expect("certificate issued");
        renewal.store
    }

    pub fn id(&self, ns: &str, sa: &str) -> SpiffeId {
        self.ca.id(ns, sa)
    }

    /// Fetches the admin `/metrics` text.
    pub async fn metrics(&self) -> String {
        let addr = self.service.admin_addr.expect("admin listener");
        http_get(&addr.to_string(), "/metrics").await
    }
}

/// A minimal HTTP/1.1 GET over plain TCP, returning the body.
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    let Some((head, body)) = out.split_once("\r\n\r\n") else {
        return out;
    };
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of a metric line `name{labels} value` (labels matched as a substring).
pub fn metric_value(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.starts_with(name) && l.contains(labels) && l[name.len()..].starts_with(['{', ' '])
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A gRPC codec that sends and receives raw bytes, for feeding a service malformed messages.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

pub struct RawEncoder;
pub struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}
