//! Offline validation of service-account JWTs against the issuer's published key set (JWKS).
//!
//! The keys come from inline JSON, a file, or an HTTPS URL (usually the API server's
//! `/openid/v1/jwks`). They live in an [`ArcSwap`] and are replaced whole on refresh: periodically
//! ([`JwksValidator::spawn_refresh`]) and, rate-limited, when a token names an unknown key.
//! Only RS256 and ES256 are accepted; the decisions (algorithm, key, claims) are plain functions.

use super::claims::{ClaimRules, ServiceAccountClaims, workload_from_claims};
use super::fetch::JwksFetcher;
use super::{AUDIENCE, BoxFuture, TokenError, TokenValidator, precheck};
use crate::spiffe_id::Workload;
use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Clock skew tolerated on `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Shortest time between two refreshes caused by tokens naming unknown keys.
pub const DEFAULT_MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Longest piece of a token's header or claims quoted in an error message.
const MAX_QUOTED: usize = 64;

/// Why a key set could not be loaded. The validator keeps its previous keys when this happens.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read key set file {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error("cannot fetch key set from {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("key set is not valid JWKS JSON: {0}")]
    Invalid(String),
    #[error("key set has no usable key (only RS256 and P-256 ES256 signing keys are used)")]
    NoUsableKey,
    #[error("invalid key set source: {0}")]
    Config(String),
}

/// Where the issuer's keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// A fixed key set; refreshing does nothing.
    Json(Vec<u8>),
    /// A file, re-read on every refresh.
    File(PathBuf),
    /// An HTTPS URL such as `https://kubernetes.default.svc/openid/v1/jwks`, fetched on every
    /// refresh. `ca_pem` replaces the system roots (usually the cluster CA); the bearer token
    /// file is re-read on every fetch because projected tokens rotate.
    Url {
        url: String,
        ca_pem: Option<Vec<u8>>,
        bearer_token_file: Option<PathBuf>,
    },
}

/// One verification key from the set.
#[derive(Debug, Clone)]
struct VerifyKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// The usable keys of one JWKS document, immutable once parsed.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<VerifyKey>,
}

impl KeySet {
    /// Parses a JWKS document, keeping the RS256 and P-256 ES256 signing keys.
    pub fn parse(json: &[u8]) -> Result<Self, JwksError> {
        let set: JwkSet =
            serde_json::from_slice(json).map_err(|e| JwksError::Invalid(e.to_string()))?;
        let keys: Vec<VerifyKey> = set.keys.iter().filter_map(usable_key).collect();
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(KeySet { keys })
    }

    /// The key ids, in document order (keys without an id are left out).
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().filter_map(|k| k.kid.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The verification key a JWK describes, if it is one we accept.
fn usable_key(jwk: &Jwk) -> Option<VerifyKey> {
    if matches!(
        jwk.common.public_key_use,
        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
    ) {
        return None;
    }
    let declared = jwk.common.key_algorithm;
    let (alg, key) = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) if matches!(declared, None | Some(KeyAlgorithm::RS256)) => (
            Algorithm::RS256,
            DecodingKey::from_rsa_components(&p.n, &p.e).ok()?,
        ),
        AlgorithmParameters::EllipticCurve(p)
            if p.curve == EllipticCurve::P256
                && matches!(declared, None | Some(KeyAlgorithm::ES256)) =>
        {
            let coordinate_ok = |c: &str| URL_SAFE_NO_PAD.decode(c).is_ok_and(|b| b.len() == 32);
            if !coordinate_ok(&p.x) || !coordinate_ok(&p.y) {
                return None;
            }
            (
                Algorithm::ES256,
                DecodingKey::from_ec_components(&p.x, &p.y).ok()?,
            )
        }
        _ => return None,
    };
    Some(VerifyKey {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    })
}

/// What the token's protected header says, once accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TokenHeader {
    alg: Algorithm,
    kid: Option<String>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    crit: Option<serde_json::Value>,
}

/// Reads and checks the header without trusting anything in it yet.
fn parse_header(token: &str) -> Result<TokenHeader, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed("header is not base64url".into()))?;
    let raw: RawHeader = serde_json::from_slice(&json).map_err(|_| {
        TokenError::Malformed("header is not a JSON object with a string \"alg\"".into())
    })?;
    if raw.crit.is_some() {
        return Err(TokenError::Malformed(
            "header marks extensions critical (crit); none are supported".into(),
        ));
    }
    Ok(TokenHeader {
        alg: accepted_alg(&raw.alg)?,
        kid: raw.kid,
    })
}

/// The only algorithms a service-account issuer uses. Everything else, above all `none` and
/// the HMAC family (a public key used as a shared secret), is a forgery attempt.
fn accepted_alg(alg: &str) -> Result<Algorithm, TokenError> {
    match alg {
        "RS256" => Ok(Algorithm::RS256),
        "ES256" => Ok(Algorithm::ES256),
        a if a.eq_ignore_ascii_case("none") => Err(TokenError::BadSignature(
            "unsigned tokens (alg \"none\") are refused".into(),
        )),
        a if a.starts_with("HS") => Err(TokenError::BadSignature(format!(
            "symmetric algorithm {:?} is refused; only RS256 and ES256 are accepted",
            quoted(a)
        ))),
        a => Err(TokenError::BadSignature(format!(
            "algorithm {:?} is refused; only RS256 and ES256 are accepted",
            quoted(a)
        ))),
    }
}

#[derive(Debug)]
enum KeyChoice<'a> {
    Key(&'a VerifyKey),
    /// No key fits yet; a refresh may bring it.
    Unknown,
    Refused(TokenError),
}

/// Picks the key named by `kid`; without a kid, the only key of the token's algorithm.
fn select_key<'a>(keys: &'a KeySet, alg: Algorithm, kid: Option<&str>) -> KeyChoice<'a> {
    match kid {
        Some(kid) => {
            let mut named = keys
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .peekable();
            if named.peek().is_none() {
                return KeyChoice::Unknown;
            }
            match named.find(|k| k.alg == alg) {
                Some(key) => KeyChoice::Key(key),
                None => KeyChoice::Refused(TokenError::BadSignature(format!(
                    "key {:?} is not an {alg:?} key",
                    quoted(kid)
                ))),
            }
        }
        None => {
            let mut fitting = keys.keys.iter().filter(|k| k.alg == alg);
            match (fitting.next(), fitting.next()) {
                (Some(key), None) => KeyChoice::Key(key),
                (None, _) => KeyChoice::Unknown,
                (Some(_), Some(_)) => KeyChoice::Refused(TokenError::BadSignature(format!(
                    "token has no key id and the key set has several {alg:?} keys"
                ))),
            }
        }
    }
}

fn unknown_key(alg: Algorithm, kid: Option<&str>) -> TokenError {
    TokenError::BadSignature(match kid {
        Some(kid) => format!("the issuer's key set has no key {:?}", quoted(kid)),
        None => format!("the issuer's key set has no {alg:?} key"),
    })
}

/// Whether a refresh triggered by an unknown key may run now.
fn refresh_due(last: Option<Instant>, now: Instant, min_interval: Duration) -> bool {
    last.is_none_or(|last| now.saturating_duration_since(last) >= min_interval)
}

/// Checks the signature with `key` and returns the claims; claim values are checked later.
fn verify_signature(token: &str, key: &VerifyKey) -> Result<ServiceAccountClaims, TokenError> {
    let mut validation = Validation::new(key.alg);
    validation.required_spec_claims = HashSet::new();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    jsonwebtoken::decode::<ServiceAccountClaims>(token, &key.key, &validation)
        .map(|data| data.claims)
        .map_err(|e| jwt_error(&e))
}

/// Maps the library's errors without echoing any part of the token.
fn jwt_error(e: &jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => {
            TokenError::BadSignature("signature does not match the issuer's key".into())
        }
        K::InvalidEcdsaKey | K::InvalidRsaKey(_) | K::InvalidKeyFormat => {
            TokenError::BadSignature("the issuer's key cannot check this signature".into())
        }
        K::InvalidAlgorithm
        | K::MissingAlgorithm
        | K::UnsupportedAlgorithm
        | K::InvalidAlgorithmName => {
            TokenError::BadSignature("algorithm does not match the issuer's key".into())
        }
        K::Base64(_) => TokenError::Malformed("a part is not base64url".into()),
        K::Utf8(_) => TokenError::Malformed("claims are not UTF-8".into()),
        K::Json(e) => TokenError::Malformed(format!(
            "header or claims do not have the expected JSON shape (line {}, column {})",
            e.line(),
            e.column()
        )),
        _ => TokenError::Malformed("token cannot be decoded".into()),
    }
}

/// A bounded, single-line rendering of a string taken from a token.
pub(crate) fn quoted(s: &str) -> String {
    s.chars()
        .take(MAX_QUOTED)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

enum Source {
    Fixed,
    File(PathBuf),
    Url(Box<JwksFetcher>),
}

/// Validates service-account JWTs offline against the issuer's JWKS.
pub struct JwksValidator {
    rules: ClaimRules,
    source: Source,
    keys: ArcSwap<KeySet>,
    min_refresh_interval: Duration,
    /// When keys were last (re)loaded; the lock also makes concurrent refreshes queue up.
    last_refresh: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for JwksValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksValidator")
            .field("rules", &self.rules)
            .field("key_ids", &self.key_ids())
            .finish_non_exhaustive()
    }
}

impl JwksValidator {
    fn with_source(issuer: String, source: Source, keys: KeySet) -> Self {
        JwksValidator {
            rules: ClaimRules {
                issuer,
                audience: AUDIENCE.to_string(),
                leeway_secs: DEFAULT_LEEWAY.as_secs().try_into().unwrap_or(i64::MAX),
            },
            source,
            keys: ArcSwap::from_pointee(keys),
            min_refresh_interval: DEFAULT_MIN_REFRESH_INTERVAL,
            last_refresh: tokio::sync::Mutex::new(Some(Instant::now())),
        }
    }

    /// A validator for tokens from `issuer` (their `iss`), with a fixed key set.
    pub fn from_json(issuer: impl Into<String>, jwks: &[u8]) -> Result<Self, JwksError> {
        Ok(Self::with_source(
            issuer.into(),
            Source::Fixed,
            KeySet::parse(jwks)?,
        ))
    }

    /// A fixed, already parsed key set (the local issuer's).
    pub(crate) fn from_keys(issuer: impl Into<String>, keys: KeySet) -> Self {
        Self::with_source(issuer.into(), Source::Fixed, keys)
    }

    /// A validator whose keys are read from `path` now and on every refresh.
    pub fn from_file(
        issuer: impl Into<String>,
        path: impl Into<PathBuf>,
    ) -> Result<Self, JwksError> {
        let path = path.into();
        let bytes = std::fs::read(&path).map_err(|e| read_error(&path, &e))?;
        let keys = KeySet::parse(&bytes)?;
        Ok(Self::with_source(issuer.into(), Source::File(path), keys))
    }

    /// A validator over any source, loading the keys once before returning.
    pub async fn load(issuer: impl Into<String>, source: JwksSource) -> Result<Self, JwksError> {
        let issuer = issuer.into();
        match source {
            JwksSource::Json(json) => Self::from_json(issuer, &json),
            JwksSource::File(path) => {
                let keys = KeySet::parse(&read_file(&path).await?)?;
                Ok(Self::with_source(issuer, Source::File(path), keys))
            }
            JwksSource::Url {
                url,
                ca_pem,
                bearer_token_file,
            } => {
                let fetcher = JwksFetcher::new(&url, ca_pem.as_deref(), bearer_token_file)?;
                let keys = KeySet::parse(&fetcher.fetch().await?)?;
                Ok(Self::with_source(
                    issuer,
                    Source::Url(Box::new(fetcher)),
                    keys,
                ))
            }
        }
    }

    /// Accept tokens issued for `audience` instead of [`AUDIENCE`].
    pub fn with_audience(mut self, audience: impl Into<String>) -> Self {
        self.rules.audience = audience.into();
        self
    }

    /// Clock skew tolerated on `exp` and `nbf` (default [`DEFAULT_LEEWAY`]).
    pub fn with_leeway(mut self, leeway: Duration) -> Self {
        self.rules.leeway_secs = leeway.as_secs().try_into().unwrap_or(i64::MAX);
        self
    }

    /// Shortest time between refreshes caused by unknown key ids
    /// (default [`DEFAULT_MIN_REFRESH_INTERVAL`]).
    pub fn with_min_refresh_interval(mut self, interval: Duration) -> Self {
        self.min_refresh_interval = interval;
        self
    }

    pub fn issuer(&self) -> &str {
        &self.rules.issuer
    }

    pub fn audience(&self) -> &str {
        &self.rules.audience
    }

    /// The ids of the keys currently trusted.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.load().key_ids()
    }

    /// Reloads the key set from its source. On error the current keys stay in place.
    pub async fn refresh(&self) -> Result<(), JwksError> {
        let mut last = self.last_refresh.lock().await;
        self.reload(&mut last).await
    }

    /// Refreshes every `every` until the validator is dropped or the task aborted.
    pub fn spawn_refresh(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let every = every.max(Duration::from_secs(1));
        let weak: Weak<Self> = Arc::downgrade(&self);
        drop(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(validator) = weak.upgrade() else {
                    return;
                };
                if let Err(e) = validator.refresh().await {
                    tracing::warn!(error = %e, "refreshing the token issuer's key set failed; keeping the current keys");
                }
            }
        })
    }

    async fn reload(&self, last: &mut Option<Instant>) -> Result<(), JwksError> {
        *last = Some(Instant::now());
        let bytes = match &self.source {
            Source::Fixed => return Ok(()),
            Source::File(path) => read_file(path).await?,
            Source::Url(fetcher) => fetcher.fetch().await?,
        };
        let keys = KeySet::parse(&bytes)?;
        let ids = keys.key_ids();
        if ids != self.key_ids() {
            tracing::info!(key_ids = ?ids, issuer = %self.rules.issuer, "token issuer's key set changed");
        }
        self.keys.store(Arc::new(keys));
        Ok(())
    }

    /// Refreshes if the last refresh is old enough; `Err` only if a refresh ran and failed.
    async fn refresh_for_unknown_key(&self) -> Result<(), JwksError> {
        let mut last = self.last_refresh.lock().await;
        if matches!(self.source, Source::Fixed)
            || !refresh_due(*last, Instant::now(), self.min_refresh_interval)
        {
            return Ok(());
        }
        self.reload(&mut last).await
    }

    /// The workload a token proves. Never logs or echoes the token.
    pub async fn validate_token(&self, token: &str) -> Result<Workload, TokenError> {
        precheck(token)?;
        let header = parse_header(token)?;
        // A token that says it comes from another issuer is refused before any key lookup: it
        // could never verify, and naming the issuer helps whoever configured it. Nothing from
        // the unverified payload is trusted; it can only lead to a refusal.
        if let Some(iss) = unverified_issuer(token)
            && iss != self.rules.issuer
        {
            return Err(TokenError::WrongIssuer {
                got: quoted(&iss),
                expected: self.rules.issuer.clone(),
            });
        }
        let kid = header.kid.as_deref();
        let mut keys = self.keys.load_full();
        if matches!(select_key(&keys, header.alg, kid), KeyChoice::Unknown) {
            if let Err(e) = self.refresh_for_unknown_key().await {
                return Err(TokenError::Unavailable(format!(
                    "token names a key this validator does not know, and refreshing the key set failed: {e}"
                )));
            }
            keys = self.keys.load_full();
        }
        let key = match select_key(&keys, header.alg, kid) {
            KeyChoice::Key(key) => key,
            KeyChoice::Unknown => return Err(unknown_key(header.alg, kid)),
            KeyChoice::Refused(e) => return Err(e),
        };
        let claims = verify_signature(token, key)?;
        workload_from_claims(&claims, &self.rules, unix_now())
    }
}

impl TokenValidator for JwksValidator {
    fn validate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Workload, TokenError>> {
        Box::pin(self.validate_token(token))
    }
}

/// The `iss` claim of a token's payload, without verifying anything.
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("iss")?.as_str().map(str::to_string)
}

fn read_error(path: &Path, e: &std::io::Error) -> JwksError {
    JwksError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

async fn read_file(path: &Path) -> Result<Vec<u8>, JwksError> {
    tokio::fs::read(path)
        .await
        .map_err(|e| read_error(path, &e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! The decisions over plain data. Real signed tokens, files and URLs are in `local`'s tests.
    use super::*;
    use serde_json::{Value, json};

    /// A table row: name, input, and the outcome (`Err` holds a metric reason).
    type Case<I, O> = (&'static str, I, Result<O, &'static str>);

    const MALFORMED: &str = "token_malformed";
    const FORGED: &str = "token_bad_signature";

    #[test]
    fn algorithm_table() {
        assert_eq!(accepted_alg("RS256"), Ok(Algorithm::RS256));
        assert_eq!(accepted_alg("ES256"), Ok(Algorithm::ES256));
        #[rustfmt::skip]
        let refused = [
            ("none", "alg \"none\""), ("NONE", "alg \"none\""),
            ("HS256", "symmetric"), ("HS512", "symmetric"),
            ("RS512", "only RS256 and ES256"), ("PS256", "only RS256 and ES256"),
            ("ES384", "only RS256 and ES256"), ("EdDSA", "only RS256 and ES256"),
            ("", "only RS256 and ES256"),
        ];
        for (alg, says) in refused {
            match accepted_alg(alg) {
                Err(TokenError::BadSignature(m)) => assert!(m.contains(says), "{alg}: {m}"),
                other => panic!("{alg}: {other:?}"),
            }
        }
    }

    #[test]
    fn header_table() {
        let h = |v: Value| format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode(v.to_string()));
        let es = |kid: Option<&str>| Ok((Algorithm::ES256, kid.map(String::from)));
        #[rustfmt::skip]
        let cases: Vec<Case<String, (Algorithm, Option<String>)>> = vec![
            ("alg and kid", h(json!({"alg": "ES256", "kid": "k1"})), es(Some("k1"))),
            ("typ is ignored", h(json!({"alg": "ES256", "typ": "JWT"})), es(None)),
            ("RS256", h(json!({"alg": "RS256"})), Ok((Algorithm::RS256, None))),
            ("two parts", "eyJhbGciOiJFUzI1NiJ9.e30".into(), Err(MALFORMED)),
            ("four parts", format!("{}.x", h(json!({"alg": "ES256"}))), Err(MALFORMED)),
            ("not base64", "!!!.e30.c2ln".into(), Err(MALFORMED)),
            ("not json", format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode("nope")), Err(MALFORMED)),
            ("no alg", h(json!({"kid": "k1"})), Err(MALFORMED)),
            ("alg not a string", h(json!({"alg": 7})), Err(MALFORMED)),
            ("crit", h(json!({"alg": "ES256", "crit": ["b64"]})), Err(MALFORMED)),
            ("alg none", h(json!({"alg": "none"})), Err(FORGED)),
            ("alg HS256", h(json!({"alg": "HS256", "kid": "k1"})), Err(FORGED)),
        ];
        for (name, token, want) in cases {
            let got = parse_header(&token)
                .map(|h| (h.alg, h.kid))
                .map_err(|e| e.reason());
            assert_eq!(got, want, "{name}");
        }
    }

    fn key(kid: Option<&str>, alg: Algorithm) -> VerifyKey {
        let key = DecodingKey::from_secret(b"unused");
        VerifyKey {
            kid: kid.map(str::to_string),
            alg,
            key,
        }
    }

    #[test]
    fn key_choice_table() {
        let (es, rs) = (Algorithm::ES256, Algorithm::RS256);
        let mixed = KeySet {
            keys: vec![key(Some("a"), es), key(Some("b"), rs), key(Some("b"), es)],
        };
        let one_each = KeySet {
            keys: vec![key(Some("a"), es), key(None, rs)],
        };
        let two_es = KeySet {
            keys: vec![key(Some("a"), es), key(Some("c"), es)],
        };
        #[rustfmt::skip]
        let cases = [
            ("named", &mixed, es, Some("a"), Ok((Some("a"), es))),
            ("named, RSA", &mixed, rs, Some("b"), Ok((Some("b"), rs))),
            ("same kid, other algorithm", &mixed, es, Some("b"), Ok((Some("b"), es))),
            ("kid of another algorithm", &mixed, rs, Some("a"), Err("refused")),
            ("unknown kid", &mixed, es, Some("z"), Err("unknown")),
            ("no kid, the only ES256 key", &one_each, es, None, Ok((Some("a"), es))),
            ("no kid, the only RS256 key", &one_each, rs, None, Ok((None, rs))),
            ("no kid, two candidates", &two_es, es, None, Err("refused")),
            ("no kid, no candidate", &two_es, rs, None, Err("unknown")),
        ];
        for (name, keys, alg, kid, want) in cases {
            let got = match select_key(keys, alg, kid) {
                KeyChoice::Key(k) => Ok((k.kid.as_deref(), k.alg)),
                KeyChoice::Unknown => Err("unknown"),
                KeyChoice::Refused(_) => Err("refused"),
            };
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn key_set_table() {
        // Points and moduli only need the right shapes to load.
        let (coord, short) = (
            URL_SAFE_NO_PAD.encode([7u8; 32]),
            URL_SAFE_NO_PAD.encode([7u8; 31]),
        );
        let n = URL_SAFE_NO_PAD.encode([0xc5u8; 256]);
        let ec = |extra: Value| {
            let mut k = json!({"kty": "EC", "crv": "P-256", "x": coord, "y": coord, "kid": "ec"});
            if let (Value::Object(k), Value::Object(extra)) = (&mut k, extra) {
                k.extend(extra);
            }
            k
        };
        let rsa =
            json!({"kty": "RSA", "n": n, "e": "AQAB", "kid": "rsa", "alg": "RS256", "use": "sig"});
        #[rustfmt::skip]
        let unusable = vec![
            ec(json!({"kid": "p384", "crv": "P-384"})),
            ec(json!({"kid": "enc", "use": "enc"})),
            ec(json!({"kid": "es384", "alg": "ES384"})),
            ec(json!({"kid": "short", "x": short})),
            json!({"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}),
            json!({"kty": "RSA", "n": n, "e": "AQAB", "kid": "rs512", "alg": "RS512"}),
            json!({"kty": "OKP", "crv": "Ed25519", "x": coord, "kid": "ed"}),
            json!({"kty": "weird", "kid": "weird"}),
        ];
        let all = [&unusable[..], std::slice::from_ref(&rsa)].concat();
        #[rustfmt::skip]
        let cases: Vec<Case<Value, Vec<&str>>> = vec![
            ("kubernetes RSA key", json!({"keys": [rsa]}), Ok(vec!["rsa"])),
            ("EC and RSA", json!({"keys": [ec(json!({})), rsa]}), Ok(vec!["ec", "rsa"])),
            ("EC with alg and use", json!({"keys": [ec(json!({"alg": "ES256", "use": "sig"}))]}), Ok(vec!["ec"])),
            ("unusable keys are skipped", json!({"keys": all}), Ok(vec!["rsa"])),
            ("only unusable keys", json!({"keys": unusable}), Err("no usable")),
            ("empty set", json!({"keys": []}), Err("no usable")),
            ("no keys member", json!({"key": []}), Err("invalid")),
            ("not an object", json!("keys"), Err("invalid")),
        ];
        for (name, doc, want) in cases {
            let got = match KeySet::parse(doc.to_string().as_bytes()) {
                Ok(set) => Ok(set.key_ids()),
                Err(JwksError::NoUsableKey) => Err("no usable"),
                Err(JwksError::Invalid(_)) => Err("invalid"),
                Err(e) => panic!("{name}: {e}"),
            };
            let want = want.map(|ids| ids.into_iter().map(String::from).collect::<Vec<_>>());
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn refresh_rate_limit() {
        let (t0, min) = (Instant::now(), Duration::from_secs(30));
        #[rustfmt::skip]
        let cases = [
            ("never refreshed", None, t0, min, true),
            ("just refreshed", Some(t0), t0, min, false),
            ("29 s later", Some(t0), t0 + Duration::from_secs(29), min, false),
            ("30 s later", Some(t0), t0 + min, min, true),
            ("no limit", Some(t0), t0, Duration::ZERO, true),
            ("clock before the last refresh", Some(t0 + min), t0, min, false),
        ];
        for (name, last, now, min, want) in cases {
            assert_eq!(refresh_due(last, now, min), want, "{name}");
        }
    }

    #[test]
    fn quoted_text_is_bounded_and_single_line() {
        assert_eq!(quoted("a\nb"), "a?b");
        assert_eq!(quoted(&"k".repeat(1000)).len(), MAX_QUOTED);
    }
}
