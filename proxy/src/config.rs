//! The proxy's start-up configuration, read once from `MUSUBI_PROXY_*` environment variables
//! (injected by the webhook, or set by `musubi up`). Only this module reads the environment;
//! tests pass a map instead.

use musubi_identity::{SpiffeId, TrustDomain};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub const INBOUND_LISTEN: &str = "MUSUBI_PROXY_INBOUND_LISTEN";
pub const OUTBOUND_LISTEN: &str = "MUSUBI_PROXY_OUTBOUND_LISTEN";
pub const ADMIN_LISTEN: &str = "MUSUBI_PROXY_ADMIN_LISTEN";
/// `transparent` (iptables redirect, SO_ORIGINAL_DST) or `explicit` (no root).
pub const CAPTURE_MODE: &str = "MUSUBI_PROXY_CAPTURE_MODE";
/// Application ports served by this workload, comma-separated. In explicit mode the first is
/// where plaintext (PERMISSIVE) connections to the inbound listener go.
pub const APP_PORTS: &str = "MUSUBI_PROXY_APP_PORTS";
pub const TRUST_DOMAIN: &str = "MUSUBI_PROXY_TRUST_DOMAIN";
/// Path of the trust anchors (PEM); or give the PEM itself in [`TRUST_ANCHORS_PEM`].
pub const TRUST_ANCHORS: &str = "MUSUBI_PROXY_TRUST_ANCHORS";
/// The trust anchors as PEM text (what the injector sets); wins over [`TRUST_ANCHORS`].
pub const TRUST_ANCHORS_PEM: &str = "MUSUBI_PROXY_TRUST_ANCHORS_PEM";
pub const NAMESPACE: &str = "MUSUBI_PROXY_NAMESPACE";
pub const SERVICE_ACCOUNT: &str = "MUSUBI_PROXY_SERVICE_ACCOUNT";
pub const TOKEN_FILE: &str = "MUSUBI_PROXY_TOKEN_FILE";
pub const IDENTITY_ADDR: &str = "MUSUBI_PROXY_IDENTITY_ADDR";
/// Namespace of the identity service (its ID is `.../ns/<this>/sa/musubi-identity`).
pub const IDENTITY_NAMESPACE: &str = "MUSUBI_PROXY_IDENTITY_NAMESPACE";
pub const CONTROLLER_ADDR: &str = "MUSUBI_PROXY_CONTROLLER_ADDR";
/// SPIFFE ID the controller must present.
pub const CONTROLLER_IDENTITY: &str = "MUSUBI_PROXY_CONTROLLER_IDENTITY";
pub const OPAQUE_PORTS: &str = "MUSUBI_PROXY_OPAQUE_PORTS";
pub const DETECT_TIMEOUT: &str = "MUSUBI_PROXY_DETECT_TIMEOUT";
pub const DRAIN_TIMEOUT: &str = "MUSUBI_PROXY_DRAIN_TIMEOUT";
/// Runtime worker threads; 1 (the default, like one Envoy worker) runs everything on one
/// thread with no cross-thread wakeups.
pub const WORKERS: &str = "MUSUBI_PROXY_WORKERS";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureMode {
    Transparent,
    Explicit,
}

/// Where the trust anchors come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustAnchors {
    File(PathBuf),
    Pem(String),
}

impl TrustAnchors {
    /// The PEM bytes, and a name for messages.
    pub fn load(&self) -> Result<Vec<u8>, (String, String)> {
        match self {
            TrustAnchors::File(p) => {
                std::fs::read(p).map_err(|e| (p.display().to_string(), e.to_string()))
            }
            TrustAnchors::Pem(pem) => Ok(pem.clone().into_bytes()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            TrustAnchors::File(p) => p.display().to_string(),
            TrustAnchors::Pem(_) => TRUST_ANCHORS_PEM.to_string(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub mode: CaptureMode,
    pub app_ports: Vec<u16>,
    pub trust_domain: TrustDomain,
    pub trust_anchors: TrustAnchors,
    pub id: SpiffeId,
    pub token_file: PathBuf,
    pub identity_addr: String,
    pub identity_server: SpiffeId,
    /// `None`: no controller; every destination is passthrough and inbound policy is the
    /// default (STRICT, any authenticated client).
    pub controller: Option<(String, SpiffeId)>,
    pub opaque_ports: BTreeSet<u16>,
    pub detect_timeout: Duration,
    pub drain_timeout: Duration,
    pub workers: usize,
}

/// A bad configuration: the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: &'static str,
    pub problem: String,
}

/// Where configuration values come from.
pub trait Source {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct Env;

impl Source for Env {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

impl Source for HashMap<&str, &str> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key).map(|v| v.to_string())
    }
}

fn err(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key,
        problem: problem.into(),
    }
}

fn required(src: &dyn Source, key: &'static str) -> Result<String, ConfigError> {
    src.get(key).ok_or_else(|| err(key, "is required"))
}

fn addr(src: &dyn Source, key: &'static str, default: &str) -> Result<SocketAddr, ConfigError> {
    let v = src.get(key).unwrap_or_else(|| default.to_string());
    v.parse()
        .map_err(|_| err(key, format!("{v:?} is not an ip:port address")))
}

fn ports(src: &dyn Source, key: &'static str, default: &[u16]) -> Result<Vec<u16>, ConfigError> {
    let Some(v) = src.get(key) else {
        return Ok(default.to_vec());
    };
    v.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(err(key, format!("{p:?} is not a port (1-65535)"))),
        })
        .collect()
}

fn duration(
    src: &dyn Source,
    key: &'static str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match src.get(key) {
        None => Ok(default),
        Some(v) => humantime::parse_duration(&v).map_err(|e| err(key, format!("{v:?}: {e}"))),
    }
}

impl Config {
    pub fn from_source(src: &dyn Source) -> Result<Config, ConfigError> {
        let trust_domain = src
            .get(TRUST_DOMAIN)
            .unwrap_or_else(|| "cluster.local".into());
        let trust_domain =
            TrustDomain::new(&trust_domain).map_err(|e| err(TRUST_DOMAIN, e.to_string()))?;
        let namespace = required(src, NAMESPACE)?;
        let service_account = required(src, SERVICE_ACCOUNT)?;
        let id = SpiffeId::workload(&trust_domain, &namespace, &service_account)
            .map_err(|e| err(SERVICE_ACCOUNT, e.to_string()))?;
        let identity_ns = src
            .get(IDENTITY_NAMESPACE)
            .unwrap_or_else(|| "musubi-system".into());
        let identity_server = SpiffeId::workload(&trust_domain, &identity_ns, "musubi-identity")
            .map_err(|e| err(IDENTITY_NAMESPACE, e.to_string()))?;
        let mode = match src.get(CAPTURE_MODE).as_deref() {
            None | Some("transparent") => CaptureMode::Transparent,
            Some("explicit") => CaptureMode::Explicit,
            Some(other) => {
                return Err(err(
                    CAPTURE_MODE,
                    format!("{other:?}: expected transparent or explicit"),
                ));
            }
        };
        let app_ports = ports(src, APP_PORTS, &[])?;
        if mode == CaptureMode::Explicit && app_ports.is_empty() {
            return Err(err(
                APP_PORTS,
                "explicit mode needs at least one application port",
            ));
        }
        let controller = match src.get(CONTROLLER_ADDR) {
            None => None,
            Some(addr) => {
                let raw = required(src, CONTROLLER_IDENTITY)?;
                let cid =
                    SpiffeId::parse(&raw).map_err(|e| err(CONTROLLER_IDENTITY, e.to_string()))?;
                Some((addr, cid))
            }
        };
        let opaque: BTreeSet<u16> = ports(src, OPAQUE_PORTS, crate::detect::DEFAULT_OPAQUE_PORTS)?
            .into_iter()
            .collect();
        Ok(Config {
            inbound: addr(src, INBOUND_LISTEN, "0.0.0.0:4143")?,
            outbound: addr(src, OUTBOUND_LISTEN, "127.0.0.1:4140")?,
            admin: addr(src, ADMIN_LISTEN, "0.0.0.0:4191")?,
            mode,
            app_ports,
            trust_domain,
            trust_anchors: match src.get(TRUST_ANCHORS_PEM).filter(|p| !p.trim().is_empty()) {
                Some(pem) => TrustAnchors::Pem(pem),
                None => TrustAnchors::File(PathBuf::from(required(src, TRUST_ANCHORS)?)),
            },
            id,
            token_file: PathBuf::from(required(src, TOKEN_FILE)?),
            identity_addr: required(src, IDENTITY_ADDR)?,
            identity_server,
            controller,
            opaque_ports: opaque,
            detect_timeout: duration(src, DETECT_TIMEOUT, Duration::from_secs(5))?,
            drain_timeout: duration(src, DRAIN_TIMEOUT, Duration::from_secs(30))?,
            workers: match src.get(WORKERS) {
                None => 1,
                Some(v) => match v.parse::<usize>() {
                    Ok(n) if (1..=64).contains(&n) => n,
                    _ => return Err(err(WORKERS, format!("{v:?}: expected 1-64"))),
                },
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> HashMap<&'static str, &'static str> {
        HashMap::from([
            (NAMESPACE, "shop"),
            (SERVICE_ACCOUNT, "web"),
            (TRUST_ANCHORS, "/anchors.pem"),
            (TOKEN_FILE, "/token"),
            (IDENTITY_ADDR, "identity:8080"),
        ])
    }

    #[test]
    fn defaults() {
        let c = Config::from_source(&base()).unwrap();
        assert_eq!(c.inbound.port(), 4143);
        assert_eq!(c.outbound.to_string(), "127.0.0.1:4140");
        assert_eq!(c.admin.port(), 4191);
        assert_eq!(c.mode, CaptureMode::Transparent);
        assert_eq!(c.id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(
            c.identity_server.to_string(),
            "spiffe://cluster.local/ns/musubi-system/sa/musubi-identity"
        );
        assert!(c.opaque_ports.contains(&3306) && c.opaque_ports.contains(&6379));
        assert!(c.controller.is_none());
    }

    #[test]
    fn error_table() {
        let cases: Vec<(&str, &str, &str)> = vec![
            (INBOUND_LISTEN, "4143", "not an ip:port"),
            (CAPTURE_MODE, "magic", "transparent or explicit"),
            (APP_PORTS, "80,x", "not a port"),
            (APP_PORTS, "0", "not a port"),
            (OPAQUE_PORTS, "70000", "not a port"),
            (SERVICE_ACCOUNT, "Web_1", "service account"),
            (TRUST_DOMAIN, "a/b", "trust domain"),
            (DETECT_TIMEOUT, "soon", "soon"),
            (CONTROLLER_ADDR, "c:8090", "is required"),
            (WORKERS, "0", "expected 1-64"),
            (WORKERS, "many", "expected 1-64"),
        ];
        for (key, value, says) in cases {
            let mut m = base();
            m.insert(key, value);
            let e = Config::from_source(&m).unwrap_err();
            assert!(e.to_string().contains(says), "{key}={value}: {e}");
        }
        let mut m = base();
        m.insert(CAPTURE_MODE, "explicit");
        assert_eq!(Config::from_source(&m).unwrap_err().key, APP_PORTS);
        m.remove(NAMESPACE);
        assert_eq!(Config::from_source(&m).unwrap_err().key, NAMESPACE);
    }

    #[test]
    fn trust_anchors_from_a_file_or_inline() {
        let c = Config::from_source(&base()).unwrap();
        assert_eq!(c.trust_anchors, TrustAnchors::File("/anchors.pem".into()));
        let mut m = base();
        m.insert(TRUST_ANCHORS_PEM, "-----BEGIN CERTIFICATE-----");
        let c = Config::from_source(&m).unwrap();
        assert_eq!(
            c.trust_anchors.load().unwrap(),
            b"-----BEGIN CERTIFICATE-----"
        );
        m.remove(TRUST_ANCHORS);
        assert!(Config::from_source(&m).is_ok(), "the PEM alone is enough");
        m.insert(TRUST_ANCHORS_PEM, " ");
        assert_eq!(Config::from_source(&m).unwrap_err().key, TRUST_ANCHORS);
    }
}
