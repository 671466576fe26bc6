//! Re-reading the issuer certificate and key when their files change (cert-manager or a
//! Vault-fed Secret rotating them), without a restart. A bad new pair is refused loudly and
//! the old issuer keeps signing; so is a file that cannot be read, once per kind of failure
//! rather than once per poll.

use super::IssuerHandle;
use super::metrics::{IdentityMetrics, ResultLabel};
use crate::bundle::TrustBundle;
use crate::ca::Issuer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone)]
pub struct IssuerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a poll found.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    Unchanged,
    Reloaded,
    Refused(String),
    /// A file could not be read; the current issuer keeps signing.
    Unreadable(ReadFailure),
}

/// An issuer file that could not be read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadFailure {
    pub file: PathBuf,
    pub error: String,
}

impl std::fmt::Display for ReadFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot read issuer file {}: {}",
            self.file.display(),
            self.error
        )
    }
}

/// What to log after a poll, given the read failure logged last and this poll's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadLog {
    /// Nothing new: the files read fine again, or fail just as they did.
    Quiet,
    /// The files stopped being readable, or now fail differently (another file or error).
    Failing,
    /// The files are readable again.
    Recovered,
}

pub fn read_log(logged: Option<&ReadFailure>, now: Option<&ReadFailure>) -> ReadLog {
    match (logged, now) {
        (None, None) => ReadLog::Quiet,
        (Some(_), None) => ReadLog::Recovered,
        (Some(before), Some(now)) if before == now => ReadLog::Quiet,
        (_, Some(_)) => ReadLog::Failing,
    }
}

/// Watches the issuer files by content (Kubernetes swaps Secret volumes through symlinks, so
/// modification times are not reliable).
pub struct IssuerReloader {
    files: IssuerFiles,
    bundle: TrustBundle,
    handle: IssuerHandle,
    metrics: Arc<IdentityMetrics>,
    last_seen: Option<(Vec<u8>, Vec<u8>)>,
    /// The read failure logged last, until the files read fine again.
    failing: Option<ReadFailure>,
}

impl IssuerReloader {
    /// `initial` is the content the current issuer was loaded from.
    pub fn new(
        files: IssuerFiles,
        bundle: TrustBundle,
        handle: IssuerHandle,
        metrics: Arc<IdentityMetrics>,
        initial: (Vec<u8>, Vec<u8>),
    ) -> Self {
        IssuerReloader {
            files,
            bundle,
            handle,
            metrics,
            last_seen: Some(initial),
            failing: None,
        }
    }

    /// Reads both files; an error names the file.
    async fn read(&self) -> Result<(Vec<u8>, Vec<u8>), ReadFailure> {
        async fn one(path: &Path) -> Result<Vec<u8>, ReadFailure> {
            tokio::fs::read(path).await.map_err(|e| ReadFailure {
                file: path.to_path_buf(),
                error: e.to_string(),
            })
        }
        Ok((one(&self.files.cert).await?, one(&self.files.key).await?))
    }

    /// Logs a read failure when it starts or changes, and once when it ends.
    fn note_read(&mut self, now: Option<&ReadFailure>) {
        match read_log(self.failing.as_ref(), now) {
            ReadLog::Quiet => {}
            ReadLog::Failing => {
                if let Some(failure) = now {
                    tracing::error!(
                        file = %failure.file.display(),
                        error = %failure.error,
                        "CANNOT READ issuer file; still signing with the current issuer (logged again only if the failure changes)"
                    );
                }
            }
            ReadLog::Recovered => {
                tracing::info!(
                    cert = %self.files.cert.display(),
                    key = %self.files.key.display(),
                    "issuer files are readable again"
                );
            }
        }
        self.failing = now.cloned();
    }

    /// Reads the files once and swaps the issuer if they changed and are good.
    pub async fn poll(&mut self) -> ReloadOutcome {
        let (cert, key) = match self.read().await {
            Ok(pair) => {
                self.note_read(None);
                pair
            }
            Err(failure) => {
                self.note_read(Some(&failure));
                self.metrics
                    .issuer_reloads
                    .get_or_create(&ResultLabel {
                        result: "unreadable",
                    })
                    .inc();
                return ReloadOutcome::Unreadable(failure);
            }
        };
        if self.last_seen.as_ref() == Some(&(cert.clone(), key.clone())) {
            return ReloadOutcome::Unchanged;
        }
        let outcome = match Issuer::from_pem(&cert, &key, &self.bundle, SystemTime::now()) {
            Ok(issuer) => {
                tracing::info!(issuer = ?issuer, "issuer rotated from {}", self.files.cert.display());
                self.handle.store(Arc::new(issuer));
                self.metrics
                    .issuer_reloads
                    .get_or_create(&ResultLabel { result: "ok" })
                    .inc();
                ReloadOutcome::Reloaded
            }
            Err(e) => {
                tracing::error!(
                    cert = %self.files.cert.display(),
                    key = %self.files.key.display(),
                    error = %e,
                    "REFUSED new issuer certificate/key; still signing with the previous issuer"
                );
                self.metrics
                    .issuer_reloads
                    .get_or_create(&ResultLabel { result: "refused" })
                    .inc();
                ReloadOutcome::Refused(e.to_string())
            }
        };
        self.last_seen = Some((cert, key));
        outcome
    }

    /// Polls every `every` forever.
    pub async fn run(mut self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.poll().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestCa;
    use prometheus_client::registry::Registry;
    use std::sync::Mutex;

    fn failure(file: &str, error: &str) -> ReadFailure {
        ReadFailure {
            file: file.into(),
            error: error.into(),
        }
    }

    #[test]
    fn read_log_table() {
        let missing = failure("/etc/issuer.key", "No such file or directory (os error 2)");
        let is_dir = failure("/etc/issuer.key", "Is a directory (os error 21)");
        let cert_missing = failure("/etc/issuer.crt", "No such file or directory (os error 2)");
        let cases = [
            ("fine, still fine", None, None, ReadLog::Quiet),
            ("starts failing", None, Some(&missing), ReadLog::Failing),
            (
                "fails the same way",
                Some(&missing),
                Some(&missing),
                ReadLog::Quiet,
            ),
            (
                "same file, other error",
                Some(&missing),
                Some(&is_dir),
                ReadLog::Failing,
            ),
            (
                "other file",
                Some(&missing),
                Some(&cert_missing),
                ReadLog::Failing,
            ),
            ("recovers", Some(&missing), None, ReadLog::Recovered),
        ];
        for (name, logged, now, want) in cases {
            assert_eq!(read_log(logged, now), want, "{name}");
        }
    }

    /// Log lines written while a test runs on this thread.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        /// Lines logged since the last call.
        fn take(&self) -> Vec<String> {
            let bytes = std::mem::take(&mut *self.0.lock().unwrap());
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    #[tokio::test]
    async fn unreadable_files_are_logged_once_per_failure_and_counted_every_poll() {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);

        let ca = TestCa::new("cluster.local");
        let dir = tempfile::tempdir().unwrap();
        let files = IssuerFiles {
            cert: dir.path().join("issuer.crt"),
            key: dir.path().join("issuer.key"),
        };
        let pem = (
            ca.issuer_pem.cert_pem.clone().into_bytes(),
            ca.issuer_pem.key_pem.clone().into_bytes(),
        );
        std::fs::write(&files.cert, &pem.0).unwrap();
        std::fs::write(&files.key, &pem.1).unwrap();
        let metrics = Arc::new(IdentityMetrics::new(&mut Registry::default()));
        let issuer = Issuer::from_pem(&pem.0, &pem.1, &ca.bundle, SystemTime::now()).unwrap();
        let handle: IssuerHandle = Arc::new(arc_swap::ArcSwap::from_pointee(issuer));
        let mut reloader = IssuerReloader::new(
            files.clone(),
            ca.bundle.clone(),
            handle,
            metrics.clone(),
            pem.clone(),
        );
        let unreadable = || {
            metrics
                .issuer_reloads
                .get_or_create(&ResultLabel {
                    result: "unreadable",
                })
                .get()
        };
        let key = files.key.display().to_string();
        let cert = files.cert.display().to_string();

        assert_eq!(reloader.poll().await, ReloadOutcome::Unchanged);
        assert_eq!(logs.take(), Vec::<String>::new());

        // The key goes missing: one error naming the file and the error, however many polls.
        std::fs::remove_file(&files.key).unwrap();
        for _ in 0..3 {
            let ReloadOutcome::Unreadable(f) = reloader.poll().await else {
                panic!("a missing key file was not reported");
            };
            assert_eq!(f.file, files.key);
        }
        assert_eq!(unreadable(), 3);
        let lines = logs.take();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("ERROR")
                && lines[0].contains(&key)
                && lines[0].contains("(os error 2)"),
            "{lines:?}"
        );

        // Same file, another error: logged again, once.
        std::fs::create_dir(&files.key).unwrap();
        reloader.poll().await;
        reloader.poll().await;
        let lines = logs.take();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("ERROR") && lines[0].contains(&key),
            "{lines:?}"
        );
        assert!(!lines[0].contains("(os error 2)"), "{lines:?}");

        // Another file: logged again, once.
        std::fs::remove_file(&files.cert).unwrap();
        reloader.poll().await;
        reloader.poll().await;
        let lines = logs.take();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("ERROR") && lines[0].contains(&cert),
            "{lines:?}"
        );
        assert_eq!(unreadable(), 7);

        // Back as they were: one line saying so, then quiet; nothing is swapped.
        std::fs::remove_dir(&files.key).unwrap();
        std::fs::write(&files.cert, &pem.0).unwrap();
        std::fs::write(&files.key, &pem.1).unwrap();
        assert_eq!(reloader.poll().await, ReloadOutcome::Unchanged);
        assert_eq!(reloader.poll().await, ReloadOutcome::Unchanged);
        let lines = logs.take();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("INFO") && lines[0].contains("readable again"),
            "{lines:?}"
        );
        assert_eq!(unreadable(), 7);

        // A failure after recovering is news again.
        std::fs::remove_file(&files.key).unwrap();
        reloader.poll().await;
        assert_eq!(logs.take().len(), 1);
        assert_eq!(unreadable(), 8);
    }
}
