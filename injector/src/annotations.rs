//! The annotations users set to opt in or out and to tune the injected proxy, and their
//! validation. A bad value is refused with the annotation's name and what was wrong.

use crate::config::{InjectConfig, Resources};
use crate::patch::InjectError;
use std::collections::BTreeMap;

pub const INJECT: &str = "musubi.io/inject";
pub const ENABLED: &str = "enabled";
pub const DISABLED: &str = "disabled";
pub const SKIP_INBOUND_PORTS: &str = "musubi.io/skip-inbound-ports";
pub const SKIP_OUTBOUND_PORTS: &str = "musubi.io/skip-outbound-ports";
pub const SKIP_OUTBOUND_CIDRS: &str = "musubi.io/skip-outbound-cidrs";
pub const OPAQUE_PORTS: &str = "musubi.io/opaque-ports";
pub const PROXY_CPU_REQUEST: &str = "musubi.io/proxy-cpu-request";
pub const PROXY_CPU_LIMIT: &str = "musubi.io/proxy-cpu-limit";
pub const PROXY_MEMORY_REQUEST: &str = "musubi.io/proxy-memory-request";
pub const PROXY_MEMORY_LIMIT: &str = "musubi.io/proxy-memory-limit";
pub const PROXY_LOG_LEVEL: &str = "musubi.io/proxy-log-level";
/// Set by the injector on the pods it patched.
pub const PROXY_VERSION: &str = "musubi.io/proxy-version";
pub const INJECTED_BY: &str = "musubi.io/injected-by";
/// Label on meshed pods naming their control plane's namespace (select meshed pods with it).
pub const CONTROL_PLANE_NS_LABEL: &str = "musubi.io/control-plane-ns";

/// The pod's tuning of its proxy, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    pub skip_inbound_ports: Option<String>,
    pub skip_outbound_ports: Option<String>,
    pub skip_outbound_cidrs: Option<String>,
    pub opaque_ports: Option<String>,
    pub resources: Resources,
    pub log_level: String,
}

fn bad(key: &'static str, problem: impl Into<String>) -> InjectError {
    InjectError::Annotation {
        key,
        problem: problem.into(),
    }
}

/// Reads and checks the tuning annotations over the mesh's defaults.
pub fn tuning(a: &BTreeMap<String, String>, cfg: &InjectConfig) -> Result<Tuning, InjectError> {
    let get = |k: &str| a.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let ports = |k: &'static str| -> Result<Option<String>, InjectError> {
        get(k)
            .map(|v| port_list(v).map_err(|p| bad(k, p)))
            .transpose()
    };
    let mut resources = cfg.proxy.resources.clone();
    for (key, slot) in [
        (PROXY_CPU_REQUEST, &mut resources.cpu_request),
        (PROXY_CPU_LIMIT, &mut resources.cpu_limit),
        (PROXY_MEMORY_REQUEST, &mut resources.memory_request),
        (PROXY_MEMORY_LIMIT, &mut resources.memory_limit),
    ] {
        if let Some(v) = get(key) {
            quantity(v).map_err(|p| bad(key, p))?;
            *slot = v.to_string();
        }
    }
    let log_level = match get(PROXY_LOG_LEVEL) {
        None => cfg.proxy.log_level.clone(),
        Some(v) => {
            log_filter(v).map_err(|p| bad(PROXY_LOG_LEVEL, p))?;
            v.to_string()
        }
    };
    Ok(Tuning {
        skip_inbound_ports: ports(SKIP_INBOUND_PORTS)?,
        skip_outbound_ports: ports(SKIP_OUTBOUND_PORTS)?,
        skip_outbound_cidrs: get(SKIP_OUTBOUND_CIDRS)
            .map(|v| cidr_list(v).map_err(|p| bad(SKIP_OUTBOUND_CIDRS, p)))
            .transpose()?,
        opaque_ports: ports(OPAQUE_PORTS)?,
        resources,
        log_level,
    })
}

/// `25,3306,8000-8100` → the same text without spaces, each port 1-65535, ranges ordered.
pub fn port_list(v: &str) -> Result<String, String> {
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let port = |s: &str| -> Result<u16, String> {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{s:?} is not a port (1-65535)"))
        };
        match item.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(format!("range {item:?} is backwards"));
                }
                out.push(format!("{lo}-{hi}"));
            }
            None => out.push(port(item)?.to_string()),
        }
    }
    if out.is_empty() {
        return Err("no ports listed".into());
    }
    Ok(out.join(","))
}

/// `10.0.0.0/8,fd00::/8` → checked CIDRs, comma-separated.
pub fn cidr_list(v: &str) -> Result<String, String> {
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (ip, len) = item.split_once('/').unwrap_or((item, ""));
        let ip: std::net::IpAddr = ip
            .parse()
            .map_err(|_| format!("{item:?} is not an address or CIDR"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if !len.is_empty() && len.parse::<u8>().ok().filter(|l| *l <= max).is_none() {
            return Err(format!("{item:?} has a bad prefix length"));
        }
        out.push(item.to_string());
    }
    if out.is_empty() {
        return Err("no CIDRs listed".into());
    }
    Ok(out.join(","))
}

/// A Kubernetes resource quantity in the forms people write: `100m`, `0.5`, `64Mi`, `1G`.
pub fn quantity(v: &str) -> Result<(), String> {
    let digits_end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(digits_end);
    let num_ok = !num.is_empty() && num.parse::<f64>().is_ok_and(|n| n >= 0.0);
    const SUFFIXES: &[&str] = &[
        "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
    ];
    if num_ok && SUFFIXES.contains(&suffix) {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not a quantity (e.g. 100m, 0.5, 64Mi, 1Gi)"
        ))
    }
}

/// A log filter: a level, or `target=level` directives, in a safe character set.
pub fn log_filter(v: &str) -> Result<(), String> {
    let ok = v.len() <= 256
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_=,:.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not a log filter (e.g. info, debug, musubi_proxy=debug,info)"
        ))
    }
}
