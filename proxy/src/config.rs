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
/// Connections the inbound listener holds at once; more are closed on accept.
pub const INBOUND_MAX_CONNECTIONS: &str = "MUSUBI_PROXY_INBOUND_MAX_CONNECTIONS";
/// Connections the outbound listener(s) hold at once.
pub const OUTBOUND_MAX_CONNECTIONS: &str = "MUSUBI_PROXY_OUTBOUND_MAX_CONNECTIONS";
/// How long an inbound HTTP/1 client may take to send a request's head (slowloris bound).
pub const HEADER_READ_TIMEOUT: &str = "MUSUBI_PROXY_HEADER_READ_TIMEOUT";
/// Largest request head accepted (HTTP/1 read buffer, HTTP/2 header list), bytes.
pub const MAX_HEADER_BYTES: &str = "MUSUBI_PROXY_MAX_HEADER_BYTES";
/// Concurrent streams a peer may open on one inbound HTTP/2 connection.
pub const H2_MAX_CONCURRENT_STREAMS: &str = "MUSUBI_PROXY_H2_MAX_CONCURRENT_STREAMS";
/// Destinations watched through the controller at once (least recently used ones go first).
pub const MAX_DESTINATIONS: &str = "MUSUBI_PROXY_MAX_DESTINATIONS";
/// A destination not used for this long stops being watched.
pub const DESTINATION_IDLE_TIMEOUT: &str = "MUSUBI_PROXY_DESTINATION_IDLE_TIMEOUT";

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
    pub limits: Limits,
}

/// Bounds on what remote parties can make the proxy hold (docs/security.md lists them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub inbound_connections: usize,
    pub outbound_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub h2_max_concurrent_streams: u32,
    pub max_destinations: usize,
    pub destination_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            inbound_connections: 4096,
            outbound_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            h2_max_concurrent_streams: 2000,
            max_destinations: 1000,
            destination_idle: Duration::from_secs(600),
        }
    }
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

fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy>(
    src: &dyn Source,
    key: &'static str,
    default: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<T, ConfigError> {
    match src.get(key) {
        None => Ok(default),
        Some(v) => match v.parse::<T>() {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => Err(err(
                key,
                format!("{v:?}: expected {}-{}", range.start(), range.end()),
            )),
        },
    }
}

fn limits(src: &dyn Source) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let timeout = duration(src, HEADER_READ_TIMEOUT, d.header_read_timeout)?;
    if timeout.is_zero() {
        return Err(err(HEADER_READ_TIMEOUT, "must be more than 0"));
    }
    Ok(Limits {
        inbound_connections: number(
            src,
            INBOUND_MAX_CONNECTIONS,
            d.inbound_connections,
            1..=1_000_000,
        )?,
        outbound_connections: number(
            src,
            OUTBOUND_MAX_CONNECTIONS,
            d.outbound_connections,
            1..=1_000_000,
        )?,
        header_read_timeout: timeout,
        max_header_bytes: number(src, MAX_HEADER_BYTES, d.max_header_bytes, 8192..=1 << 20)?,
        h2_max_concurrent_streams: number(
            src,
            H2_MAX_CONCURRENT_STREAMS,
            d.h2_max_concurrent_streams,
            1..=100_000,
        )?,
        max_destinations: number(src, MAX_DESTINATIONS, d.max_destinations, 1..=100_000)?,
        destination_idle: duration(src, DESTINATION_IDLE_TIMEOUT, d.destination_idle)?,
    })
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
            inbound: addr(src, INBOUND_LISTEN, "[::]:4143")?,
            outbound: addr(src, OUTBOUND_LISTEN, "127.0.0.1:4140")?,
            admin: addr(src, ADMIN_LISTEN, "[::]:4191")?,
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
            workers: number(src, WORKERS, 1, 1..=64)?,
            limits: limits(src)?,
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
        assert_eq!(c.limits, Limits::default());
        let mut m = base();
        m.insert(INBOUND_MAX_CONNECTIONS, "10");
        m.insert(HEADER_READ_TIMEOUT, "2s");
        let c = Config::from_source(&m).unwrap();
        assert_eq!(c.limits.inbound_connections, 10);
        assert_eq!(c.limits.header_read_timeout, Duration::from_secs(2));
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
            (INBOUND_MAX_CONNECTIONS, "0", "expected 1-1000000"),
            (MAX_HEADER_BYTES, "100", "expected 8192-"),
            (HEADER_READ_TIMEOUT, "0s", "more than 0"),
            (H2_MAX_CONCURRENT_STREAMS, "-1", "expected 1-100000"),
            (MAX_DESTINATIONS, "lots", "expected 1-100000"),
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
