//! A token issuer for local mode (`musubi up`) and tests.
//!
//! It mints JWTs shaped like Kubernetes projected service-account tokens and publishes its
//! public key as a JWKS, so local mode goes through the real [`JwksValidator`] path. The key is
//! generated in memory and lives as long as the issuer; it is not a production issuer.

use super::AUDIENCE;
use super::jwks::{JwksError, JwksValidator, KeySet};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why the local issuer could not start or mint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocalIssuerError {
    #[error("generating the {0} signing key failed")]
    KeyGeneration(&'static str),
    #[error("signing the token failed")]
    Signing,
    #[error("token lifetime or time offset is out of range")]
    TimeOutOfRange,
    #[error("the issuer's own key set does not load: {0}")]
    KeySet(#[from] JwksError),
}

/// How to set a header field or claim when minting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Override<T> {
    /// What a real issuer would put there.
    #[default]
    Keep,
    /// Leave the field out.
    Omit,
    /// Put this value instead.
    Set(T),
}

/// Knobs for minting tokens, most of them to make tokens a validator must refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintOptions {
    /// `exp - iat` (default one hour).
    pub ttl: Duration,
    /// `aud` (default `[AUDIENCE]`).
    pub audience: Vec<String>,
    /// `iss` (default: the issuer's name).
    pub issuer: Override<String>,
    /// `sub` (default `system:serviceaccount:<ns>:<sa>`).
    pub subject: Override<String>,
    /// The header's `kid` (default: the issuer's key id).
    pub kid: Override<String>,
    /// Moves `iat`, `nbf` and `exp` together; negative is in the past.
    pub time_offset_secs: i64,
    /// Moves `nbf` relative to `iat`; positive makes a not-yet-valid token.
    pub not_before_offset_secs: i64,
    /// Leave out `exp`.
    pub omit_exp: bool,
    /// Leave out the `kubernetes.io` claim.
    pub omit_kubernetes_claim: bool,
}

impl Default for MintOptions {
    fn default() -> Self {
        MintOptions {
            ttl: Duration::from_secs(3600),
            audience: vec![AUDIENCE.to_string()],
            issuer: Override::Keep,
            subject: Override::Keep,
            kid: Override::Keep,
            time_offset_secs: 0,
            not_before_offset_secs: 0,
            omit_exp: false,
            omit_kubernetes_claim: false,
        }
    }
}

enum SigningKey {
    Es256(EcdsaKeyPair),
    Rs256(RsaKeyPair),
}

/// An in-memory JWT issuer with one signing key.
pub struct LocalIssuer {
    issuer: String,
    kid: String,
    key: SigningKey,
    jwks_json: String,
    keys: KeySet,
}

impl std::fmt::Debug for LocalIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalIssuer")
            .field("issuer", &self.issuer)
            .field("kid", &self.kid)
            .field("alg", &self.algorithm())
            .finish_non_exhaustive()
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// RFC 7638 thumbprint: SHA-256 over the required members, sorted, without whitespace.
fn thumbprint(required: &Value) -> String {
    // Callers write the members in sorted order, and serde_json keeps them sorted (or, with
    // `preserve_order`, as written), so this is the canonical form.
    let canonical = required.to_string();
    b64(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, canonical.as_bytes()).as_ref())
}

impl LocalIssuer {
    /// A new ES256 (P-256) issuer whose tokens carry `iss: issuer`.
    pub fn generate(issuer: &str) -> Result<Self, LocalIssuerError> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| LocalIssuerError::KeyGeneration("ES256"))?;
        // Uncompressed SEC1 point: 0x04 || x || y.
        let point = pair.public_key().as_ref();
        let (Some(x), Some(y)) = (point.get(1..33), point.get(33..65)) else {
            return Err(LocalIssuerError::KeyGeneration("ES256"));
        };
        let required = json!({"crv": "P-256", "kty": "EC", "x": b64(x), "y": b64(y)});
        Self::assemble(issuer, SigningKey::Es256(pair), required)
    }

    /// A new RS256 (RSA 2048) issuer, for testing the RSA path Kubernetes uses by default.
    pub fn generate_rsa(issuer: &str) -> Result<Self, LocalIssuerError> {
        let pair = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
            .map_err(|_| LocalIssuerError::KeyGeneration("RS256"))?;
        let public = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
        let required = json!({"e": b64(&public.e), "kty": "RSA", "n": b64(&public.n)});
        Self::assemble(issuer, SigningKey::Rs256(pair), required)
    }

    fn assemble(issuer: &str, key: SigningKey, required: Value) -> Result<Self, LocalIssuerError> {
        let kid = thumbprint(&required);
        let mut jwk = required;
        if let Value::Object(fields) = &mut jwk {
            fields.insert("kid".into(), kid.clone().into());
            fields.insert("use".into(), "sig".into());
            fields.insert("alg".into(), alg_name(&key).into());
        }
        let jwks_json = json!({ "keys": [jwk] }).to_string();
        // Parsed like any other issuer's key set, so local mode checks what production checks.
        let keys = KeySet::parse(jwks_json.as_bytes())?;
        Ok(LocalIssuer {
            issuer: issuer.to_string(),
            kid,
            key,
            jwks_json,
            keys,
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The key id in the JWKS and in every token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// `"ES256"` or `"RS256"`.
    pub fn algorithm(&self) -> &'static str {
        alg_name(&self.key)
    }

    /// The public key set, as the API server serves it at `/openid/v1/jwks`.
    pub fn jwks_json(&self) -> String {
        self.jwks_json.clone()
    }

    /// A validator trusting this issuer's key, for [`AUDIENCE`].
    pub fn validator(&self) -> JwksValidator {
        JwksValidator::from_keys(self.issuer.clone(), self.keys.clone())
    }

    /// A token for `namespace`/`service_account` valid for `ttl` from now.
    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
    ) -> Result<String, LocalIssuerError> {
        self.mint_with(
            namespace,
            service_account,
            &MintOptions {
                ttl,
                ..MintOptions::default()
            },
        )
    }

    /// A token shaped by `options`; the default options give what [`Self::mint`] gives.
    pub fn mint_with(
        &self,
        namespace: &str,
        service_account: &str,
        options: &MintOptions,
    ) -> Result<String, LocalIssuerError> {
        let mut header = Map::new();
        header.insert("alg".into(), self.algorithm().into());
        set(&mut header, "kid", &options.kid, || self.kid.clone());
        let claims = self.claims(namespace, service_account, options)?;
        self.sign(&Value::Object(header), &Value::Object(claims))
    }

    fn claims(
        &self,
        ns: &str,
        sa: &str,
        options: &MintOptions,
    ) -> Result<Map<String, Value>, LocalIssuerError> {
        let ttl =
            i64::try_from(options.ttl.as_secs()).map_err(|_| LocalIssuerError::TimeOutOfRange)?;
        let iat = unix_now()
            .checked_add(options.time_offset_secs)
            .ok_or(LocalIssuerError::TimeOutOfRange)?;
        let nbf = iat
            .checked_add(options.not_before_offset_secs)
            .ok_or(LocalIssuerError::TimeOutOfRange)?;
        let exp = iat
            .checked_add(ttl)
            .ok_or(LocalIssuerError::TimeOutOfRange)?;

        let mut claims = Map::new();
        claims.insert("aud".into(), json!(options.audience));
        if !options.omit_exp {
            claims.insert("exp".into(), exp.into());
        }
        claims.insert("iat".into(), iat.into());
        set(&mut claims, "iss", &options.issuer, || self.issuer.clone());
        claims.insert("jti".into(), random_id()?.into());
        if !options.omit_kubernetes_claim {
            let uid = stable_uid(&self.issuer, ns, sa);
            claims.insert(
                "kubernetes.io".into(),
                json!({ "namespace": ns, "serviceaccount": { "name": sa, "uid": uid } }),
            );
        }
        claims.insert("nbf".into(), nbf.into());
        set(&mut claims, "sub", &options.subject, || {
            format!("system:serviceaccount:{ns}:{sa}")
        });
        Ok(claims)
    }

    fn sign(&self, header: &Value, claims: &Value) -> Result<String, LocalIssuerError> {
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let signature = match &self.key {
            SigningKey::Es256(pair) => pair
                .sign(&rng, message.as_bytes())
                .map_err(|_| LocalIssuerError::Signing)?
                .as_ref()
                .to_vec(),
            SigningKey::Rs256(pair) => {
                let mut signature = vec![0; pair.public_modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, &rng, message.as_bytes(), &mut signature)
                    .map_err(|_| LocalIssuerError::Signing)?;
                signature
            }
        };
        Ok(format!("{message}.{}", b64(&signature)))
    }
}

fn alg_name(key: &SigningKey) -> &'static str {
    match key {
        SigningKey::Es256(_) => "ES256",
        SigningKey::Rs256(_) => "RS256",
    }
}

fn set(
    fields: &mut Map<String, Value>,
    name: &str,
    choice: &Override<String>,
    keep: impl FnOnce() -> String,
) {
    match choice {
        Override::Keep => {
            fields.insert(name.into(), keep().into());
        }
        Override::Omit => {}
        Override::Set(value) => {
            fields.insert(name.into(), value.clone().into());
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn random_id() -> Result<String, LocalIssuerError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| LocalIssuerError::Signing)?;
    Ok(uuid_text(&bytes))
}

/// A service account keeps its uid across tokens, as in a cluster.
fn stable_uid(issuer: &str, ns: &str, sa: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("{issuer}\n{ns}\n{sa}").as_bytes(),
    );
    let mut bytes = [0u8; 16];
    for (b, d) in bytes.iter_mut().zip(digest.as_ref()) {
        *b = *d;
    }
    uuid_text(&bytes)
}

fn uuid_text(b: &[u8; 16]) -> String {
    let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! The JWKS validator over real signed tokens, key files and an HTTPS key endpoint.
    use super::*;
    use crate::token::jwks::JwksSource;
    use crate::token::{MAX_TOKEN_BYTES, TokenError, TokenValidator};
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    const ISS: &str = "https://kubernetes.default.svc.cluster.local";
    const TEN_MINUTES: Duration = Duration::from_secs(600);

    fn decode(part: &str) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(part).unwrap()
    }

    /// Header, claims and signature of a token.
    fn parts(token: &str) -> (Value, Value, Vec<u8>) {
        let p: Vec<&str> = token.split('.').collect();
        let json = |part: &str| serde_json::from_slice(&decode(part)).unwrap();
        (json(p[0]), json(p[1]), decode(p[2]))
    }

    /// `base64url(header).base64url(claims)`, the JWS signing input.
    fn signing_input(header: &Value, claims: &Value) -> String {
        let (h, c) = (header.to_string(), claims.to_string());
        format!("{}.{}", b64(h.as_bytes()), b64(c.as_bytes()))
    }

    fn forge(header: &Value, claims: &Value, signature: &[u8]) -> String {
        format!("{}.{}", signing_input(header, claims), b64(signature))
    }

    type Outcome = Result<(String, String), &'static str>;

    async fn outcome(v: &JwksValidator, token: &str) -> Outcome {
        v.validate(token)
            .await
            .map(|w| (w.namespace, w.service_account))
            .map_err(|e| e.reason())
    }

    /// Whether `v` accepts a fresh token from `issuer`.
    async fn accepts(v: &JwksValidator, issuer: &LocalIssuer) -> bool {
        outcome(v, &issuer.mint("shop", "web", TEN_MINUTES).unwrap())
            .await
            .is_ok()
    }

    /// Every way a token can be good or bad, for an ES256 or an RS256 issuer.
    async fn token_table(issuer: &LocalIssuer) {
        let v = issuer.validator();
        let same_alg = |iss: &str| match issuer.algorithm() {
            "RS256" => LocalIssuer::generate_rsa(iss).unwrap(),
            _ => LocalIssuer::generate(iss).unwrap(),
        };
        let stranger = same_alg(ISS);
        let mint = |o: MintOptions| issuer.mint_with("shop", "web", &o).unwrap();
        let good = issuer.mint("shop", "web", TEN_MINUTES).unwrap();
        let (header, claims, signature) = parts(&good);
        let mut tampered = claims.clone();
        tampered["kubernetes.io"]["namespace"] = "kube-system".into();
        let other_alg = if issuer.algorithm() == "ES256" {
            "RS256"
        } else {
            "ES256"
        };
        let hmac_key =
            aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, issuer.jwks_json().as_bytes());
        let hs256 = |h: &Value, c: &Value| {
            let mac = aws_lc_rs::hmac::sign(&hmac_key, signing_input(h, c).as_bytes());
            forge(h, c, mac.as_ref())
        };
        let web = Ok(("shop".to_string(), "web".to_string()));
        let kid = issuer.kid();
        #[rustfmt::skip]
        let cases: Vec<(&str, String, Outcome)> = vec![
            ("good", good.clone(), web.clone()),
            ("no kid, the only key", mint(MintOptions { kid: Override::Omit, ..Default::default() }), web.clone()),
            ("several audiences", mint(MintOptions { audience: vec!["https://kubernetes.default.svc".into(), AUDIENCE.into()], ..Default::default() }), web.clone()),
            ("no sub", mint(MintOptions { subject: Override::Omit, ..Default::default() }), web.clone()),
            ("expired within leeway", mint(MintOptions { time_offset_secs: -3610, ..Default::default() }), web.clone()),
            ("wrong audience", mint(MintOptions { audience: vec!["vault".into()], ..Default::default() }), Err("token_wrong_audience")),
            ("expired", mint(MintOptions { time_offset_secs: -7200, ..Default::default() }), Err("token_expired")),
            ("not yet valid", mint(MintOptions { not_before_offset_secs: 3600, ..Default::default() }), Err("token_not_yet_valid")),
            ("other issuer", mint(MintOptions { issuer: Override::Set("https://evil.example".into()), ..Default::default() }), Err("token_wrong_issuer")),
            ("no issuer", mint(MintOptions { issuer: Override::Omit, ..Default::default() }), Err("token_wrong_issuer")),
            ("no exp", mint(MintOptions { omit_exp: true, ..Default::default() }), Err("token_malformed")),
            ("no kubernetes.io claim", mint(MintOptions { omit_kubernetes_claim: true, ..Default::default() }), Err("token_no_service_account")),
            ("sub disagrees with the claim", mint(MintOptions { subject: Override::Set("system:serviceaccount:shop:admin".into()), ..Default::default() }), Err("token_no_service_account")),
            ("another key, same kid", stranger.mint_with("shop", "web", &MintOptions { kid: Override::Set(kid.into()), ..Default::default() }).unwrap(), Err("token_bad_signature")),
            ("another key, unknown kid", stranger.mint("shop", "web", TEN_MINUTES).unwrap(), Err("token_bad_signature")),
            ("another key, no kid", stranger.mint_with("shop", "web", &MintOptions { kid: Override::Omit, ..Default::default() }).unwrap(), Err("token_bad_signature")),
            ("another issuer's key and name", same_alg("https://evil.example").mint("shop", "web", TEN_MINUTES).unwrap(), Err("token_wrong_issuer")),
            ("claims changed after signing", forge(&header, &tampered, &signature), Err("token_bad_signature")),
            ("signature cut short", forge(&header, &claims, &signature[..signature.len() / 2]), Err("token_bad_signature")),
            ("alg none", forge(&json!({"alg": "none", "kid": kid}), &claims, b""), Err("token_bad_signature")),
            ("alg none, no kid", forge(&json!({"alg": "none"}), &claims, b""), Err("token_bad_signature")),
            ("HS256 keyed with the public JWKS", hs256(&json!({"alg": "HS256", "kid": kid}), &claims), Err("token_bad_signature")),
            ("algorithm switched", forge(&json!({"alg": other_alg, "kid": kid}), &claims, &signature), Err("token_bad_signature")),
            ("garbage", "garbage".into(), Err("token_malformed")),
            ("three garbage parts", "a.b.c".into(), Err("token_malformed")),
            ("signature not base64", format!("{good}!"), Err("token_malformed")),
            ("empty", String::new(), Err("token_malformed")),
            ("too large", "a".repeat(MAX_TOKEN_BYTES + 1), Err("token_too_large")),
        ];
        for (name, token, want) in cases {
            assert_eq!(
                outcome(&v, &token).await,
                want,
                "{} {name}",
                issuer.algorithm()
            );
        }
    }

    #[tokio::test]
    async fn es256_token_table() {
        token_table(&LocalIssuer::generate(ISS).unwrap()).await;
    }

    #[tokio::test]
    async fn rs256_token_table() {
        token_table(&LocalIssuer::generate_rsa(ISS).unwrap()).await;
    }

    #[tokio::test]
    async fn errors_never_quote_the_token() {
        let issuer = LocalIssuer::generate(ISS).unwrap();
        let v = issuer.validator();
        let (_, claims, signature) = parts(&issuer.mint("shop", "web", TEN_MINUTES).unwrap());
        let sneaky = MintOptions {
            audience: vec!["vault".into()],
            ..Default::default()
        };
        for token in [
            issuer.mint_with("shop", "web", &sneaky).unwrap(),
            forge(&json!({"alg": "none"}), &claims, &signature),
            forge(&json!({"alg": "ES256", "kid": "x"}), &claims, &signature),
            format!(
                "{}.garbage",
                issuer.mint("shop", "web", TEN_MINUTES).unwrap()
            ),
        ] {
            let message = v.validate(&token).await.unwrap_err().to_string();
            for part in token.split('.').filter(|p| p.len() > 8) {
                assert!(!message.contains(part), "{message}");
            }
        }
    }

    #[tokio::test]
    async fn local_round_trip_through_the_published_jwks() {
        for issuer in [
            LocalIssuer::generate(ISS).unwrap(),
            LocalIssuer::generate_rsa(ISS).unwrap(),
        ] {
            let v = JwksValidator::from_json(ISS, issuer.jwks_json().as_bytes()).unwrap();
            let token = issuer.mint("shop", "web", TEN_MINUTES).unwrap();
            assert_eq!(outcome(&v, &token).await, Ok(("shop".into(), "web".into())));
            assert_eq!(v.key_ids(), vec![issuer.kid().to_string()]);
            let other = JwksValidator::from_json(ISS, issuer.jwks_json().as_bytes())
                .unwrap()
                .with_audience("vault");
            assert_eq!(outcome(&other, &token).await, Err("token_wrong_audience"));
        }
    }

    #[test]
    fn tokens_and_keys_have_the_kubernetes_shape() {
        let issuer = LocalIssuer::generate(ISS).unwrap();
        let jwks: Value = serde_json::from_str(&issuer.jwks_json()).unwrap();
        let key = &jwks["keys"][0];
        assert_eq!(
            (key["kty"].as_str(), key["crv"].as_str()),
            (Some("EC"), Some("P-256"))
        );
        assert_eq!(
            (key["alg"].as_str(), key["use"].as_str()),
            (Some("ES256"), Some("sig"))
        );
        assert_eq!(key["kid"].as_str(), Some(issuer.kid()));
        assert_eq!(decode(key["x"].as_str().unwrap()).len(), 32);
        assert_eq!(decode(key["y"].as_str().unwrap()).len(), 32);

        let rsa = LocalIssuer::generate_rsa(ISS).unwrap();
        let jwks: Value = serde_json::from_str(&rsa.jwks_json()).unwrap();
        let key = &jwks["keys"][0];
        assert_eq!(
            (key["kty"].as_str(), key["alg"].as_str(), key["e"].as_str()),
            (Some("RSA"), Some("RS256"), Some("AQAB"))
        );
        assert_eq!(decode(key["n"].as_str().unwrap()).len(), 256);

        let (header, claims, signature) = parts(&issuer.mint("shop", "web", TEN_MINUTES).unwrap());
        assert_eq!(header, json!({"alg": "ES256", "kid": issuer.kid()}));
        assert_eq!(signature.len(), 64, "JWS ES256 signatures are r || s");
        assert_eq!(claims["iss"], ISS);
        assert_eq!(claims["sub"], "system:serviceaccount:shop:web");
        assert_eq!(claims["aud"], json!([AUDIENCE]));
        assert_eq!(claims["kubernetes.io"]["namespace"], "shop");
        assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], "web");
        let (iat, nbf, exp) = (
            claims["iat"].as_i64().unwrap(),
            claims["nbf"].as_i64(),
            claims["exp"].as_i64(),
        );
        assert_eq!((nbf, exp), (Some(iat), Some(iat + 600)));
        assert!((iat - unix_now()).abs() <= 5);

        let (_, again, _) = parts(&issuer.mint("shop", "web", TEN_MINUTES).unwrap());
        let uid = |c: &Value| {
            c["kubernetes.io"]["serviceaccount"]["uid"]
                .as_str()
                .map(String::from)
        };
        assert_eq!(uid(&claims), uid(&again), "a service account keeps its uid");
        assert_eq!(uid(&claims).map(|u| u.len()), Some(36));
        assert_ne!(claims["jti"], again["jti"]);
        assert_ne!(issuer.kid(), LocalIssuer::generate(ISS).unwrap().kid());
    }

    #[test]
    fn out_of_range_times_are_errors() {
        let issuer = LocalIssuer::generate(ISS).unwrap();
        let forever = MintOptions {
            ttl: Duration::MAX,
            ..Default::default()
        };
        assert_eq!(
            issuer.mint_with("a", "b", &forever),
            Err(LocalIssuerError::TimeOutOfRange)
        );
        let far = MintOptions {
            time_offset_secs: i64::MAX,
            ..Default::default()
        };
        assert_eq!(
            issuer.mint_with("a", "b", &far),
            Err(LocalIssuerError::TimeOutOfRange)
        );
    }

    #[tokio::test]
    async fn file_refresh_picks_up_a_rotated_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let (old, new) = (
            LocalIssuer::generate_rsa(ISS).unwrap(),
            LocalIssuer::generate(ISS).unwrap(),
        );
        std::fs::write(&path, old.jwks_json()).unwrap();
        let v = JwksValidator::from_file(ISS, &path).unwrap();
        let (old_token, new_token) = (
            old.mint("shop", "web", TEN_MINUTES).unwrap(),
            new.mint("shop", "web", TEN_MINUTES).unwrap(),
        );
        assert!(outcome(&v, &old_token).await.is_ok());

        std::fs::write(&path, new.jwks_json()).unwrap();
        // Just loaded: an unknown kid does not trigger another read within the interval.
        assert_eq!(outcome(&v, &new_token).await, Err("token_bad_signature"));
        v.refresh().await.unwrap();
        assert_eq!(v.key_ids(), vec![new.kid().to_string()]);
        assert!(outcome(&v, &new_token).await.is_ok());
        assert_eq!(
            outcome(&v, &old_token).await,
            Err("token_bad_signature"),
            "old key retired"
        );

        // A broken or missing file leaves the current keys in place.
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(v.refresh().await, Err(JwksError::Invalid(_))));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(v.refresh().await, Err(JwksError::Read { .. })));
        assert!(outcome(&v, &new_token).await.is_ok());
    }

    #[tokio::test]
    async fn unknown_kid_rereads_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        let (old, new) = (
            LocalIssuer::generate(ISS).unwrap(),
            LocalIssuer::generate(ISS).unwrap(),
        );
        std::fs::write(&path, old.jwks_json()).unwrap();
        let v = JwksValidator::load(ISS, JwksSource::File(path.clone()))
            .await
            .unwrap()
            .with_min_refresh_interval(Duration::ZERO);
        let both: Value = serde_json::from_str(&old.jwks_json()).unwrap();
        let mut keys = both["keys"].as_array().unwrap().clone();
        keys.extend(
            serde_json::from_str::<Value>(&new.jwks_json()).unwrap()["keys"]
                .as_array()
                .unwrap()
                .clone(),
        );
        std::fs::write(&path, json!({ "keys": keys }).to_string()).unwrap();
        assert!(accepts(&v, &new).await);
        assert!(accepts(&v, &old).await);

        std::fs::write(&path, "not json").unwrap();
        let stranger = LocalIssuer::generate(ISS).unwrap();
        let got = v
            .validate(&stranger.mint("shop", "web", TEN_MINUTES).unwrap())
            .await;
        assert!(
            matches!(&got, Err(TokenError::Unavailable(m)) if m.contains("refreshing")),
            "{got:?}"
        );
        assert!(accepts(&v, &new).await);
    }

    /// An HTTPS endpoint serving a JWKS to requests bearing `Bearer s3cret`, like the API server.
    struct JwksServer {
        url: String,
        ca_pem: String,
        jwks: Arc<Mutex<String>>,
        hits: Arc<AtomicUsize>,
    }

    async fn serve_jwks(jwks: String) -> JwksServer {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(crate::crypto::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}/openid/v1/jwks",
            listener.local_addr().unwrap().port()
        );
        let (jwks, hits) = (Arc::new(Mutex::new(jwks)), Arc::new(AtomicUsize::new(0)));
        let (served, counted) = (jwks.clone(), hits.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, served, counted) =
                    (acceptor.clone(), served.clone(), counted.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let bearer = req.headers().get(http::header::AUTHORIZATION);
                            let (status, body) = if bearer.is_some_and(|b| b == "Bearer s3cret") {
                                counted.fetch_add(1, Ordering::SeqCst);
                                (200, served.lock().unwrap().clone())
                            } else {
                                (401, String::new())
                            };
                            let response = hyper::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(bytes::Bytes::from(body)));
                            async move { response }
                        },
                    );
                    let io = hyper_util::rt::TokioIo::new(tls);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        JwksServer {
            url,
            ca_pem: cert.cert.pem(),
            jwks,
            hits,
        }
    }

    #[tokio::test]
    async fn keys_from_an_https_endpoint() {
        crate::crypto::install_default();
        let (old, new) = (
            LocalIssuer::generate_rsa(ISS).unwrap(),
            LocalIssuer::generate(ISS).unwrap(),
        );
        let server = serve_jwks(old.jwks_json()).await;
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "s3cret\n").unwrap();
        let source = |url: &str, ca: &str, bearer: Option<PathBuf>| JwksSource::Url {
            url: url.to_string(),
            ca_pem: Some(ca.as_bytes().to_vec()),
            bearer_token_file: bearer,
        };

        let v = JwksValidator::load(
            ISS,
            source(&server.url, &server.ca_pem, Some(token_file.clone())),
        )
        .await
        .unwrap()
        .with_min_refresh_interval(Duration::ZERO);
        assert!(accepts(&v, &old).await);
        *server.jwks.lock().unwrap() = new.jwks_json();
        assert!(accepts(&v, &new).await, "fetched on unknown kid");
        assert_eq!(server.hits.load(Ordering::SeqCst), 2);

        let unauthenticated =
            JwksValidator::load(ISS, source(&server.url, &server.ca_pem, None)).await;
        assert!(
            matches!(&unauthenticated, Err(JwksError::Fetch { reason, .. }) if reason.contains("401")),
            "{unauthenticated:?}"
        );
        let other_ca = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
            .unwrap()
            .cert
            .pem();
        let untrusted = JwksValidator::load(
            ISS,
            source(&server.url, &other_ca, Some(token_file.clone())),
        )
        .await;
        assert!(
            matches!(&untrusted, Err(JwksError::Fetch { reason, .. }) if reason.contains("certificate")),
            "{untrusted:?}"
        );
        let plain =
            JwksValidator::load(ISS, source("http://127.0.0.1:1/jwks", &server.ca_pem, None)).await;
        assert!(matches!(plain, Err(JwksError::Config(_))));
        let no_ca = JwksValidator::load(ISS, source(&server.url, "not a pem", None)).await;
        assert!(matches!(no_ca, Err(JwksError::Config(_))));
    }
}
