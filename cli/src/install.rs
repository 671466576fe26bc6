//! `musubi install`: prints the control plane's manifests (the Helm chart's objects, rendered
//! once with placeholders into `install/manifests.yaml` by `scripts/render-install.sh`), with
//! the certificates filled in: the user's trust anchor and issuer, or freshly generated ones.
//! `musubi install | kubectl apply --server-side -f -` installs Musubi into `musubi-system`.

use base64::Engine as _;
use musubi_identity::TrustDomain;
use musubi_identity::ca::{generate_issuer, generate_root, generate_serving_cert};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// The chart rendered with placeholders (regenerate with `scripts/render-install.sh`).
pub const MANIFESTS: &str = include_str!("install/manifests.yaml");
pub const NAMESPACE: &str = "musubi-system";

const ANCHORS: &str = "-----BEGIN CERTIFICATE----- MUSUBI_TRUST_ANCHORS_PEM";
const ISSUER_CRT: &str = "MUSUBI_ISSUER_CRT_PEM";
const ISSUER_KEY: &str = "MUSUBI_ISSUER_KEY_PEM";
const WEBHOOK_CRT: &str = "MUSUBI_WEBHOOK_CRT_PEM";
const WEBHOOK_KEY: &str = "MUSUBI_WEBHOOK_KEY_PEM";
const WEBHOOK_CA: &str = "MUSUBI_WEBHOOK_CA_PEM";

const DAY: Duration = Duration::from_secs(86400);

/// Every certificate the manifests carry.
pub struct Certs {
    pub anchors_pem: String,
    pub issuer_crt_pem: String,
    pub issuer_key_pem: String,
    pub webhook_ca_pem: String,
    pub webhook_crt_pem: String,
    pub webhook_key_pem: String,
}

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// Trust anchor certificate(s) (PEM). Without it, a new trust anchor and issuer are
    /// generated (the anchor's key is not kept: bring your own to rotate the issuer later).
    #[arg(long, requires_all = ["issuer_cert", "issuer_key"])]
    pub trust_anchors: Option<PathBuf>,
    /// Issuer certificate (PEM), signed by the trust anchor.
    #[arg(long, requires = "trust_anchors")]
    pub issuer_cert: Option<PathBuf>,
    /// Issuer private key (PEM).
    #[arg(long, requires = "trust_anchors")]
    pub issuer_key: Option<PathBuf>,
}

/// Fills the placeholders: base64 fields get base64 of the value; PEM blocks in text are
/// re-indented to where the placeholder stood.
pub fn render(c: &Certs) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let mut out = MANIFESTS.to_string();
    for (placeholder, value) in [
        (ISSUER_CRT, &c.issuer_crt_pem),
        (ISSUER_KEY, &c.issuer_key_pem),
        (WEBHOOK_CRT, &c.webhook_crt_pem),
        (WEBHOOK_KEY, &c.webhook_key_pem),
        (WEBHOOK_CA, &c.webhook_ca_pem),
    ] {
        out = out.replace(&b64(placeholder), &b64(value));
    }
    let mut text = String::with_capacity(out.len() + 4096);
    text.push_str(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n  labels:\n    app.kubernetes.io/part-of: musubi\n"
    ));
    for line in out.lines() {
        match line.find(ANCHORS) {
            Some(col) => {
                let indent = &line[..col];
                for pem_line in c.anchors_pem.trim().lines() {
                    text.push_str(indent);
                    text.push_str(pem_line);
                    text.push('\n');
                }
            }
            None => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    text
}

/// A new trust anchor (10 years), issuer (1 year) and webhook certificate (10 years).
pub fn generate(now: SystemTime) -> anyhow::Result<Certs> {
    let td = TrustDomain::new("cluster.local")?;
    let root = generate_root(&td, 3650 * DAY, now)?;
    let issuer = generate_issuer(&td, &root.cert_pem, &root.key_pem, 365 * DAY, now)?;
    let mut certs = webhook_only(now)?;
    certs.anchors_pem = root.cert_pem;
    certs.issuer_crt_pem = issuer.cert_pem;
    certs.issuer_key_pem = issuer.key_pem;
    Ok(certs)
}

fn webhook_only(now: SystemTime) -> anyhow::Result<Certs> {
    let svc = format!("musubi-injector.{NAMESPACE}.svc");
    let web = generate_serving_cert(&[svc], 3650 * DAY, now)?;
    Ok(Certs {
        anchors_pem: String::new(),
        issuer_crt_pem: String::new(),
        issuer_key_pem: String::new(),
        webhook_ca_pem: web.ca_pem,
        webhook_crt_pem: web.cert_pem,
        webhook_key_pem: web.key_pem,
    })
}

pub fn run(a: InstallArgs) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let certs = match (&a.trust_anchors, &a.issuer_cert, &a.issuer_key) {
        (Some(anchors), Some(crt), Some(key)) => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))
            };
            let mut c = webhook_only(now)?;
            c.anchors_pem = read(anchors)?;
            c.issuer_crt_pem = read(crt)?;
            c.issuer_key_pem = read(key)?;
            // Refuse what the identity service would refuse at start.
            let td = TrustDomain::new("cluster.local")?;
            let bundle = musubi_identity::TrustBundle::from_pem(td, c.anchors_pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("--trust-anchors: {e}"))?;
            musubi_identity::ca::Issuer::from_pem(
                c.issuer_crt_pem.as_bytes(),
                c.issuer_key_pem.as_bytes(),
                &bundle,
                now,
            )
            .map_err(|e| anyhow::anyhow!("--issuer-cert/--issuer-key: {e}"))?;
            c
        }
        _ => {
            eprintln!("musubi install: generated a new trust anchor and issuer");
            generate(now)?
        }
    };
    print!("{}", render(&certs));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_filled() {
        let certs = generate(SystemTime::now()).unwrap();
        let text = render(&certs);
        for p in [ANCHORS, "MUSUBI_", "TVVTVUJJ"] {
            assert!(!text.contains(p), "placeholder {p} left in the output");
        }
        let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .filter(|v: &serde_json::Value| !v.is_null())
            .collect();
        assert_eq!(docs[0]["kind"], "Namespace");
        let config = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
        let cfg =
            musubi_injector::InjectConfig::parse(config["data"]["config.yaml"].as_str().unwrap())
                .unwrap();
        assert_eq!(cfg.trust_anchors_pem.trim(), certs.anchors_pem.trim());
        assert_eq!(
            config["data"]["trust-anchors.pem"].as_str().unwrap().trim(),
            certs.anchors_pem.trim()
        );
        let issuer = docs
            .iter()
            .find(|d| d["kind"] == "Secret" && d["metadata"]["name"] == "musubi-identity-issuer")
            .unwrap();
        let crt = base64::engine::general_purpose::STANDARD
            .decode(issuer["data"]["tls.crt"].as_str().unwrap())
            .unwrap();
        assert_eq!(String::from_utf8(crt).unwrap(), certs.issuer_crt_pem);
    }
}
