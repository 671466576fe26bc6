//! Fetching a JWKS over HTTPS with its own trust roots.

use super::jwks::JwksError;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_JWKS_BYTES: usize = 1024 * 1024;
const JWKS_MEDIA_TYPES: &str = "application/jwk-set+json, application/json";

/// Fetches a JWKS over HTTPS with its own trust roots: the API server's `/openid/v1/jwks`
/// (cluster CA, bearer token) or any OIDC issuer's `jwks_uri`.
pub(crate) struct JwksFetcher {
    url: hyper::Uri,
    bearer_token_file: Option<PathBuf>,
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl JwksFetcher {
    pub(crate) fn new(
        url: &str,
        ca_pem: Option<&[u8]>,
        bearer_token_file: Option<PathBuf>,
    ) -> Result<Self, JwksError> {
        let config = |reason: String| JwksError::Config(format!("{url}: {reason}"));
        let uri: hyper::Uri = url.parse().map_err(|e| config(format!("not a URL: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(config("the key set URL must be https://".into()));
        }
        // TLS 1.2 stays allowed here: the issuer may be any OIDC provider, not only the API server.
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| config(e.to_string()))?;
        let tls = match ca_pem {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in crate::pem::certs(pem).map_err(|e| config(format!("CA bundle: {e}")))? {
                    roots
                        .add(cert)
                        .map_err(|e| config(format!("CA bundle: {e}")))?;
                }
                builder.with_root_certificates(roots)
            }
            None => {
                use hyper_rustls::ConfigBuilderExt;
                builder.with_native_roots().map_err(|e| {
                    config(format!(
                        "no CA bundle given and the system roots do not load: {e}"
                    ))
                })?
            }
        }
        .with_no_client_auth();
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(FETCH_TIMEOUT));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).build(https);
        Ok(JwksFetcher {
            url: uri,
            bearer_token_file,
            client,
        })
    }

    pub(crate) async fn fetch(&self) -> Result<Vec<u8>, JwksError> {
        let fail = |reason: String| JwksError::Fetch {
            url: self.url.to_string(),
            reason,
        };
        let mut request =
            http::Request::get(self.url.clone()).header(http::header::ACCEPT, JWKS_MEDIA_TYPES);
        if let Some(path) = &self.bearer_token_file {
            let token = tokio::fs::read_to_string(path).await.map_err(|e| {
                fail(format!(
                    "cannot read bearer token file {}: {e}",
                    path.display()
                ))
            })?;
            let mut value = http::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                .map_err(|_| {
                    fail(format!(
                        "bearer token file {} holds invalid characters",
                        path.display()
                    ))
                })?;
            value.set_sensitive(true);
            request = request.header(http::header::AUTHORIZATION, value);
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| fail(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| fail(error_chain(&e)))?;
            let status = response.status();
            if !status.is_success() {
                return Err(fail(format!("server answered {status}")));
            }
            let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| fail(format!("reading the answer: {e}")))?;
            Ok(body.to_bytes().to_vec())
        };
        tokio::time::timeout(FETCH_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                fail(format!(
                    "no answer within {}",
                    humantime::format_duration(FETCH_TIMEOUT)
                ))
            })?
    }
}

/// An error and its causes on one line (the client's own message is only "client error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
