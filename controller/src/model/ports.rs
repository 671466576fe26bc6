//! Declared application ports: what the application speaks on each port of a workload, decided
//! from everything that says something about it (Services, the mesh file, the opaque-ports
//! annotation). The server's proxy forwards only to declared ports and lets raw bytes through
//! only to ports declared opaque, so when sources disagree the decision leans away from opaque.

use musubi_proto::discovery::v1 as dpb;
use musubi_proto::policy::v1 as ppb;
use std::collections::{BTreeMap, BTreeSet};

/// Pod annotation listing ports carried as opaque TCP (`25,3306,8000-8100`), as the injector
/// reads it (`musubi-injector`'s `annotations::OPAQUE_PORTS`; the injector reads it from the pod
/// only, never from its namespace, and so does the controller).
pub const OPAQUE_PORTS_ANNOTATION: &str = "musubi.io/opaque-ports";

/// Sources named in a conflict message, at most (the rest are counted).
const NAMED_SOURCES: usize = 3;

/// The policy's protocol for a service's protocol (the same four cases).
pub fn port_protocol(p: dpb::Protocol) -> ppb::PortProtocol {
    match p {
        dpb::Protocol::Detect => ppb::PortProtocol::Detect,
        dpb::Protocol::Http1 => ppb::PortProtocol::Http1,
        dpb::Protocol::Http2 => ppb::PortProtocol::Http2,
        dpb::Protocol::Opaque => ppb::PortProtocol::Opaque,
    }
}

pub fn protocol_name(p: ppb::PortProtocol) -> &'static str {
    match p {
        ppb::PortProtocol::Detect => "detect",
        ppb::PortProtocol::Http1 => "http",
        ppb::PortProtocol::Http2 => "http2",
        ppb::PortProtocol::Opaque => "opaque",
    }
}

/// What the sources say about one port: each protocol, with who says it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims(BTreeMap<ppb::PortProtocol, BTreeSet<String>>);

/// The decision for one port, and the conflict to report, if the sources disagreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    pub protocol: ppb::PortProtocol,
    pub conflict: Option<String>,
}

impl Claims {
    pub fn add(&mut self, protocol: ppb::PortProtocol, source: impl Into<String>) {
        self.0.entry(protocol).or_default().insert(source.into());
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// OPAQUE only when every source says OPAQUE (it is what lets raw bytes reach the app);
    /// otherwise the HTTP version the sources name, DETECT when they name both or none (requests
    /// still reach the app as HTTP, as the caller spoke them). Independent of the order the
    /// sources came in. Sources disagree when one says OPAQUE and another does not, or when
    /// both HTTP versions are named; DETECT next to a more precise claim is a refinement.
    pub fn decide(&self) -> Decided {
        use ppb::PortProtocol::{Detect, Http1, Http2, Opaque};
        let has = |p| self.0.contains_key(&p);
        let protocol = match (has(Http1), has(Http2)) {
            (true, false) => Http1,
            (false, true) => Http2,
            (true, true) => Detect,
            (false, false) if has(Opaque) && !has(Detect) => Opaque,
            (false, false) => Detect,
        };
        let disagree = (has(Opaque) && self.0.len() > 1) || (has(Http1) && has(Http2));
        let conflict = disagree.then(|| {
            let said: Vec<String> = self
                .0
                .iter()
                .map(|(p, sources)| {
                    let names: Vec<&str> = sources
                        .iter()
                        .take(NAMED_SOURCES)
                        .map(String::as_str)
                        .collect();
                    let more = sources.len().saturating_sub(NAMED_SOURCES);
                    let more = if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    };
                    format!("{} by {}{more}", protocol_name(*p), names.join(", "))
                })
                .collect();
            format!(
                "declared {}; served as {} (opaque only when every source says opaque)",
                said.join("; "),
                protocol_name(protocol)
            )
        });
        Decided { protocol, conflict }
    }
}

/// The ports of an opaque-ports annotation (`25,3306,8000-8100`); `Err` names the first entry
/// that is not a port or a range. The injector refuses pods with a bad value, so an error here
/// means a pod admitted before (or around) the injector.
pub fn opaque_ports(v: &str) -> Result<Vec<(u16, u16)>, String> {
    let port = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{s:?} is not a port (1-65535)"))
    };
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(format!("range {item:?} is backwards"));
                }
                out.push((lo, hi));
            }
            None => {
                let p = port(item)?;
                out.push((p, p));
            }
        }
    }
    Ok(out)
}

pub fn in_ranges(ranges: &[(u16, u16)], port: u16) -> bool {
    ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppb::PortProtocol::{Detect, Http1, Http2, Opaque};

    #[test]
    fn decide_table() {
        // (claims, decision, conflict reported)
        let cases: &[(&[ppb::PortProtocol], ppb::PortProtocol, bool)] = &[
            (&[], Detect, false),
            (&[Detect], Detect, false),
            (&[Http1], Http1, false),
            (&[Http2], Http2, false),
            (&[Opaque], Opaque, false),
            (&[Detect, Http1], Http1, false),
            (&[Detect, Http2], Http2, false),
            (&[Opaque, Detect], Detect, true),
            (&[Opaque, Http1], Http1, true),
            (&[Opaque, Http2], Http2, true),
            (&[Http1, Http2], Detect, true),
            (&[Opaque, Http1, Http2], Detect, true),
            (&[Opaque, Detect, Http1], Http1, true),
        ];
        for (claims, want, conflict) in cases {
            // Every order gives the same answer.
            for rotation in 0..claims.len().max(1) {
                let mut c = Claims::default();
                for (i, p) in claims
                    .iter()
                    .cycle()
                    .skip(rotation)
                    .take(claims.len())
                    .enumerate()
                {
                    c.add(*p, format!("source-{i}"));
                }
                let d = c.decide();
                assert_eq!(d.protocol, *want, "{claims:?} rotated {rotation}");
                assert_eq!(
                    d.conflict.is_some(),
                    *conflict,
                    "{claims:?}: {:?}",
                    d.conflict
                );
            }
        }
    }

    #[test]
    fn a_conflict_names_its_sources_boundedly() {
        let mut c = Claims::default();
        c.add(Opaque, "Service shop/db");
        for i in 0..5 {
            c.add(Http1, format!("Service shop/web-{i}"));
        }
        let msg = c.decide().conflict.unwrap();
        assert!(msg.contains("opaque by Service shop/db"), "{msg}");
        assert!(msg.contains("web-0") && msg.contains("and 2 more"), "{msg}");
        assert!(!msg.contains("web-4"), "{msg}");
        assert!(msg.contains("served as http"), "{msg}");
    }

    #[test]
    fn opaque_ports_table() {
        assert_eq!(
            opaque_ports("25, 3306,8000-8100"),
            Ok(vec![(25, 25), (3306, 3306), (8000, 8100)])
        );
        assert_eq!(opaque_ports(""), Ok(vec![]));
        for bad in ["x", "0", "9-1", "70000", "1-"] {
            assert!(opaque_ports(bad).is_err(), "{bad}");
        }
        let r = opaque_ports("25,8000-8100").unwrap();
        assert!(in_ranges(&r, 25) && in_ranges(&r, 8050) && !in_ranges(&r, 26));
    }
}
