//! `musubi check`: what is wrong with Musubi in a cluster. Each check is a finding (ok, warn,
//! fail); the verdicts on certificate lifetimes are pure functions of the certificate and now.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams};
use std::fmt;
use std::time::{Duration, SystemTime};

/// Certificates expiring within this window are warned about.
pub const WARN_WITHIN: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest wait for an answer through the API server's proxy (webhook, proxies' metrics).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Proxy certificates (24 h by default, renewed at ~70 %) are warned about within this window.
pub const PROXY_WARN_WITHIN: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub level: Level,
    pub what: String,
    pub detail: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.level {
            Level::Ok => "√",
            Level::Warn => "‼",
            Level::Fail => "×",
        };
        write!(f, "{mark} {}: {}", self.what, self.detail)
    }
}

fn finding(level: Level, what: impl Into<String>, detail: impl Into<String>) -> Finding {
    Finding {
        level,
        what: what.into(),
        detail: detail.into(),
    }
}

fn days(d: Duration) -> String {
    let h = d.as_secs() / 3600;
    if h >= 48 {
        format!("{} days", h / 24)
    } else {
        format!("{h} hours")
    }
}

/// Expired → fail; within `warn_within` → warn; else ok.
pub fn expiry(
    what: &str,
    not_after: SystemTime,
    now: SystemTime,
    warn_within: Duration,
) -> Finding {
    match not_after.duration_since(now) {
        Err(past) => finding(
            Level::Fail,
            what,
            format!("expired {} ago", days(past.duration())),
        ),
        Ok(left) if left < warn_within => {
            finding(Level::Warn, what, format!("expires in {}", days(left)))
        }
        Ok(left) => finding(Level::Ok, what, format!("valid for {}", days(left))),
    }
}

/// Expiry findings for every certificate in a PEM bundle.
pub fn pem_expiry(what: &str, pem: &[u8], now: SystemTime, warn_within: Duration) -> Vec<Finding> {
    let certs = match musubi_identity::pem::certs(pem) {
        Ok(c) if !c.is_empty() => c,
        Ok(_) => return vec![finding(Level::Fail, what, "holds no certificate")],
        Err(e) => return vec![finding(Level::Fail, what, format!("unreadable: {e}"))],
    };
    certs
        .iter()
        .enumerate()
        .map(|(i, der)| {
            let name = if certs.len() > 1 {
                format!("{what} #{}", i + 1)
            } else {
                what.to_string()
            };
            match musubi_identity::cert::validity(der) {
                Ok(v) => expiry(&name, v.not_after, now, warn_within),
                Err(e) => finding(Level::Fail, name, format!("unreadable: {e}")),
            }
        })
        .collect()
}

/// The lowest `musubi_proxy_certificate_expiry_seconds` sample in a metrics page.
pub fn proxy_expiry_seconds(metrics: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with("musubi_proxy_certificate_expiry_seconds"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(f64::min)
}

/// Runs every check against the cluster `client` reaches, for the control plane in `ns`.
pub async fn run(client: &kube::Client, ns: &str, now: SystemTime) -> Vec<Finding> {
    let mut out = Vec::new();
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for name in [
        "meshtls.policy.musubi.io",
        "authorizationpolicies.policy.musubi.io",
        "faultinjections.policy.musubi.io",
        "routepolicies.policy.musubi.io",
    ] {
        out.push(match crds.get_opt(name).await {
            Ok(Some(_)) => finding(Level::Ok, format!("CRD {name}"), "installed"),
            Ok(None) => finding(Level::Fail, format!("CRD {name}"), "not installed"),
            Err(e) => finding(Level::Fail, format!("CRD {name}"), e.to_string()),
        });
    }
    // Gateway API's routes: optional (without them services are not routed), so a warning.
    for name in [
        "httproutes.gateway.networking.k8s.io",
        "grpcroutes.gateway.networking.k8s.io",
    ] {
        out.push(match crds.get_opt(name).await {
            Ok(Some(crd)) => {
                let annotation = |k: &str| {
                    crd.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(k))
                        .cloned()
                        .unwrap_or_else(|| "?".into())
                };
                finding(
                    Level::Ok,
                    format!("CRD {name}"),
                    format!(
                        "installed (Gateway API {}, {} channel)",
                        annotation("gateway.networking.k8s.io/bundle-version"),
                        annotation("gateway.networking.k8s.io/channel")
                    ),
                )
            }
            Ok(None) => finding(
                Level::Warn,
                format!("CRD {name}"),
                "not installed: routes are not available (install Gateway API v1.6 standard, or the chart with gatewayAPI.installCRDs=true)",
            ),
            Err(e) => finding(Level::Fail, format!("CRD {name}"), e.to_string()),
        });
    }
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    for name in ["musubi-identity", "musubi-controller", "musubi-injector"] {
        let what = format!("deployment {ns}/{name}");
        out.push(match deployments.get_opt(name).await {
            Ok(Some(d)) => {
                let want = d.spec.replicas.unwrap_or(1);
                let have = d
                    .status
                    .as_ref()
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0);
                let level = if have == 0 {
                    Level::Fail
                } else if have < want {
                    Level::Warn
                } else {
                    Level::Ok
                };
                finding(level, what, format!("{have} of {want} replicas available"))
            }
            Ok(None) => finding(Level::Fail, what, "not found (is Musubi installed here?)"),
            Err(e) => finding(Level::Fail, what, e.to_string()),
        });
    }
    out.push(webhook(client, ns).await);
    let config = Api::<ConfigMap>::namespaced(client.clone(), ns);
    match config.get_opt("musubi-config").await {
        Ok(Some(cm)) => match cm.data.as_ref().and_then(|d| d.get("trust-anchors.pem")) {
            Some(pem) => out.extend(pem_expiry("trust anchor", pem.as_bytes(), now, WARN_WITHIN)),
            None => out.push(finding(
                Level::Fail,
                "trust anchor",
                "musubi-config has no trust-anchors.pem",
            )),
        },
        Ok(None) => out.push(finding(
            Level::Fail,
            "trust anchor",
            "ConfigMap musubi-config not found",
        )),
        Err(e) => out.push(finding(Level::Fail, "trust anchor", e.to_string())),
    }
    out.push(issuer(client, ns, &deployments, now).await);
    out.extend(proxies(client, ns).await);
    out
}

/// The webhook is registered and the API server can reach the injector through its Service.
async fn webhook(client: &kube::Client, ns: &str) -> Finding {
    let what = "injector webhook";
    let hooks = Api::<MutatingWebhookConfiguration>::all(client.clone());
    match hooks.get_opt("musubi-injector").await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return finding(
                Level::Fail,
                what,
                "MutatingWebhookConfiguration musubi-injector not found",
            );
        }
        Err(e) => return finding(Level::Fail, what, e.to_string()),
    }
    let path = format!("/api/v1/namespaces/{ns}/services/https:musubi-injector:443/proxy/ready");
    let req = match http::Request::get(path).body(Vec::new()) {
        Ok(r) => r,
        Err(e) => return finding(Level::Fail, what, e.to_string()),
    };
    match tokio::time::timeout(PROBE_TIMEOUT, client.request_text(req)).await {
        Ok(Ok(_)) => finding(Level::Ok, what, "registered and answering"),
        Ok(Err(e)) => finding(
            Level::Fail,
            what,
            format!("registered but not reachable: {e}"),
        ),
        Err(_) => finding(
            Level::Fail,
            what,
            format!("registered but no answer within {PROBE_TIMEOUT:?}"),
        ),
    }
}

/// The issuer certificate the identity service signs with.
async fn issuer(
    client: &kube::Client,
    ns: &str,
    deployments: &Api<Deployment>,
    now: SystemTime,
) -> Finding {
    let what = "issuer certificate";
    // The Secret the identity Deployment mounts (an existing Secret may be configured).
    let secret_name = deployments
        .get_opt("musubi-identity")
        .await
        .ok()
        .flatten()
        .and_then(|d| {
            d.spec.template.spec?.volumes?.into_iter().find_map(|v| {
                (v.name == "issuer")
                    .then_some(v.secret?.secret_name)
                    .flatten()
            })
        })
        .unwrap_or_else(|| "musubi-identity-issuer".to_string());
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    match secrets.get_opt(&secret_name).await {
        Ok(Some(s)) => match s.data.as_ref().and_then(|d| d.get("tls.crt")) {
            Some(crt) => pem_expiry(what, &crt.0, now, WARN_WITHIN)
                .into_iter()
                .max_by_key(|f| f.level)
                .unwrap_or_else(|| finding(Level::Fail, what, "no certificate")),
            None => finding(
                Level::Fail,
                what,
                format!("Secret {secret_name} has no tls.crt"),
            ),
        },
        Ok(None) => finding(Level::Fail, what, format!("Secret {secret_name} not found")),
        Err(e) => finding(Level::Fail, what, e.to_string()),
    }
}

/// Meshed pods' certificates, read from each proxy's metrics through the API server.
async fn proxies(client: &kube::Client, ns: &str) -> Vec<Finding> {
    let pods = Api::<Pod>::all(client.clone());
    let lp = ListParams::default().labels(&format!("musubi.io/control-plane-ns={ns}"));
    let list = match pods.list(&lp).await {
        Ok(l) => l,
        Err(e) => return vec![finding(Level::Fail, "meshed pods", e.to_string())],
    };
    let running: Vec<&Pod> = list
        .items
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .collect();
    let mut out = vec![finding(
        Level::Ok,
        "meshed pods",
        format!("{} found, {} running", list.items.len(), running.len()),
    )];
    for p in running {
        let (Some(pns), Some(name)) = (&p.metadata.namespace, &p.metadata.name) else {
            continue;
        };
        let what = format!("proxy certificate {pns}/{name}");
        let path = format!("/api/v1/namespaces/{pns}/pods/{name}:4191/proxy/metrics");
        let Ok(req) = http::Request::get(path).body(Vec::new()) else {
            continue;
        };
        let answer = tokio::time::timeout(PROBE_TIMEOUT, client.request_text(req)).await;
        match answer.unwrap_or_else(|_| Err(kube::Error::Service("no answer in time".into()))) {
            Ok(text) => match proxy_expiry_seconds(&text) {
                Some(left) if left <= 0.0 => out.push(finding(Level::Fail, what, "expired")),
                Some(left) if left < PROXY_WARN_WITHIN.as_secs_f64() => out.push(finding(
                    Level::Warn,
                    what,
                    format!("expires in {:.0} minutes (renewal failing?)", left / 60.0),
                )),
                Some(_) => {}
                None => out.push(finding(Level::Warn, what, "no certificate yet")),
            },
            Err(e) => out.push(finding(
                Level::Warn,
                what,
                format!("metrics unreachable: {e}"),
            )),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_verdicts() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let day = Duration::from_secs(86400);
        let cases = [
            (now - day, Level::Fail, "expired 24 hours ago"),
            (now - 3 * day, Level::Fail, "expired 3 days ago"),
            (now + 10 * day, Level::Warn, "expires in 10 days"),
            (now + 29 * day, Level::Warn, "expires in 29 days"),
            (now + 31 * day, Level::Ok, "valid for 31 days"),
            (now + 3650 * day, Level::Ok, "valid for 3650 days"),
        ];
        for (not_after, level, detail) in cases {
            let f = expiry("issuer", not_after, now, WARN_WITHIN);
            assert_eq!((f.level, f.detail.as_str()), (level, detail));
        }
    }

    #[test]
    fn unreadable_pem_fails() {
        let now = SystemTime::now();
        let f = pem_expiry("issuer", b"junk", now, WARN_WITHIN);
        assert_eq!(f[0].level, Level::Fail);
        assert!(f[0].detail.starts_with("unreadable"), "{}", f[0].detail);
    }

    #[test]
    fn proxy_expiry_from_metrics() {
        let text = "# HELP x\nmusubi_proxy_certificate_expiry_seconds 7200.5\nother 1\n";
        assert_eq!(proxy_expiry_seconds(text), Some(7200.5));
        assert_eq!(proxy_expiry_seconds("other 1\n"), None);
    }
}
