//! The file source: one YAML mesh file, re-read when its content changes. A bad edit is
//! refused with the line and the reason, and the last good state keeps serving.

use crate::DiscoverySource;
use crate::model::{MeshFile, MeshState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {detail}")]
pub struct ConfigError {
    pub file: String,
    /// "line N: reason" where the line is known.
    pub detail: String,
}

fn line_of(text: &str, needle: &str) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// Parses and validates a mesh file's text.
pub fn parse(file: &str, text: &str) -> Result<MeshState, ConfigError> {
    parse_checked(file, text).map(|(state, _)| state)
}

/// Like [`parse`], with the problems that do not refuse the file (for the log).
pub fn parse_checked(file: &str, text: &str) -> Result<(MeshState, Vec<String>), ConfigError> {
    let err = |detail: String| ConfigError {
        file: file.to_string(),
        detail,
    };
    // An empty file is an empty mesh (with every default), not an error.
    let text_or_empty = if text.trim().is_empty() { "{}" } else { text };
    let parsed: MeshFile = {
        serde_yaml::from_str(text_or_empty).map_err(|e| match e.location() {
            Some(loc) => err(format!("line {}, column {}: {e}", loc.line(), loc.column())),
            None => err(e.to_string()),
        })?
    };
    let (state, warnings) = parsed
        .check()
        .map_err(|inv| match line_of(text, &inv.needle) {
            Some(line) => err(format!("line {line}: {inv}")),
            None => err(inv.to_string()),
        })?;
    let warnings = warnings
        .into_iter()
        .map(|w| format!("{file}: {w}"))
        .collect();
    Ok((state, warnings))
}

fn log_warnings(warnings: &[String]) {
    for w in warnings {
        tracing::warn!(problem = %w, "mesh file: decided the safe way");
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

pub struct FileSource {
    path: PathBuf,
    tx: watch::Sender<Arc<MeshState>>,
    last_text: tokio::sync::Mutex<String>,
    pub reloads: Family<ResultLabel, Counter>,
}

impl FileSource {
    /// Loads the file; a bad file at start is an error.
    pub fn load(path: &Path) -> Result<Arc<FileSource>, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.display().to_string(),
            detail: e.to_string(),
        })?;
        let (state, warnings) = parse_checked(&path.display().to_string(), &text)?;
        log_warnings(&warnings);
        Ok(Arc::new(FileSource {
            path: path.to_path_buf(),
            tx: watch::channel(Arc::new(state)).0,
            last_text: tokio::sync::Mutex::new(text),
            reloads: Family::default(),
        }))
    }

    /// Re-reads the file; returns the refusal, if the new content is bad.
    pub async fn poll(&self) -> Result<bool, ConfigError> {
        let file = self.path.display().to_string();
        let text = tokio::fs::read_to_string(&self.path)
            .await
            .map_err(|e| ConfigError {
                file: file.clone(),
                detail: e.to_string(),
            })?;
        let mut last = self.last_text.lock().await;
        if *last == text {
            return Ok(false);
        }
        *last = text.clone();
        match parse_checked(&file, &text) {
            Ok((state, warnings)) => {
                log_warnings(&warnings);
                self.reloads
                    .get_or_create(&ResultLabel { result: "ok" })
                    .inc();
                tracing::info!(%file, services = state.services.len(), "mesh file reloaded");
                self.tx.send_replace(Arc::new(state));
                Ok(true)
            }
            Err(e) => {
                self.reloads
                    .get_or_create(&ResultLabel { result: "refused" })
                    .inc();
                tracing::error!(error = %e, "REFUSED mesh file edit; still serving the last good version");
                Err(e)
            }
        }
    }

    /// Polls every `every` until dropped.
    pub fn spawn_watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let _ = me.poll().await;
            }
        })
    }
}

impl DiscoverySource for FileSource {
    fn state(&self) -> watch::Receiver<Arc<MeshState>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_line() {
        let cases = [
            (
                "services:\n  - name: api\n    namespace: shop\n    port: x\n",
                "line 4",
            ),
            (
                "services:\n  - name: api\n    namespace: shop\n    port: 80\n    endpoints:\n      - address: nope\n        port: 1\n",
                "line 6",
            ),
            (
                "services:\n  - name: api\n    namespace: shop\n    port: 80\n    endpoints:\n      - address: 127.0.0.1\n        port: 1\n        serviceAccount: Bad_SA\n",
                "line 8",
            ),
            ("mtls: MAYBE\n", "line 1"),
            ("servics: []\n", "unknown field"),
            (
                "services:\n  - name: api\n    namespace: shop\n    port: 80\n    protocol: ftp\n",
                "line 5",
            ),
        ];
        for (text, want) in cases {
            let e = parse("mesh.yaml", text).unwrap_err().to_string();
            assert!(
                e.contains(want) && e.starts_with("mesh.yaml: "),
                "{text:?}: {e}"
            );
        }
        assert!(parse("mesh.yaml", "").unwrap().services.is_empty());
    }
}
