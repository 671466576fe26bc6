//! What the injector puts into a pod besides the pod's own facts: the mesh's settings (trust
//! domain, trust anchors, where identity and the controller are) and the proxy's defaults.
//! Read from the chart's `musubi-config` ConfigMap (`config.yaml`), or built by `musubi inject`.

use serde::{Deserialize, Serialize};

/// Mesh-wide settings the patch needs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct InjectConfig {
    #[serde(default = "d_trust_domain")]
    pub trust_domain: String,
    /// Namespace of the control plane: never injected; identity and controller run there.
    #[serde(default = "d_cp_ns")]
    pub control_plane_namespace: String,
    /// PEM of the trust anchors the proxies verify peers against.
    pub trust_anchors_pem: String,
    /// `host:port` of the identity service (empty: derived from the namespace).
    #[serde(default)]
    pub identity_addr: String,
    /// `host:port` of the controller (empty: derived from the namespace).
    #[serde(default)]
    pub controller_addr: String,
    #[serde(default)]
    pub proxy: ProxyDefaults,
}

fn d_trust_domain() -> String {
    "cluster.local".into()
}
fn d_cp_ns() -> String {
    "musubi-system".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyDefaults {
    pub image: String,
    pub image_pull_policy: String,
    /// The proxy runs as this non-root UID; the iptables rules let its own traffic through.
    pub uid: u32,
    pub log_level: String,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    pub resources: Resources,
}

impl Default for ProxyDefaults {
    fn default() -> Self {
        ProxyDefaults {
            image: format!("ghcr.io/musubi-mesh/proxy:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            uid: 2102,
            log_level: "info".into(),
            inbound_port: 4143,
            outbound_port: 4140,
            admin_port: 4191,
            resources: Resources::default(),
        }
    }
}

/// Requests and limits; an empty string leaves that one unset.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Resources {
    pub cpu_request: String,
    pub cpu_limit: String,
    pub memory_request: String,
    pub memory_limit: String,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu_request: "100m".into(),
            cpu_limit: String::new(),
            memory_request: "20Mi".into(),
            memory_limit: "128Mi".into(),
        }
    }
}

impl InjectConfig {
    /// A configuration with every default and these anchors.
    pub fn with_anchors(trust_anchors_pem: String) -> Self {
        InjectConfig {
            trust_domain: d_trust_domain(),
            control_plane_namespace: d_cp_ns(),
            trust_anchors_pem,
            identity_addr: String::new(),
            controller_addr: String::new(),
            proxy: ProxyDefaults::default(),
        }
    }

    /// Parses `config.yaml` and checks what the patch relies on.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: InjectConfig = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        if !cfg
            .trust_anchors_pem
            .contains("-----BEGIN CERTIFICATE-----")
        {
            return Err("trustAnchorsPem holds no PEM certificate".into());
        }
        musubi_identity::TrustDomain::new(&cfg.trust_domain)
            .map_err(|e| format!("trustDomain: {e}"))?;
        if cfg.proxy.uid == 0 {
            return Err("proxy.uid must not be 0 (the proxy runs as non-root)".into());
        }
        Ok(cfg)
    }

    pub fn identity_addr(&self) -> String {
        if self.identity_addr.is_empty() {
            format!("musubi-identity.{}.svc:8080", self.control_plane_namespace)
        } else {
            self.identity_addr.clone()
        }
    }

    pub fn controller_addr(&self) -> String {
        if self.controller_addr.is_empty() {
            format!(
                "musubi-controller.{}.svc:8090",
                self.control_plane_namespace
            )
        } else {
            self.controller_addr.clone()
        }
    }

    pub fn controller_identity(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/musubi-controller",
            self.trust_domain, self.control_plane_namespace
        )
    }
}
