//! The identity service: `musubi.identity.v1.Identity/Certify` over TLS.
//!
//! The identity comes from the token, never from the CSR; the CSR only contributes its public
//! key, and must not ask for anything else (see [`crate::csr`]).

pub mod admin;
pub mod clients;
pub mod metrics;
pub mod negative_cache;
pub mod reload;
pub mod run;
pub mod server;

use crate::ca::{CaError, IssuedLeaf, Issuer};
use crate::csr::{CsrError, check_csr};
use crate::renew::{CertSource, RenewError};
use crate::spiffe_id::{SpiffeId, TrustDomain, Workload};
use crate::token::{BoxFuture, TokenError, TokenValidator};
use arc_swap::ArcSwap;
use clients::{ClientGate, ClientRefusal};
use metrics::IdentityMetrics;
use musubi_proto::identity::v1::{CertifyRequest, CertifyResponse, identity_server};
use negative_cache::NegativeCache;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

/// Largest Certify request accepted (CSR + token + framing), bytes.
pub const MAX_REQUEST_BYTES: usize = 32 * 1024;
/// gRPC metadata key naming the reason for a refusal (also in the message).
pub const REFUSAL_HEADER: &str = "musubi-refusal";

/// The issuer in use, swappable when its files are rotated.
pub type IssuerHandle = Arc<ArcSwap<Issuer>>;

/// A refused Certify call: the gRPC code, a bounded reason label, and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: tonic::Code,
    pub reason: &'static str,
    pub message: String,
}

impl Refusal {
    fn into_status(self) -> Status {
        let mut status = Status::new(self.code, self.message);
        if let Ok(v) = self.reason.parse() {
            status.metadata_mut().insert(REFUSAL_HEADER, v);
        }
        status
    }
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Self {
        let code = match e {
            TokenError::Unavailable(_) => tonic::Code::Unavailable,
            _ => tonic::Code::Unauthenticated,
        };
        Refusal {
            code,
            reason: e.reason(),
            message: e.to_string(),
        }
    }
}

impl From<CsrError> for Refusal {
    fn from(e: CsrError) -> Self {
        Refusal {
            code: tonic::Code::InvalidArgument,
            reason: e.reason(),
            message: e.to_string(),
        }
    }
}

impl From<CaError> for Refusal {
    fn from(e: CaError) -> Self {
        Refusal {
            code: tonic::Code::Internal,
            reason: "signing_failed",
            message: format!("could not sign: {e}"),
        }
    }
}

/// The decision after the token is validated: which identity, and is the CSR acceptable.
pub fn certify_for(
    issuer: &Issuer,
    trust_domain: &TrustDomain,
    ttl: Duration,
    workload: &Workload,
    csr: &[u8],
    now: SystemTime,
) -> Result<(SpiffeId, IssuedLeaf), Refusal> {
    let id = SpiffeId::workload(trust_domain, &workload.namespace, &workload.service_account)
        .map_err(|e| Refusal {
            code: tonic::Code::Unauthenticated,
            reason: "token_bad_identity",
            message: format!("token names an identity that cannot be issued: {e}"),
        })?;
    let checked = check_csr(csr, &id)?;
    let leaf = issuer.sign(&checked.spki_der, &id, ttl, now)?;
    Ok((id, leaf))
}

/// What a refusal by the per-client limits tells the client.
pub fn client_refusal(refused: &ClientRefusal, peer: IpAddr) -> Refusal {
    let exhausted = |reason, message| Refusal {
        code: tonic::Code::ResourceExhausted,
        reason,
        message,
    };
    match refused {
        ClientRefusal::Busy { limit } => exhausted(
            "client_limit",
            format!(
                "too many certificate requests from {peer} at once (at most {limit} per client); \
                 wait for the earlier ones to finish, then retry with backoff"
            ),
        ),
        ClientRefusal::Throttled { retry_after } => exhausted(
            "client_refusal_rate",
            format!(
                "too many requests from {peer} carried invalid tokens lately; fix the workload's \
                 token and retry in {} s or later",
                retry_after.as_secs().max(1)
            ),
        ),
        ClientRefusal::Full => exhausted(
            "overloaded",
            "too many clients have certificate requests in flight; retry with backoff".into(),
        ),
    }
}

/// A refused call, and whether it is one of many alike (load shed, or a token refused before)
/// that is logged at debug only, so that a flood of them does not flood the log as well.
struct Refused {
    refusal: Refusal,
    routine: bool,
}

impl<E: Into<Refusal>> From<E> for Refused {
    fn from(e: E) -> Self {
        Refused {
            refusal: e.into(),
            routine: false,
        }
    }
}

fn routine(refusal: Refusal) -> Refused {
    Refused {
        refusal,
        routine: true,
    }
}

/// The gRPC service.
pub struct IdentityService {
    pub issuer: IssuerHandle,
    pub validator: Arc<dyn TokenValidator>,
    pub trust_domain: TrustDomain,
    pub ttl: Duration,
    pub metrics: Arc<IdentityMetrics>,
    /// Certify calls being worked on at once, across all connections.
    pub inflight: Arc<Semaphore>,
    /// Calls in flight and refusal budgets per client IP; a client's permit is taken before
    /// the global one, so one client cannot hold more than its share of `inflight`.
    pub clients: Arc<ClientGate>,
    /// Tokens the validator refused as invalid, by digest.
    pub refused_tokens: Mutex<NegativeCache>,
}

impl IdentityService {
    fn refused_tokens(&self) -> std::sync::MutexGuard<'_, NegativeCache> {
        self.refused_tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn certify_inner(
        &self,
        peer: IpAddr,
        req: CertifyRequest,
    ) -> Result<CertifyResponse, Refused> {
        let digest = negative_cache::digest(&req.token);
        let cached = self.refused_tokens().get(&digest, Instant::now());
        if let Some(refusal) = cached {
            self.metrics.negative_cache_hits.inc();
            return Err(routine(refusal));
        }
        let _client = self
            .clients
            .admit(peer)
            .map_err(|refused| routine(client_refusal(&refused, peer)))?;
        let _permit = self.inflight.clone().try_acquire_owned().map_err(|_| {
            routine(Refusal {
                code: tonic::Code::ResourceExhausted,
                reason: "overloaded",
                message: "too many certificate requests in flight; retry with backoff".into(),
            })
        })?;
        if let Err(refusal) = size_checks(&req) {
            self.clients.charge_refusal(peer);
            return Err(refusal.into());
        }
        let workload = match self.validator.validate(&req.token).await {
            Ok(workload) => workload,
            Err(e) => {
                let remember = negative_cache::remembered(&e);
                let refusal = Refusal::from(e);
                if remember {
                    self.refused_tokens()
                        .insert(digest, refusal.clone(), Instant::now());
                    self.clients.charge_refusal(peer);
                }
                return Err(refusal.into());
            }
        };
        let issuer = self.issuer.load();
        let (id, leaf) = certify_for(
            &issuer,
            &self.trust_domain,
            self.ttl,
            &workload,
            &req.csr,
            SystemTime::now(),
        )?;
        tracing::info!(%id, not_after = %humantime::format_rfc3339_seconds(leaf.not_after), "issued certificate");
        Ok(CertifyResponse {
            leaf: leaf.leaf.to_vec(),
            intermediates: leaf.intermediates.iter().map(|c| c.to_vec()).collect(),
            valid_until: Some(prost_types::Timestamp::from(leaf.not_after)),
        })
    }
}

/// The checks that need no validator: a request failing them is as invalid as a junk token,
/// and is charged to the client's refusal budget like one.
fn size_checks(req: &CertifyRequest) -> Result<(), Refusal> {
    if req.csr.len() > crate::csr::MAX_CSR_BYTES {
        return Err(CsrError::TooLarge(req.csr.len()).into());
    }
    crate::token::precheck(&req.token)?;
    Ok(())
}

/// The client a call is counted against. The TLS listener always records the peer address;
/// a call without one (served through some other transport) shares one unspecified client.
fn client_ip(peer: Option<std::net::SocketAddr>) -> IpAddr {
    peer.map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), |a| a.ip().to_canonical())
}

#[tonic::async_trait]
impl identity_server::Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let started = Instant::now();
        let peer = request.remote_addr();
        let result = self
            .certify_inner(client_ip(peer), request.into_inner())
            .await;
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(resp) => {
                self.metrics.issued.inc();
                Ok(Response::new(resp))
            }
            Err(Refused { refusal, routine }) => {
                self.metrics.refused(refusal.reason);
                if routine {
                    tracing::debug!(?peer, reason = refusal.reason, message = %refusal.message, "refused certificate request");
                } else {
                    tracing::warn!(?peer, reason = refusal.reason, message = %refusal.message, "refused certificate request");
                }
                Err(refusal.into_status())
            }
        }
    }
}

/// Certificates from the in-process issuer: how the identity service gets its own SVID.
pub struct LocalCaSource {
    pub issuer: IssuerHandle,
    pub id: SpiffeId,
    pub ttl: Duration,
}

impl CertSource for LocalCaSource {
    fn certify(&self, csr_der: Vec<u8>) -> BoxFuture<'_, Result<IssuedLeaf, RenewError>> {
        Box::pin(async move {
            let checked =
                check_csr(&csr_der, &self.id).map_err(|e| RenewError::Refused(e.to_string()))?;
            self.issuer
                .load()
                .sign(&checked.spki_der, &self.id, self.ttl, SystemTime::now())
                .map_err(|e| RenewError::Refused(e.to_string()))
        })
    }
}

#[cfg(test)]
mod tests;
