//! What a service-account token's verified claims prove: the `kubernetes.io` claim checked
//! against `sub`, `iss`, `aud`, `exp` and `nbf`. Plain functions over already-verified claims.

use super::jwks::quoted;
use super::{TokenError, parse_sa_username};
use crate::spiffe_id::Workload;
use serde::{Deserialize, Deserializer};

/// The claims of a service-account token that decide what it proves.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ServiceAccountClaims {
    iss: Option<String>,
    sub: Option<String>,
    aud: Option<Audience>,
    exp: Option<NumericDate>,
    nbf: Option<NumericDate>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaim>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct KubernetesClaim {
    namespace: Option<String>,
    serviceaccount: Option<ObjectRef>,
}

#[derive(Debug, Default, Deserialize)]
struct ObjectRef {
    name: Option<String>,
}

/// Seconds since the epoch; RFC 7519 allows fractions, which are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NumericDate(i64);

impl<'de> Deserialize<'de> for NumericDate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let secs = f64::deserialize(d)?;
        if !secs.is_finite() {
            return Err(serde::de::Error::custom("a date must be a finite number"));
        }
        // `as` saturates, which is what an absurd date deserves.
        Ok(NumericDate(secs.floor() as i64))
    }
}

/// What a token must say to be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClaimRules {
    pub(crate) issuer: String,
    pub(crate) audience: String,
    pub(crate) leeway_secs: i64,
}

/// Decides what a signature-checked service-account token proves, at `now` (Unix seconds).
///
/// The checks go in the order a reader would ask: who issued it, for whom, is it current, and
/// which service account it names. The `kubernetes.io` claim names the account; `sub`, when
/// present, must agree with it.
pub(crate) fn workload_from_claims(
    claims: &ServiceAccountClaims,
    rules: &ClaimRules,
    now: i64,
) -> Result<Workload, TokenError> {
    let iss = claims.iss.as_deref().unwrap_or_default();
    if iss != rules.issuer {
        return Err(TokenError::WrongIssuer {
            got: quoted(iss),
            expected: rules.issuer.clone(),
        });
    }
    let for_us = match &claims.aud {
        Some(Audience::One(aud)) => *aud == rules.audience,
        Some(Audience::Many(auds)) => auds.contains(&rules.audience),
        None => false,
    };
    if !for_us {
        return Err(TokenError::WrongAudience {
            expected: rules.audience.clone(),
        });
    }
    let Some(NumericDate(exp)) = claims.exp else {
        return Err(TokenError::Malformed("token has no exp claim".into()));
    };
    if now.saturating_sub(rules.leeway_secs) >= exp {
        return Err(TokenError::Expired);
    }
    if let Some(NumericDate(nbf)) = claims.nbf
        && nbf > now.saturating_add(rules.leeway_secs)
    {
        return Err(TokenError::NotYetValid);
    }
    let workload = claimed_workload(claims.kubernetes.as_ref())?;
    if let Some(sub) = &claims.sub {
        let subject = parse_sa_username(sub)?;
        if subject != workload {
            return Err(TokenError::NoServiceAccount(format!(
                "subject names {}/{} but the kubernetes.io claim names {}/{}",
                quoted(&subject.namespace),
                quoted(&subject.service_account),
                workload.namespace,
                workload.service_account
            )));
        }
    }
    Ok(workload)
}

fn claimed_workload(claim: Option<&KubernetesClaim>) -> Result<Workload, TokenError> {
    let claim = claim
        .ok_or_else(|| TokenError::NoServiceAccount("token has no kubernetes.io claim".into()))?;
    let namespace = claim.namespace.as_deref().unwrap_or_default();
    let service_account = claim
        .serviceaccount
        .as_ref()
        .and_then(|sa| sa.name.as_deref())
        .unwrap_or_default();
    let name_ok = |s: &str| !s.is_empty() && !s.contains(':') && !s.contains('/');
    if !name_ok(namespace) || !name_ok(service_account) {
        return Err(TokenError::NoServiceAccount(
            "kubernetes.io claim lacks a namespace or serviceaccount.name".into(),
        ));
    }
    Ok(Workload {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::token::AUDIENCE;
    use serde_json::{Map, Value, json};

    const ISS: &str = "https://issuer";
    const NOW: i64 = 1_700_000_000;

    fn rules() -> ClaimRules {
        ClaimRules {
            issuer: ISS.into(),
            audience: AUDIENCE.into(),
            leeway_secs: 30,
        }
    }

    /// What the API server puts in a projected token, edited.
    fn claims(edit: impl FnOnce(&mut Map<String, Value>)) -> Value {
        let mut claims = json!({
            "iss": ISS,
            "sub": "system:serviceaccount:shop:web",
            "aud": [AUDIENCE],
            "iat": NOW, "nbf": NOW, "exp": NOW + 600,
            "kubernetes.io": {"namespace": "shop", "serviceaccount": {"name": "web", "uid": "u-1"}},
        });
        if let Value::Object(fields) = &mut claims {
            edit(fields);
        }
        claims
    }

    fn set(name: &'static str, value: Value) -> impl FnOnce(&mut Map<String, Value>) {
        move |c| _ = c.insert(name.into(), value)
    }

    fn drop(name: &'static str) -> impl FnOnce(&mut Map<String, Value>) {
        move |c| _ = c.remove(name)
    }

    fn account(value: Value) -> impl FnOnce(&mut Map<String, Value>) {
        set("kubernetes.io", value)
    }

    type Outcome = Result<(&'static str, &'static str), &'static str>;

    #[test]
    fn claims_table() {
        let web = Ok(("shop", "web"));
        let no_sa = Err("token_no_service_account");
        #[rustfmt::skip]
        let cases: Vec<(&str, Value, Outcome)> = vec![
            ("kubernetes token", claims(|_| ()), web),
            ("aud as one string", claims(set("aud", json!(AUDIENCE))), web),
            ("ours among audiences", claims(set("aud", json!(["https://kubernetes.default.svc", AUDIENCE]))), web),
            ("no sub", claims(drop("sub")), web),
            ("fractional exp", claims(set("exp", json!(NOW as f64 + 0.5))), web),
            ("expired within leeway", claims(set("exp", json!(NOW - 29))), web),
            ("early within leeway", claims(set("nbf", json!(NOW + 30))), web),
            ("no nbf", claims(drop("nbf")), web),
            ("other issuer", claims(set("iss", json!("https://evil"))), Err("token_wrong_issuer")),
            ("no issuer", claims(drop("iss")), Err("token_wrong_issuer")),
            ("other audience", claims(set("aud", json!(["https://kubernetes.default.svc"]))), Err("token_wrong_audience")),
            ("empty audience", claims(set("aud", json!([]))), Err("token_wrong_audience")),
            ("no audience", claims(drop("aud")), Err("token_wrong_audience")),
            ("no exp", claims(drop("exp")), Err("token_malformed")),
            ("expired", claims(set("exp", json!(NOW - 30))), Err("token_expired")),
            ("not yet valid", claims(set("nbf", json!(NOW + 31))), Err("token_not_yet_valid")),
            ("no kubernetes.io claim", claims(drop("kubernetes.io")), no_sa),
            ("sub names another account", claims(set("sub", json!("system:serviceaccount:shop:admin"))), no_sa),
            ("sub names another namespace", claims(set("sub", json!("system:serviceaccount:bank:web"))), no_sa),
            ("sub is not a service account", claims(set("sub", json!("alice"))), no_sa),
            ("no namespace", claims(account(json!({"serviceaccount": {"name": "web"}}))), no_sa),
            ("no service account", claims(account(json!({"namespace": "shop"}))), no_sa),
            ("empty name", claims(account(json!({"namespace": "shop", "serviceaccount": {"name": ""}}))), no_sa),
            ("colon in a name", claims(account(json!({"namespace": "a:b", "serviceaccount": {"name": "web"}}))), no_sa),
        ];
        for (name, claims, want) in cases {
            let claims: ServiceAccountClaims = serde_json::from_value(claims).expect(name);
            let got = workload_from_claims(&claims, &rules(), NOW);
            let got = got
                .as_ref()
                .map(|w| (w.namespace.as_str(), w.service_account.as_str()));
            assert_eq!(got.map_err(|e| e.reason()), want, "{name}");
        }
    }

    #[test]
    fn claim_errors_say_what_differs() {
        let check =
            |c: Value| workload_from_claims(&serde_json::from_value(c).unwrap(), &rules(), NOW);
        let got = check(claims(set("iss", json!("https://evil\nline"))));
        let want = TokenError::WrongIssuer {
            got: "https://evil?line".into(),
            expected: ISS.into(),
        };
        assert_eq!(got, Err(want));
        let got = check(claims(set(
            "sub",
            json!("system:serviceaccount:shop:admin"),
        )));
        assert!(
            matches!(&got, Err(TokenError::NoServiceAccount(m)) if m.contains("shop/admin") && m.contains("shop/web")),
            "{got:?}"
        );
        assert_eq!(
            check(claims(drop("exp"))),
            Err(TokenError::Malformed("token has no exp claim".into()))
        );
        assert!(
            serde_json::from_value::<ServiceAccountClaims>(claims(set("exp", json!("soon"))))
                .is_err()
        );
    }
}
