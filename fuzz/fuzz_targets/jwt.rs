//! Service-account tokens and the issuer's key set (JWKS). The first byte picks what the rest
//! is: a bearer token as a workload sends it, the header and claims of a token this target
//! signs with a trusted key (so the claim checks behind the signature are reached), or a JWKS
//! document as the API server (or a key file) serves it.
#![no_main]

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use musubi_fuzz::{ready, split_nul};
use musubi_identity::token::jwks::{JwksValidator, KeySet};
use musubi_identity::token::{self, AUDIENCE};
use std::sync::LazyLock;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const KID: &str = "fuzz-key";

/// A signing key and a validator that trusts it (and only it).
struct Trusted {
    key: EcdsaKeyPair,
    validator: JwksValidator,
}

static TRUSTED: LazyLock<Trusted> = LazyLock::new(|| {
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("a P-256 key");
    // Uncompressed SEC1 point: 0x04 || x || y.
    let point = key.public_key().as_ref();
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": KID, "use": "sig", "alg": "ES256",
        "x": b64(&point[1..33]), "y": b64(&point[33..65]),
    }]});
    let validator = JwksValidator::from_json(ISSUER, jwks.to_string().as_bytes())
        .expect("the target's own key set loads");
    Trusted { key, validator }
});

/// Claims a validator accepts (until 2100), for tokens checked against a fuzzed key set.
static GOOD_CLAIMS: LazyLock<String> = LazyLock::new(|| {
    serde_json::json!({
        "iss": ISSUER, "aud": [AUDIENCE], "sub": "system:serviceaccount:shop:web",
        "iat": 1_700_000_000, "nbf": 1_700_000_000, "exp": 4_102_444_800_i64,
        "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "web", "uid": "u-1"}},
    })
    .to_string()
});

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `header.claims.signature`, signed with the trusted key whatever the header says.
fn signed(header: &[u8], claims: &[u8]) -> String {
    let message = format!("{}.{}", b64(header), b64(claims));
    let signature = TRUSTED
        .key
        .sign(&SystemRandom::new(), message.as_bytes())
        .expect("ECDSA signing");
    format!("{message}.{}", b64(signature.as_ref()))
}

fn header(alg: &str, kid: Option<&str>) -> Vec<u8> {
    let mut h = serde_json::json!({ "alg": alg, "typ": "JWT" });
    if let Some(kid) = kid {
        h["kid"] = kid.into();
    }
    h.to_string().into_bytes()
}

fn validate(validator: &JwksValidator, token: &str) {
    match ready(validator.validate_token(token)) {
        Ok(w) => {
            let name_ok = |s: &str| !s.is_empty() && !s.contains([':', '/']);
            assert!(
                name_ok(&w.namespace) && name_ok(&w.service_account),
                "{w:?}"
            );
        }
        Err(e) => {
            let _ = (e.reason(), e.to_string());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => bearer_token(rest),
        1 => signed_claims(rest),
        _ => key_set(rest),
    }
});

fn bearer_token(rest: &[u8]) {
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let _ = token::precheck(text);
    let _ = token::parse_sa_username(text);
    validate(&TRUSTED.validator, text);
}

fn signed_claims(rest: &[u8]) {
    let default_header = header("ES256", Some(KID));
    let (header, claims) = split_nul(rest).unwrap_or((&default_header, rest));
    validate(&TRUSTED.validator, &signed(header, claims));
}

fn key_set(rest: &[u8]) {
    if let Ok(keys) = KeySet::parse(rest) {
        assert!(!keys.is_empty(), "a parsed key set has a usable key");
        assert!(keys.key_ids().len() <= keys.len());
    }
    let Ok(validator) = JwksValidator::from_json(ISSUER, rest) else {
        return;
    };
    let ids = validator.key_ids();
    let kids = ids.iter().take(2).map(|k| Some(k.as_str())).chain([None]);
    // A 2048-bit-sized RS256 signature that is not one: verifying it exercises the fuzzed
    // RSA key; the ES256 token is really signed, by a key the fuzzed set does not hold.
    let rsa_signature = b64(&[0x5a; 256]);
    for kid in kids {
        validate(
            &validator,
            &signed(&header("ES256", kid), GOOD_CLAIMS.as_bytes()),
        );
        let unsigned = format!(
            "{}.{}.{rsa_signature}",
            b64(&header("RS256", kid)),
            b64(GOOD_CLAIMS.as_bytes())
        );
        validate(&validator, &unsigned);
    }
}
