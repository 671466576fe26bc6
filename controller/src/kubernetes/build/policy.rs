//! Inbound policy from the CRDs: mTLS modes (`MeshTLS`, the namespace annotation, the mesh
//! default), authorization rules (`AuthorizationPolicy`), and every declared port of each
//! workload. An object that cannot be used as written is used the narrow way: a bad rule is
//! dropped alone, a policy with no usable rule allows nobody, an unreadable mode is STRICT.

use super::super::crd::{
    AuthorizationPolicySpec, Kind, MeshTlsSpec, Object, Refusal, Scope, Verdict,
};
use crate::model::ports::Claims;
use crate::model::{self, AllowFile, Mtls};
use musubi_proto::policy::v1 as ppb;
use std::collections::{BTreeMap, BTreeSet};

/// (namespace, service account)
pub(super) type WorkloadKey = (String, String);
/// (namespace, service account, port)
pub(super) type PortKey = (String, String, u16);

/// Who sets the mTLS mode, most specific first.
#[derive(Debug, Default)]
pub(super) struct Modes {
    pub mesh: Mtls,
    pub namespace: BTreeMap<String, Mtls>,
    pub workload: BTreeMap<WorkloadKey, Mtls>,
    pub port: BTreeMap<PortKey, Mtls>,
    /// The `MeshTLS` watch has listed: without it, a mode could be STRICTer than known.
    pub known: bool,
}

impl Modes {
    /// The effective mode of `port` on workloads of `ns` running as `sa` (when known).
    pub fn of(&self, ns: &str, sa: Option<&str>, port: u16) -> Mtls {
        sa.and_then(|sa| {
            let (ns, sa) = (ns.to_string(), sa.to_string());
            self.port
                .get(&(ns.clone(), sa.clone(), port))
                .or_else(|| self.workload.get(&(ns, sa)))
        })
        .or_else(|| self.namespace.get(ns))
        .copied()
        .unwrap_or(self.mesh)
    }

    /// Whether clients may reach an endpoint without identity there in plaintext.
    pub fn plaintext_allowed(&self, ns: &str, sa: Option<&str>, port: u16) -> bool {
        self.known && self.of(ns, sa, port) == Mtls::Permissive
    }
}

/// Two objects set one scope: STRICT wins (the order objects come in does not matter).
fn set(map_entry: Option<&mut Mtls>, mode: Mtls) -> Option<Mtls> {
    match map_entry {
        Some(m) => {
            if mode == Mtls::Strict {
                *m = Mtls::Strict;
            }
            None
        }
        None => Some(mode),
    }
}

/// Modes from the namespace annotations (`annotated`) and the `MeshTLS` objects, when listed.
pub(super) fn modes(
    mesh: Mtls,
    annotated: BTreeMap<String, Mtls>,
    objects: Option<&[Object]>,
    problems: &mut Vec<String>,
    verdicts: &mut Vec<Verdict>,
) -> Modes {
    let mut m = Modes {
        mesh,
        namespace: annotated,
        known: objects.is_some(),
        ..Modes::default()
    };
    let mut namespace_wide: BTreeMap<String, Mtls> = BTreeMap::new();
    for o in objects.unwrap_or_default() {
        let what = format!("MeshTLS {}/{}", o.namespace, o.name);
        let (mode, scope, refused) = match serde_json::from_value::<MeshTlsSpec>(o.spec.clone()) {
            Ok(spec) => (
                spec.mode,
                Scope {
                    service_account: spec.service_account,
                    ports: spec.ports,
                },
                None,
            ),
            Err(e) => match serde_json::from_value::<Scope>(o.spec.clone()) {
                Ok(scope) => (
                    Mtls::Strict,
                    scope,
                    Some(format!("the spec does not decode ({e}); applied as STRICT")),
                ),
                Err(_) => {
                    let msg = format!("the spec does not decode ({e}); ignored");
                    problems.push(format!("{what}: {msg}"));
                    verdicts.push(Verdict::new(
                        Kind::MeshTls,
                        o,
                        Some((Refusal::InvalidSpec, msg)),
                    ));
                    continue;
                }
            },
        };
        let mut refused = refused;
        match (&scope.service_account, scope.ports.is_empty()) {
            (None, true) => {
                if let Some(v) = set(namespace_wide.get_mut(&o.namespace), mode) {
                    namespace_wide.insert(o.namespace.clone(), v);
                }
            }
            (None, false) => {
                refused = Some("ports need a serviceAccount; ignored".to_string());
            }
            (Some(sa), true) => {
                let key = (o.namespace.clone(), sa.clone());
                if let Some(v) = set(m.workload.get_mut(&key), mode) {
                    m.workload.insert(key, v);
                }
            }
            (Some(sa), false) => {
                for p in &scope.ports {
                    let key = (o.namespace.clone(), sa.clone(), *p);
                    if let Some(v) = set(m.port.get_mut(&key), mode) {
                        m.port.insert(key, v);
                    }
                }
            }
        }
        if let Some(msg) = &refused {
            problems.push(format!("{what}: {msg}"));
        }
        verdicts.push(Verdict::new(
            Kind::MeshTls,
            o,
            refused.map(|msg| (Refusal::InvalidSpec, msg)),
        ));
    }
    // A namespace-wide MeshTLS wins over the namespace's annotation.
    m.namespace.extend(namespace_wide);
    m
}

/// The allow rules of every `AuthorizationPolicy`, per port they name. A port with an entry
/// (even an empty one) allows only what its rules allow.
pub(super) fn rules(
    objects: &[Object],
    problems: &mut Vec<String>,
    verdicts: &mut Vec<Verdict>,
) -> BTreeMap<PortKey, Vec<ppb::AuthorizationRule>> {
    let mut out: BTreeMap<PortKey, Vec<ppb::AuthorizationRule>> = BTreeMap::new();
    for o in objects {
        let what = format!("AuthorizationPolicy {}/{}", o.namespace, o.name);
        let (sa, ports, good, refused) = match serde_json::from_value::<AuthorizationPolicySpec>(
            o.spec.clone(),
        ) {
            Ok(spec) => {
                let (good, bad) = allow_rules(&spec.allow);
                let refused = (!bad.is_empty()).then(|| {
                    let dropped = if good.is_empty() {
                        format!(
                            "no rule is usable, so the policy allows nobody on ports {}",
                            port_list(&spec.ports)
                        )
                    } else {
                        "those rules are dropped; the others apply".to_string()
                    };
                    (
                        Refusal::InvalidRules,
                        format!("{}; {dropped}", bad.join("; ")),
                    )
                });
                (spec.service_account, spec.ports, good, refused)
            }
            Err(e) => match serde_json::from_value::<Scope>(o.spec.clone()) {
                Ok(Scope {
                    service_account: Some(sa),
                    ports,
                }) => {
                    let msg = format!(
                        "the spec does not decode ({e}); it allows nobody on ports {}",
                        port_list(&ports)
                    );
                    (sa, ports, vec![], Some((Refusal::InvalidSpec, msg)))
                }
                _ => {
                    let msg = format!(
                        "the spec does not decode ({e}) and names no serviceAccount and ports; ignored"
                    );
                    problems.push(format!("{what}: {msg}"));
                    verdicts.push(Verdict::new(
                        Kind::AuthorizationPolicy,
                        o,
                        Some((Refusal::InvalidSpec, msg)),
                    ));
                    continue;
                }
            },
        };
        for p in &ports {
            out.entry((o.namespace.clone(), sa.clone(), *p))
                .or_default()
                .extend(good.iter().cloned());
        }
        if let Some((_, msg)) = &refused {
            problems.push(format!("{what}: {msg}"));
        }
        verdicts.push(Verdict::new(Kind::AuthorizationPolicy, o, refused));
    }
    out
}

/// The usable rules, and a line for each one dropped (`allow[i]...: problem`).
fn allow_rules(allow: &[serde_json::Value]) -> (Vec<ppb::AuthorizationRule>, Vec<String>) {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for (i, r) in allow.iter().enumerate() {
        let path = format!("allow[{i}]");
        let parsed = serde_json::from_value::<AllowFile>(r.clone())
            .map_err(|e| format!("{path}: {e}"))
            .and_then(|a| model::rule(&a, &path).map_err(|e| e.to_string()));
        match parsed {
            Ok(rule) => good.push(rule),
            Err(e) => bad.push(e),
        }
    }
    (good, bad)
}

fn port_list(ports: &[u16]) -> String {
    if ports.is_empty() {
        return "(none)".into();
    }
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every declared port of every workload with its policy: the ports Services target on the
/// workload's pods (`targeted`, with what each source says they speak), and the ports policy
/// objects name (what the workload's pods' opaque-ports annotations say, else DETECT:
/// `pod_claims`). Each port has its effective mode and, where policies name it, their rules.
pub(super) fn workloads(
    modes: &Modes,
    rules: &BTreeMap<PortKey, Vec<ppb::AuthorizationRule>>,
    targeted: &BTreeMap<PortKey, Claims>,
    pod_claims: impl Fn(&str, &str, u16) -> Claims,
    problems: &mut Vec<String>,
) -> BTreeMap<WorkloadKey, Vec<ppb::PortPolicy>> {
    let keys: BTreeSet<&PortKey> = modes
        .port
        .keys()
        .chain(rules.keys())
        .chain(targeted.keys())
        .collect();
    let mut out: BTreeMap<WorkloadKey, Vec<ppb::PortPolicy>> = BTreeMap::new();
    for key in keys {
        let (ns, sa, port) = key;
        let decided = match targeted.get(key) {
            Some(claims) => claims.decide(),
            None => pod_claims(ns, sa, *port).decide(),
        };
        if let Some(c) = decided.conflict {
            problems.push(format!("port {port} of workload {ns}/{sa}: {c}"));
        }
        out.entry((ns.clone(), sa.clone()))
            .or_default()
            .push(ppb::PortPolicy {
                port: u32::from(*port),
                mtls: model::mtls_pb(modes.of(ns, Some(sa), *port)),
                authorization: rules
                    .get(key)
                    .map(|r| ppb::Authorization { rules: r.clone() }),
                protocol: decided.protocol as i32,
                authorities: vec![],
            });
    }
    out
}
