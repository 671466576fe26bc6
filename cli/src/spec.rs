//! The `musubi up -f mesh.yaml` file: the user's services, each a command with a port and a
//! service account. Parsing and validation are plain functions.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpFile {
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub services: Vec<UpService>,
    /// Gateway API-shaped routes and Musubi FaultInjections, as in the controller's mesh file
    /// (docs/mesh-file.md); `namespace` defaults to the file's. Passed to the controller as is.
    #[serde(default)]
    pub routes: Vec<serde_yaml::Value>,
    #[serde(default)]
    pub fault_injections: Vec<serde_yaml::Value>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpService {
    pub name: String,
    /// Run with `sh -c`; `$PORT` is the port to listen on (127.0.0.1).
    pub command: String,
    /// The port other services address it by (`<name>.<namespace>:<port>`).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Defaults to the service name.
    pub service_account: Option<String>,
    /// `http` (default), `grpc`/`http2`, or `opaque`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Reachable from outside the mesh (plaintext accepted on its inbound proxy).
    #[serde(default)]
    pub expose: bool,
    /// SPIFFE IDs or `ns:<namespace>` allowed to call it; absent: any mesh identity.
    pub allow: Option<Vec<String>>,
}

fn default_namespace() -> String {
    "default".into()
}
fn default_port() -> u16 {
    80
}
fn default_protocol() -> String {
    "http".into()
}

impl UpService {
    pub fn service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or(&self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{0}")]
    Yaml(String),
    #[error("services[{index}] ({name}): {problem}")]
    Service {
        index: usize,
        name: String,
        problem: String,
    },
    #[error("no services")]
    Empty,
}

pub fn parse(text: &str) -> Result<UpFile, SpecError> {
    let file: UpFile = serde_yaml::from_str(text).map_err(|e| SpecError::Yaml(e.to_string()))?;
    if file.services.is_empty() {
        return Err(SpecError::Empty);
    }
    let mut seen = std::collections::HashSet::new();
    for (index, s) in file.services.iter().enumerate() {
        let bad = |problem: String| SpecError::Service {
            index,
            name: s.name.clone(),
            problem,
        };
        let td =
            musubi_identity::TrustDomain::new("cluster.local").map_err(|e| bad(e.to_string()))?;
        musubi_identity::SpiffeId::workload(&td, &file.namespace, s.service_account())
            .map_err(|e| bad(e.to_string()))?;
        musubi_identity::SpiffeId::workload(&td, &file.namespace, &s.name)
            .map_err(|e| bad(format!("name: {e}")))?;
        if !seen.insert(s.name.clone()) {
            return Err(bad("duplicate service name".into()));
        }
        if s.port == 0 {
            return Err(bad("port must be 1-65535".into()));
        }
        if !["http", "grpc", "http2", "opaque"].contains(&s.protocol.as_str()) {
            return Err(bad(format!(
                "protocol {:?}: expected http, grpc, http2 or opaque",
                s.protocol
            )));
        }
        if s.command.trim().is_empty() {
            return Err(bad("command is empty".into()));
        }
    }
    Ok(file)
}

/// The demo mesh: web → api → store.
pub fn demo(exe: &str) -> UpFile {
    let svc = |name: &str,
               app: &str,
               port: u16,
               protocol: &str,
               expose: bool,
               allow: Option<Vec<String>>| UpService {
        name: name.into(),
        command: format!("'{exe}' demo {app}"),
        port,
        service_account: None,
        protocol: protocol.into(),
        expose,
        allow,
    };
    UpFile {
        routes: vec![],
        fault_injections: vec![],
        namespace: "demo".into(),
        services: vec![
            svc("web", "web", 80, "http", true, None),
            svc(
                "api",
                "api",
                80,
                "http",
                false,
                Some(vec!["spiffe://cluster.local/ns/demo/sa/web".into()]),
            ),
            svc(
                "store",
                "store",
                9090,
                "grpc",
                false,
                Some(vec!["spiffe://cluster.local/ns/demo/sa/api".into()]),
            ),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let ok = "services:\n  - name: web\n    command: python3 -m http.server $PORT\n    expose: true\n";
        let f = parse(ok).unwrap();
        assert_eq!(f.namespace, "default");
        assert_eq!(f.services[0].port, 80);
        assert_eq!(f.services[0].service_account(), "web");
        let cases = [
            ("services: []", "no services"),
            (
                "services:\n  - name: Web\n    command: x\n",
                "services[0] (Web)",
            ),
            (
                "services:\n  - name: a\n    command: x\n  - name: a\n    command: y\n",
                "duplicate",
            ),
            (
                "services:\n  - name: a\n    command: x\n    port: 0\n",
                "port must be",
            ),
            (
                "services:\n  - name: a\n    command: x\n    protocol: ftp\n",
                "protocol",
            ),
            (
                "services:\n  - name: a\n    command: ' '\n",
                "command is empty",
            ),
            ("services:\n  - name: a\n    comand: x\n", "unknown field"),
            ("services:\n  - name: a\n    command: [x\n", "line"),
        ];
        for (text, says) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }
}
