//! Kubernetes TokenReview (`authentication.k8s.io/v1`): asking the API server what a token
//! proves. The default in a cluster: the API server knows about revoked tokens and deleted
//! pods, which an offline JWKS check cannot. The decision is a plain function,
//! [`workload_from_review`], over the review's answer.

use super::{BoxFuture, TokenError, TokenValidator, parse_sa_username, precheck};
use crate::spiffe_id::Workload;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};

/// Longest API-server text quoted in an error.
const MAX_QUOTED: usize = 256;

/// The Kubernetes client could not be built from the default configuration.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot build a Kubernetes client from the default configuration (in-cluster or kubeconfig): {0}"
)]
pub struct ClientConfigError(#[source] kube::Error);

/// Asks the API server to review each token, for one audience.
#[derive(Clone)]
pub struct TokenReviewValidator {
    client: kube::Client,
    audience: String,
}

impl std::fmt::Debug for TokenReviewValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewValidator")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl TokenReviewValidator {
    pub fn new(client: kube::Client, audience: String) -> Self {
        TokenReviewValidator { client, audience }
    }

    /// A validator over `kube::Client::try_default()` (in-cluster config, else kubeconfig).
    pub async fn from_default_config(audience: String) -> Result<Self, ClientConfigError> {
        let client = kube::Client::try_default()
            .await
            .map_err(ClientConfigError)?;
        Ok(Self::new(client, audience))
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// The workload the API server says the token belongs to.
    pub async fn review(&self, token: &str) -> Result<Workload, TokenError> {
        precheck(token)?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| api_error(&e, token))?;
        let status = answer.status.ok_or_else(|| {
            TokenError::Unavailable(
                "the API server answered the TokenReview without a status".into(),
            )
        })?;
        workload_from_review(&status, &self.audience)
    }
}

impl TokenValidator for TokenReviewValidator {
    fn validate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Workload, TokenError>> {
        Box::pin(self.review(token))
    }
}

/// Decides what a TokenReview answer proves.
///
/// An authenticated review must name our audience in `status.audiences`: an empty list means
/// the token is valid for the API server's own audience, not for ours.
pub fn workload_from_review(
    status: &TokenReviewStatus,
    audience: &str,
) -> Result<Workload, TokenError> {
    if status.authenticated != Some(true) {
        let reason = status
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .unwrap_or("token is not authenticated");
        return Err(TokenError::Rejected(bounded(reason)));
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(TokenError::WrongAudience {
            expected: audience.to_string(),
        });
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .ok_or_else(|| TokenError::NoServiceAccount("the API server named no user".into()))?;
    parse_sa_username(username)
}

/// Every failure to get an answer is `Unavailable`: the token may well be fine. Messages come
/// from the API server or the client; should one ever quote the token, it is cut out.
fn api_error(e: &kube::Error, token: &str) -> TokenError {
    let text = match e {
        kube::Error::Api(status) => {
            format!(
                "the API server refused the TokenReview ({}): {}",
                status.code, status.message
            )
        }
        kube::Error::SerdeError(e) => format!(
            "the API server's TokenReview answer does not parse (line {}, column {})",
            e.line(),
            e.column()
        ),
        other => format!("TokenReview request failed: {other}"),
    };
    let text = if token.is_empty() {
        text
    } else {
        text.replace(token, "<token>")
    };
    TokenError::Unavailable(bounded(&text))
}

fn bounded(s: &str) -> String {
    s.chars().take(MAX_QUOTED).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::token::AUDIENCE;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(
        authenticated: Option<bool>,
        error: Option<&str>,
        audiences: Option<&[&str]>,
        user: Option<&str>,
    ) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated,
            error: error.map(str::to_string),
            audiences: audiences.map(|a| a.iter().map(|s| s.to_string()).collect()),
            user: user.map(|u| UserInfo {
                username: Some(u.to_string()),
                ..UserInfo::default()
            }),
        }
    }

    #[test]
    fn review_table() {
        let sa = Some("system:serviceaccount:shop:web");
        let ours: Option<&[&str]> = Some(&[AUDIENCE]);
        let web = Ok(Workload {
            namespace: "shop".into(),
            service_account: "web".into(),
        });
        let wrong_aud = Err(TokenError::WrongAudience {
            expected: AUDIENCE.into(),
        });
        let cases: Vec<(&str, TokenReviewStatus, Result<Workload, TokenError>)> = vec![
            (
                "authenticated service account",
                status(Some(true), None, ours, sa),
                web.clone(),
            ),
            (
                "ours among several audiences",
                status(
                    Some(true),
                    None,
                    Some(&["https://kubernetes.default.svc", AUDIENCE]),
                    sa,
                ),
                web,
            ),
            (
                "not authenticated, with the server's reason",
                status(Some(false), Some("token has been invalidated"), None, None),
                Err(TokenError::Rejected("token has been invalidated".into())),
            ),
            (
                "authenticated missing counts as no",
                status(None, None, ours, sa),
                Err(TokenError::Rejected("token is not authenticated".into())),
            ),
            (
                "empty error text",
                status(Some(false), Some(""), None, None),
                Err(TokenError::Rejected("token is not authenticated".into())),
            ),
            (
                "other audience",
                status(Some(true), None, Some(&["vault"]), sa),
                wrong_aud.clone(),
            ),
            (
                "no audiences: valid for the API server only",
                status(Some(true), None, None, sa),
                wrong_aud.clone(),
            ),
            (
                "empty audiences",
                status(Some(true), None, Some(&[]), sa),
                wrong_aud,
            ),
            (
                "no user",
                status(Some(true), None, ours, None),
                Err(TokenError::NoServiceAccount(
                    "the API server named no user".into(),
                )),
            ),
        ];
        for (name, status, want) in cases {
            assert_eq!(workload_from_review(&status, AUDIENCE), want, "{name}");
        }

        for user in [
            "alice",
            "system:node:n1",
            "system:serviceaccount:shop",
            "system:serviceaccount:a:b:c",
        ] {
            let got = workload_from_review(&status(Some(true), None, ours, Some(user)), AUDIENCE);
            assert!(
                matches!(got, Err(TokenError::NoServiceAccount(_))),
                "{user}: {got:?}"
            );
        }
    }

    #[test]
    fn long_server_errors_are_bounded() {
        let long = "x".repeat(10_000);
        let got = workload_from_review(&status(Some(false), Some(&long), None, None), AUDIENCE);
        assert_eq!(got, Err(TokenError::Rejected("x".repeat(MAX_QUOTED))));
    }

    #[test]
    fn api_errors_are_unavailable_and_never_quote_the_token() {
        let token = "eyJhbGciOiJSUzI1NiJ9.secret.sig";
        let status = kube::core::Status::failure(&format!("forbidden: {token}"), "Forbidden");
        let got = api_error(&kube::Error::Api(Box::new(status.with_code(403))), token);
        let TokenError::Unavailable(m) = &got else {
            panic!("{got:?}")
        };
        assert!(m.contains("403") && m.contains("forbidden: <token>"), "{m}");
        assert!(!m.contains("secret"), "{m}");
        assert_eq!(got.reason(), "token_validator_unavailable");
    }
}
