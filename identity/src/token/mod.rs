//! Proving a workload's identity with a token.
//!
//! The identity service derives a workload's SPIFFE ID from a token, never from the CSR.
//! Three validators sit behind one trait:
//! * [`kubernetes::TokenReviewValidator`]: asks the API server (TokenReview) — the default in a cluster;
//! * [`jwks::JwksValidator`]: checks the JWT offline against the service-account issuer's JWKS;
//! * [`local::LocalIssuer`]: mints such JWTs for `musubi up`, checked by the JWKS validator so
//!   local mode runs the real validation path.

mod claims;
mod fetch;
pub mod jwks;
pub mod kubernetes;
pub mod local;

use crate::spiffe_id::Workload;
use std::future::Future;
use std::pin::Pin;

/// The audience every Musubi token must be issued for.
pub const AUDIENCE: &str = "identity.musubi.io";

/// Longest token accepted, in bytes (Kubernetes tokens are ~1 KB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a token does not prove an identity. Messages never contain the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is empty")]
    Empty,
    #[error("token is {0} bytes; at most {MAX_TOKEN_BYTES} are accepted")]
    TooLarge(usize),
    #[error("token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("token signature does not verify: {0}")]
    BadSignature(String),
    #[error("token audience does not include {expected:?}")]
    WrongAudience { expected: String },
    #[error("token issuer {got:?} is not the trusted issuer {expected:?}")]
    WrongIssuer { got: String, expected: String },
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token does not name a service account: {0}")]
    NoServiceAccount(String),
    #[error("token was rejected by the API server: {0}")]
    Rejected(String),
    #[error("token could not be checked right now: {0}")]
    Unavailable(String),
}

impl TokenError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Empty | TokenError::Malformed(_) => "token_malformed",
            TokenError::TooLarge(_) => "token_too_large",
            TokenError::BadSignature(_) => "token_bad_signature",
            TokenError::WrongAudience { .. } => "token_wrong_audience",
            TokenError::WrongIssuer { .. } => "token_wrong_issuer",
            TokenError::Expired => "token_expired",
            TokenError::NotYetValid => "token_not_yet_valid",
            TokenError::NoServiceAccount(_) => "token_no_service_account",
            TokenError::Rejected(_) => "token_rejected",
            TokenError::Unavailable(_) => "token_validator_unavailable",
        }
    }
}

/// Turns a bearer token into the Kubernetes workload it proves.
pub trait TokenValidator: Send + Sync + 'static {
    fn validate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Workload, TokenError>>;
}

/// Size and emptiness checks every validator applies first.
pub fn precheck(token: &str) -> Result<(), TokenError> {
    if token.is_empty() {
        return Err(TokenError::Empty);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(TokenError::TooLarge(token.len()));
    }
    Ok(())
}

/// Parses Kubernetes' `system:serviceaccount:<namespace>:<name>` username.
pub fn parse_sa_username(username: &str) -> Result<Workload, TokenError> {
    let rest = username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(|| {
            TokenError::NoServiceAccount(format!("subject {username:?} is not a service account"))
        })?;
    match rest.split_once(':') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains(':') => Ok(Workload {
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        }),
        _ => Err(TokenError::NoServiceAccount(format!(
            "subject {username:?} is not system:serviceaccount:<namespace>:<name>"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sa_username_table() {
        let ok = parse_sa_username("system:serviceaccount:shop:web").unwrap();
        assert_eq!(
            (ok.namespace.as_str(), ok.service_account.as_str()),
            ("shop", "web")
        );
        for bad in [
            "system:serviceaccount:shop",
            "system:serviceaccount::web",
            "system:serviceaccount:shop:",
            "system:serviceaccount:a:b:c",
            "system:node:n1",
            "alice",
        ] {
            assert!(
                matches!(parse_sa_username(bad), Err(TokenError::NoServiceAccount(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn precheck_limits() {
        assert_eq!(precheck(""), Err(TokenError::Empty));
        assert_eq!(
            precheck(&"a".repeat(MAX_TOKEN_BYTES + 1)),
            Err(TokenError::TooLarge(MAX_TOKEN_BYTES + 1))
        );
        assert!(precheck("a.b.c").is_ok());
    }
}
