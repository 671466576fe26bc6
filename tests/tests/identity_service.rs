//! The identity service end to end: real gRPC over real TLS, tokens from the local issuer
//! validated by the real JWKS path.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

use hyper_util::rt::TokioIo;
use musubi_identity::client::{self, TokenSource};
use musubi_identity::csr::build_csr;
use musubi_identity::renew::{CertSource, RenewError, RenewPolicy};
use musubi_identity::service::REFUSAL_HEADER;
use musubi_identity::tls::{self, ServerIdentity};
use musubi_identity::token::local::{LocalIssuer, MintOptions, Override};
use musubi_identity::token::{BoxFuture, TokenError, TokenValidator};
use musubi_identity::{Workload, cert};
use musubi_proto::identity::v1::CertifyRequest;
use musubi_proto::identity::v1::identity_client::IdentityClient;
use musubi_tests::{Identity, TOKEN_ISSUER, eventually, metric_value};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::Code;

fn p256() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn client(identity: &Identity) -> IdentityClient<tonic::transport::Channel> {
    IdentityClient::new(
        client::connect(
            &identity.addr(),
            &identity.ca.bundle,
            identity.service.id.clone(),
        )
        .unwrap(),
    )
}

async fn certify(
    identity: &Identity,
    csr: Vec<u8>,
    token: String,
) -> Result<musubi_proto::identity::v1::CertifyResponse, tonic::Status> {
    client(identity)
        .certify(CertifyRequest { csr, token })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn issues_for_the_identity_the_token_proves() {
    let identity = Identity::start().await;
    let key = p256();
    let csr = build_csr(&key, &identity.id("a", "x")).unwrap();
    let token = identity
        .tokens
        .mint("a", "x", Duration::from_secs(600))
        .unwrap();
    let resp = certify(&identity, csr, token).await.unwrap();
    assert_eq!(cert::spiffe_id(&resp.leaf).unwrap(), identity.id("a", "x"));
    assert_eq!(resp.intermediates.len(), 1);
    let not_after = cert::validity(&resp.leaf).unwrap().not_after;
    let valid_until = resp.valid_until.unwrap();
    assert_eq!(
        not_after
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
        valid_until.seconds
    );
    // The spiffe crate accepts the chain + key as an X509-SVID.
    let mut chain = resp.leaf.clone();
    chain.extend(resp.intermediates.concat());
    let svid = spiffe_parse(&chain, &key);
    assert_eq!(svid, "spiffe://cluster.local/ns/a/sa/x");

    let metrics = identity.metrics().await;
    assert_eq!(
        metric_value(&metrics, "musubi_identity_certificates_issued_total", ""),
        Some(1.0)
    );
    assert!(
        metric_value(
            &metrics,
            "musubi_identity_certify_duration_seconds_count",
            ""
        )
        .unwrap()
            >= 1.0
    );
    assert!(metric_value(&metrics, "musubi_identity_issuer_expiry_seconds", "").unwrap() > 86400.0);
    assert!(
        metric_value(&metrics, "musubi_identity_trust_anchor_expiry_seconds", "").unwrap()
            > 86400.0
    );
    assert!(
        metric_value(
            &metrics,
            "musubi_identity_serving_certificate_expiry_seconds",
            ""
        )
        .unwrap()
            > 60.0
    );
}

fn spiffe_parse(chain: &[u8], key: &rcgen::KeyPair) -> String {
    // The spiffe crate is reached through musubi-identity's re-export-free API: parse with
    // the CA helpers' interop path instead of adding another dependency here.
    musubi_identity::testing::spiffe_svid_id(chain, &key.serialize_der()).unwrap()
}

/// Every way to ask for an identity the token does not prove, or with a token that proves
/// nothing, is refused with the right code, a message naming the problem, and a counted reason.
#[tokio::test]
async fn escalation_and_bad_tokens_are_refused() {
    let identity = Identity::start().await;
    let stranger = LocalIssuer::generate(TOKEN_ISSUER).unwrap(); // same iss, other key
    let other_issuer = LocalIssuer::generate("https://other.example/issuer").unwrap();
    let key = p256();
    let csr_x = build_csr(&key, &identity.id("a", "x")).unwrap();
    let csr_y = build_csr(&key, &identity.id("a", "y")).unwrap();
    let mint = |opts: MintOptions| identity.tokens.mint_with("a", "x", &opts).unwrap();
    let good = mint(MintOptions::default());

    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Vec<u8>, String, Code, &str, &str)> = vec![
        (
            "token for a/x, CSR for a/y",
            csr_y.clone(),
            good.clone(),
            Code::InvalidArgument,
            "csr_identity_mismatch",
            "spiffe://cluster.local/ns/a/sa/y",
        ),
        (
            "wrong audience",
            csr_x.clone(),
            mint(MintOptions {
                audience: vec!["kubernetes".into()],
                ..MintOptions::default()
            }),
            Code::Unauthenticated,
            "token_wrong_audience",
            "audience",
        ),
        (
            "expired token",
            csr_x.clone(),
            mint(MintOptions {
                time_offset_secs: -7200,
                ..MintOptions::default()
            }),
            Code::Unauthenticated,
            "token_expired",
            "expired",
        ),
        (
            "token signed by another key",
            csr_x.clone(),
            stranger.mint("a", "x", Duration::from_secs(600)).unwrap(),
            Code::Unauthenticated,
            "token_bad_signature",
            "signature",
        ),
        (
            "token for another issuer",
            csr_x.clone(),
            other_issuer
                .mint("a", "x", Duration::from_secs(600))
                .unwrap(),
            Code::Unauthenticated,
            "token_wrong_issuer",
            "issuer",
        ),
        (
            "token claiming another issuer with our key",
            csr_x.clone(),
            mint(MintOptions {
                issuer: Override::Set("https://other.example/issuer".into()),
                ..MintOptions::default()
            }),
            Code::Unauthenticated,
            "token_wrong_issuer",
            "issuer",
        ),
        (
            "garbage token",
            csr_x.clone(),
            "not.a.jwt".into(),
            Code::Unauthenticated,
            "token_malformed",
            "JWT",
        ),
        (
            "empty token",
            csr_x.clone(),
            String::new(),
            Code::Unauthenticated,
            "token_malformed",
            "empty",
        ),
        (
            "garbage CSR",
            b"not a csr".to_vec(),
            good.clone(),
            Code::InvalidArgument,
            "csr_malformed",
            "PKCS#10",
        ),
        (
            "oversized CSR",
            vec![0x30; 5000],
            good.clone(),
            Code::InvalidArgument,
            "csr_too_large",
            "at most",
        ),
    ];
    for (name, csr, token, code, reason, words) in &cases {
        let status = certify(&identity, csr.clone(), token.clone())
            .await
            .expect_err(name);
        assert_eq!(status.code(), *code, "{name}: {status:?}");
        assert!(
            status.message().contains(words),
            "{name}: {:?} lacks {words:?}",
            status.message()
        );
        assert!(
            !status.message().contains(token.as_str()) || token.len() < 12,
            "{name}: token leaked into the message"
        );
        let metrics = identity.metrics().await;
        assert!(
            metric_value(
                &metrics,
                "musubi_identity_refusals_total",
                &format!("reason=\"{reason}\"")
            )
            .unwrap_or(0.0)
                >= 1.0,
            "{name}: refusal {reason} not counted"
        );
    }
    // Nothing was issued, and the service still serves good requests.
    let metrics = identity.metrics().await;
    assert_eq!(
        metric_value(&metrics, "musubi_identity_certificates_issued_total", ""),
        Some(0.0)
    );
    certify(&identity, csr_x, good).await.unwrap();
}

/// A request larger than the limit is refused (and counted) before it reaches the handler;
/// the service keeps serving.
#[tokio::test]
async fn oversized_request_is_refused_and_counted() {
    let identity = Identity::start().await;
    let status = certify(&identity, vec![0; 64 * 1024], "t".into())
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    let metrics = identity.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "musubi_identity_refusals_total",
            "reason=\"request_too_large\""
        ),
        Some(1.0)
    );
    let renewal = identity.renewal("a", "x");
    renewal.renew_once().await.unwrap();
}

#[tokio::test]
async fn overload_is_refused_not_queued() {
    let identity = Identity::start_with(|cfg| cfg.max_inflight = 0).await;
    let status = certify(&identity, vec![], "t".into()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let metrics = identity.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "musubi_identity_refusals_total",
            "reason=\"overloaded\""
        ),
        Some(1.0)
    );
}

/// Bytes that are not a protobuf message get a clear error and the service keeps serving.
#[tokio::test]
async fn malformed_protobuf_is_refused() {
    let identity = Identity::start().await;
    let channel = client::connect(
        &identity.addr(),
        &identity.ca.bundle,
        identity.service.id.clone(),
    )
    .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/musubi.identity.v1.Identity/Certify");
    // Field 1 claims 200 bytes but the message ends after 3.
    let garbage = vec![0x0a, 0xc8, 0x01, 1, 2, 3];
    let status = grpc
        .unary::<Vec<u8>, Vec<u8>, _>(tonic::Request::new(garbage), path, musubi_tests::RawCodec)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("decode"), "{status:?}");
    identity.renewal("a", "x").renew_once().await.unwrap();
}

/// Counts attempts so the test can see the backoff loop working.
struct Counting(Arc<dyn CertSource>, Arc<AtomicUsize>);

impl CertSource for Counting {
    fn certify(
        &self,
        csr: Vec<u8>,
    ) -> BoxFuture<'_, Result<musubi_identity::ca::IssuedLeaf, RenewError>> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.certify(csr)
    }
}

#[tokio::test]
async fn renewal_succeeds_with_backoff_after_the_service_was_down() {
    let identity = Identity::start().await;
    let token = identity
        .tokens
        .mint("a", "x", Duration::from_secs(600))
        .unwrap();
    let mut renewal = identity.renewal_with_token("a", "x", TokenSource::Fixed(token));
    renewal.policy = RenewPolicy {
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(200),
        ..RenewPolicy::default()
    };
    let attempts = Arc::new(AtomicUsize::new(0));
    renewal.source = Arc::new(Counting(renewal.source.clone(), attempts.clone()));
    let store = renewal.store.clone();

    let (ca, tokens, addr) = identity.stop().await;
    let task = tokio::spawn(renewal.run());
    eventually("several failed attempts", Duration::from_secs(20), || {
        let n = attempts.load(Ordering::SeqCst);
        async move { (n >= 3).then_some(()) }
    })
    .await;
    assert!(store.info().is_none());

    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let _identity = Identity::start_on(ca, tokens, listener, |_| {}).await;
    let info = tokio::time::timeout(Duration::from_secs(20), store.ready())
        .await
        .expect("renewed after restart");
    assert_eq!(info.id.to_string(), "spiffe://cluster.local/ns/a/sa/x");
    task.abort();
}

async fn issuer_reloads(identity: &Identity, result: &str) -> f64 {
    let m = identity.metrics().await;
    metric_value(
        &m,
        "musubi_identity_issuer_reloads_total",
        &format!("result=\"{result}\""),
    )
    .unwrap_or(0.0)
}

/// Waits until the service has counted `want` issuer reloads with `result`, and no more.
async fn await_issuer_reloads(identity: &Identity, result: &str, want: f64) {
    let got = eventually(
        &format!("{want} issuer reloads {result}"),
        Duration::from_secs(20),
        || async move {
            let n = issuer_reloads(identity, result).await;
            (n >= want).then_some(n)
        },
    )
    .await;
    assert_eq!(got, want, "issuer reloads {result}");
}

/// Replaces a file in one step (write aside, rename), so a poll never reads half a file.
fn replace_file(path: &std::path::Path, contents: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, contents).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// The issuer files are watched while serving. Every step changes one file and waits for the
/// reload counter that proves the service read the result, so nothing depends on timing: a
/// foreign pair (an issuer under another trust anchor) is read and refused and the old issuer
/// keeps signing; then a good pair is taken up and signs.
#[tokio::test]
async fn issuer_files_rotate_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("issuer.crt");
    let key_path = dir.path().join("issuer.key");
    let identity = Identity::start_with(|cfg| {
        std::fs::write(&cert_path, &cfg.issuer_pem.0).unwrap();
        std::fs::write(&key_path, &cfg.issuer_pem.1).unwrap();
        cfg.issuer_files = Some(musubi_identity::service::reload::IssuerFiles {
            cert: cert_path.clone(),
            key: key_path.clone(),
        });
        cfg.reload_every = Duration::from_millis(20);
    })
    .await;
    let issuer_of = |store: &musubi_identity::CredentialStore| {
        let key = store.certified_key().unwrap();
        cert::fingerprint(&key.cert[1])
    };
    let old = cert::fingerprint(identity.ca.issuer.certificate());
    assert_eq!(issuer_of(&*identity.svid("a", "x").await), old);
    for result in ["ok", "refused", "unreadable"] {
        assert_eq!(issuer_reloads(&identity, result).await, 0.0, "{result}");
    }

    // A foreign pair, written key first as rotations write it. The old certificate with the
    // foreign key is refused (they do not match), then the foreign pair itself (it does not
    // chain to our trust anchor).
    let foreign = musubi_identity::testing::TestCa::new("cluster.local");
    replace_file(&key_path, &foreign.issuer_pem.key_pem);
    await_issuer_reloads(&identity, "refused", 1.0).await;
    replace_file(&cert_path, &foreign.issuer_pem.cert_pem);
    await_issuer_reloads(&identity, "refused", 2.0).await;
    assert_eq!(
        issuer_of(&*identity.svid("a", "x").await),
        old,
        "still signed by the old issuer"
    );
    assert_eq!(issuer_reloads(&identity, "ok").await, 0.0);

    // A good pair: a new issuer from our anchor. The foreign certificate with the new key is
    // refused; the new pair is taken up.
    let next = musubi_identity::ca::generate_issuer(
        &identity.ca.trust_domain,
        &identity.ca.root.cert_pem,
        &identity.ca.root.key_pem,
        Duration::from_secs(86400),
        std::time::SystemTime::now(),
    )
    .unwrap();
    replace_file(&key_path, &next.key_pem);
    await_issuer_reloads(&identity, "refused", 3.0).await;
    replace_file(&cert_path, &next.cert_pem);
    await_issuer_reloads(&identity, "ok", 1.0).await;
    assert_eq!(
        issuer_of(&*identity.svid("a", "x").await),
        cert::fingerprint(&next.cert_der),
        "signed by the new issuer"
    );
    assert_eq!(issuer_reloads(&identity, "refused").await, 3.0);
    assert_eq!(issuer_reloads(&identity, "unreadable").await, 0.0);
}

/// Stands in for a slow Kubernetes TokenReview: the real local-issuer (JWKS) validator with
/// every call delayed. Counts calls per token, and junk tokens under review at once.
struct SlowTokenReview {
    inner: Arc<dyn TokenValidator>,
    delay: Duration,
    calls: Mutex<HashMap<String, usize>>,
    junk_now: AtomicUsize,
    junk_peak: AtomicUsize,
}

/// Counts a junk review out when it ends, however it ends.
struct Reviewing<'a>(&'a AtomicUsize);

impl Drop for Reviewing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl SlowTokenReview {
    fn calls(&self, token: &str) -> usize {
        self.calls.lock().unwrap().get(token).copied().unwrap_or(0)
    }
}

impl TokenValidator for SlowTokenReview {
    fn validate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Workload, TokenError>> {
        Box::pin(async move {
            *self
                .calls
                .lock()
                .unwrap()
                .entry(token.to_string())
                .or_default() += 1;
            let _reviewing = token.starts_with(JUNK_HEADER).then(|| {
                let now = self.junk_now.fetch_add(1, Ordering::SeqCst) + 1;
                self.junk_peak.fetch_max(now, Ordering::SeqCst);
                Reviewing(&self.junk_now)
            });
            // The API server's latency, not a wait for a condition.
            tokio::time::sleep(self.delay).await;
            self.inner.validate(token).await
        })
    }
}

/// base64url of `{"alg":"ES256","kid":"junk"}`: a key the validator does not know.
const JUNK_HEADER: &str = "eyJhbGciOiJFUzI1NiIsImtpZCI6Imp1bmsifQ";

/// A distinct JWT-shaped token that proves nothing.
fn junk_token(n: usize) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let payload = format!(r#"{{"iss":"{TOKEN_ISSUER}","sub":"junk","n":{n}}}"#);
    format!("{JUNK_HEADER}.{}.{}", b64(&payload), b64("not a signature"))
}

/// Connects to the identity service over TLS from `source` (any port), like
/// `client::connect` does from the default address.
#[derive(Clone)]
struct ConnectFrom {
    source: IpAddr,
    target: SocketAddr,
    tls: tokio_rustls::TlsConnector,
}

impl tonic::codegen::Service<http::Uri> for ConnectFrom {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(this.source, 0))?;
            let tcp = socket.connect(this.target).await?;
            tcp.set_nodelay(true)?;
            let tls = this.tls.connect(tls::mesh_server_name(), tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

fn channel_from(identity: &Identity, source: IpAddr) -> tonic::transport::Channel {
    let config = tls::client_config(
        None,
        &identity.ca.bundle,
        ServerIdentity::Exactly(identity.service.id.clone()),
        &[client::ALPN_H2],
    )
    .unwrap();
    tonic::transport::Endpoint::from_shared(format!("http://{}", identity.service.grpc_addr))
        .unwrap()
        .timeout(Duration::from_secs(10))
        .connect_with_connector_lazy(ConnectFrom {
            source,
            target: identity.service.grpc_addr,
            tls: tokio_rustls::TlsConnector::from(config),
        })
}

/// The reason label a refusal carries, as the client sees it.
fn reason_of(status: &tonic::Status) -> String {
    status
        .metadata()
        .get(REFUSAL_HEADER)
        .and_then(|v| v.to_str().ok())
        .map_or_else(
            || format!("no reason ({:?})", status.code()),
            str::to_string,
        )
}

const PER_CLIENT: u32 = 4;

/// One client (127.0.0.2) floods the service with distinct junk tokens over several
/// connections while the token validator is slow. Its calls are capped at its share, so a real
/// renewal from another client (127.0.0.1) is still issued promptly; every refusal is counted
/// by the reason the client saw; and a junk token sent twice reaches the validator once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_token_flood_from_one_client_does_not_starve_renewals() {
    const CONNECTIONS: usize = 4;
    const CALLS_PER_CONNECTION: usize = 16;
    let flood_source: IpAddr = "127.0.0.2".parse().unwrap();
    let mut review = None;
    let identity = Identity::start_with(|cfg| {
        let slow = Arc::new(SlowTokenReview {
            inner: cfg.validator.clone(),
            delay: Duration::from_millis(200),
            calls: Mutex::default(),
            junk_now: AtomicUsize::new(0),
            junk_peak: AtomicUsize::new(0),
        });
        cfg.validator = slow.clone();
        review = Some(slow);
        // Room for four clients' worth of calls: without a per-client limit the flood takes it all.
        cfg.max_inflight = 16;
        cfg.limits.per_client = PER_CLIENT;
        cfg.limits.client_refusals_per_minute = 20;
    })
    .await;
    let review = review.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let next_token = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for _ in 0..CONNECTIONS {
        let channel = channel_from(&identity, flood_source);
        for _ in 0..CALLS_PER_CONNECTION {
            let mut grpc = IdentityClient::new(channel.clone());
            let (stop, seen, next_token) = (stop.clone(), seen.clone(), next_token.clone());
            flood.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let token = junk_token(next_token.fetch_add(1, Ordering::SeqCst));
                    let status = grpc
                        .certify(CertifyRequest { csr: vec![], token })
                        .await
                        .expect_err("a junk token was accepted");
                    *seen.lock().unwrap().entry(reason_of(&status)).or_default() += 1;
                }
            }));
        }
    }
    let seen_count = |reason: &str| seen.lock().unwrap().get(reason).copied().unwrap_or(0);

    eventually(
        "the flood to fill its share of the validator",
        Duration::from_secs(20),
        || {
            let n = review.junk_now.load(Ordering::SeqCst);
            async move { (n >= PER_CLIENT as usize).then_some(()) }
        },
    )
    .await;
    for i in 0..3 {
        let started = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(5),
            identity.renewal("a", "x").renew_once(),
        )
        .await
        .unwrap_or_else(|_| panic!("renewal {i} took over 5 s during the flood"))
        .unwrap_or_else(|e| panic!("renewal {i} refused during the flood: {e}"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    eventually(
        "the flooding client to be throttled for its refusals",
        Duration::from_secs(20),
        || {
            let n = seen_count("client_refusal_rate");
            async move { (n > 0).then_some(()) }
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for task in flood {
        task.await.unwrap();
    }

    // The same junk token twice, from the well-behaved client: refused alike, reviewed once.
    let replayed = junk_token(usize::MAX);
    let first = certify(&identity, vec![], replayed.clone())
        .await
        .unwrap_err();
    let second = certify(&identity, vec![], replayed.clone())
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::Unauthenticated, "{first:?}");
    assert_eq!(
        (second.code(), reason_of(&second), second.message()),
        (first.code(), reason_of(&first), first.message())
    );
    assert_eq!(reason_of(&first), "token_bad_signature");
    assert_eq!(
        review.calls(&replayed),
        1,
        "the replay reached the validator"
    );
    *seen.lock().unwrap().entry(reason_of(&first)).or_default() += 2;

    // The flood never held more than its share; what it saw is what the service counted.
    assert!(
        review.junk_peak.load(Ordering::SeqCst) <= PER_CLIENT as usize,
        "junk tokens under review at once: {}",
        review.junk_peak.load(Ordering::SeqCst)
    );
    let seen = seen.lock().unwrap().clone();
    let reasons: Vec<&str> = seen.keys().map(String::as_str).collect();
    assert_eq!(
        reasons,
        ["client_limit", "client_refusal_rate", "token_bad_signature"],
        "{seen:?}"
    );
    let metrics = identity.metrics().await;
    for (reason, n) in &seen {
        assert_eq!(
            metric_value(
                &metrics,
                "musubi_identity_refusals_total",
                &format!("reason=\"{reason}\"")
            ),
            Some(*n as f64),
            "refusals for {reason}"
        );
    }
    assert_eq!(
        metric_value(
            &metrics,
            "musubi_identity_refusals_total",
            "reason=\"overloaded\""
        ),
        None
    );
    assert_eq!(
        metric_value(
            &metrics,
            "musubi_identity_token_negative_cache_hits_total",
            ""
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&metrics, "musubi_identity_certificates_issued_total", ""),
        Some(3.0)
    );
}
