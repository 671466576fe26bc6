//! Credentials in `musubi up`: how long tokens and certificates live, and the service-account
//! token files the proxies present to the identity service. Every token is minted again at
//! half its lifetime and replaced atomically; a proxy reads its file at every renewal.

use musubi_identity::token::local::{LocalIssuer, LocalIssuerError};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Tokens carry whole seconds (`iat` rounded down), so one lives at least its lifetime minus
/// a second; minted again at half of at least 4 s, the file always holds a valid token with a
/// second or more to spare.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(4);
/// Certificates are backdated by [`musubi_identity::ca::BACKDATE`] (60 s) and proxies renew at
/// ~70 % ± 5 % of the whole validity, backdating included: with 30 s a certificate is renewed
/// about 3 s after it arrives; much shorter, proxies would renew as soon as they get one.
pub const MIN_SVID_TTL: Duration = Duration::from_secs(30);

/// `d`, unless it is shorter than `min`.
pub fn at_least(d: Duration, min: Duration) -> Result<Duration, String> {
    if d < min {
        Err(format!(
            "{} is too short: at least {}",
            humantime::format_duration(d),
            humantime::format_duration(min)
        ))
    } else {
        Ok(d)
    }
}

/// clap's parser for `--token-ttl`.
pub fn parse_token_ttl(s: &str) -> Result<Duration, String> {
    at_least(
        humantime::parse_duration(s).map_err(|e| e.to_string())?,
        MIN_TOKEN_TTL,
    )
}

/// clap's parser for `--svid-ttl`.
pub fn parse_svid_ttl(s: &str) -> Result<Duration, String> {
    at_least(
        humantime::parse_duration(s).map_err(|e| e.to_string())?,
        MIN_SVID_TTL,
    )
}

/// When to mint again after minting tokens valid for `ttl`, or after failing to.
pub fn refresh_delay(ttl: Duration, minted: bool) -> Duration {
    if minted {
        ttl / 2
    } else {
        (ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("minting a token for {0}: {1}")]
    Mint(String, LocalIssuerError),
    #[error("writing {0}: {1}")]
    Write(PathBuf, std::io::Error),
}

/// Replaces `path` with `contents` so that a reader sees the old file or the new one, never a
/// part: a private temporary file in the same directory, renamed over it. (No fsync: after a
/// crash `up` mints new tokens anyway.)
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("not a file name"))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    // A leftover from a crash could have any mode; mode 0600 only applies to a new file.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(contents))
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// One service account's token file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFile {
    pub namespace: String,
    pub service_account: String,
    pub path: PathBuf,
}

/// The token files of these service accounts in `dir`, one per account.
pub fn token_files<'a>(
    dir: &Path,
    namespace: &str,
    accounts: impl IntoIterator<Item = &'a str>,
) -> Vec<TokenFile> {
    let mut files: Vec<TokenFile> = Vec::new();
    for sa in accounts {
        if files.iter().all(|f| f.service_account != sa) {
            files.push(TokenFile {
                namespace: namespace.to_string(),
                service_account: sa.to_string(),
                path: dir.join(format!("{namespace}.{sa}.jwt")),
            });
        }
    }
    files
}

/// Mints a token valid for `ttl` for each file and writes it.
pub fn mint_all(
    issuer: &LocalIssuer,
    files: &[TokenFile],
    ttl: Duration,
) -> Result<(), TokenError> {
    for f in files {
        let token = issuer
            .mint(&f.namespace, &f.service_account, ttl)
            .map_err(|e| TokenError::Mint(format!("{}/{}", f.namespace, f.service_account), e))?;
        write_atomically(&f.path, token.as_bytes())
            .map_err(|e| TokenError::Write(f.path.clone(), e))?;
    }
    Ok(())
}

/// Keeps the files' tokens fresh, forever; the first tokens must already be written.
pub fn spawn_refresh(
    issuer: Arc<LocalIssuer>,
    files: Vec<TokenFile>,
    ttl: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut delay = refresh_delay(ttl, true);
        loop {
            tokio::time::sleep(delay).await;
            let minted = match mint_all(&issuer, &files, ttl) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew a service-account token; retrying");
                    false
                }
            };
            delay = refresh_delay(ttl, minted);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use musubi_identity::renew::{RenewPolicy, renewal_delay};
    use std::os::unix::fs::PermissionsExt;
    use std::time::SystemTime;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn lifetime_flags_table() {
        let cases = [
            ("4s", parse_token_ttl as fn(&str) -> _, Ok(S(4))),
            ("1h", parse_token_ttl, Ok(S(3600))),
            ("3s", parse_token_ttl, Err("3s is too short: at least 4s")),
            (
                "3999ms",
                parse_token_ttl,
                Err("3s 999ms is too short: at least 4s"),
            ),
            ("30s", parse_svid_ttl, Ok(S(30))),
            ("24h", parse_svid_ttl, Ok(S(86_400))),
            ("29s", parse_svid_ttl, Err("29s is too short: at least 30s")),
            ("0s", parse_svid_ttl, Err("0s is too short: at least 30s")),
        ];
        for (arg, parse, want) in cases {
            assert_eq!(parse(arg), want.map_err(String::from), "{arg}");
        }
        assert!(parse_token_ttl("soon").is_err());
    }

    /// The SVID minimum follows from the identity crate's backdating and renewal policy: at
    /// the minimum, a fresh certificate is kept for seconds before its renewal, on average
    /// and at the latest; half the minimum would have it renewed at once.
    #[test]
    fn svid_minimum_leaves_time_before_renewal() {
        let now = SystemTime::now();
        let policy = RenewPolicy::default();
        let delay = |ttl: Duration, sample: f64| {
            let not_before = now - musubi_identity::ca::BACKDATE;
            renewal_delay(&policy, not_before, now + ttl, now, sample)
        };
        assert!(delay(MIN_SVID_TTL, 0.5) >= Duration::from_millis(2900));
        assert!(delay(MIN_SVID_TTL, 1.0) >= S(7));
        assert_eq!(delay(MIN_SVID_TTL / 2, 0.5), Duration::ZERO);
    }

    #[test]
    fn refresh_delay_table() {
        let cases = [
            (S(4), true, Duration::from_millis(2000)),
            (S(3600), true, S(1800)),
            (S(4), false, Duration::from_millis(400)),
            (S(3600), false, S(5)),
            (S(1), false, Duration::from_millis(100)),
        ];
        for (ttl, minted, want) in cases {
            assert_eq!(refresh_delay(ttl, minted), want, "{ttl:?} {minted}");
        }
    }

    #[test]
    fn token_files_are_one_per_account() {
        let files = token_files(Path::new("/s"), "demo", ["web", "api", "web"]);
        let paths: Vec<_> = files.iter().map(|f| f.path.display().to_string()).collect();
        assert_eq!(paths, ["/s/demo.web.jwt", "/s/demo.api.jwt"]);
    }

    #[test]
    fn write_atomically_replaces_with_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.web.jwt");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        // A stale temporary file (a crash mid-write), readable by anyone.
        let tmp = dir.path().join(".demo.web.jwt.tmp");
        std::fs::write(&tmp, "stale").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666)).unwrap();

        write_atomically(&path, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["demo.web.jwt"]);

        // A directory that is not there: an error, and nothing written.
        assert!(write_atomically(&dir.path().join("no/such.jwt"), b"x").is_err());
    }

    #[test]
    fn minted_tokens_live_for_the_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = LocalIssuer::generate("https://test").unwrap();
        let files = token_files(dir.path(), "demo", ["web"]);
        mint_all(&issuer, &files, S(4)).unwrap();
        let token = std::fs::read_to_string(&files[0].path).unwrap();
        let payload = token.split('.').nth(1).unwrap();
        use base64::Engine;
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        let (iat, exp) = (
            claims["iat"].as_i64().unwrap(),
            claims["exp"].as_i64().unwrap(),
        );
        assert_eq!(exp - iat, 4);
        assert_eq!(claims["sub"], "system:serviceaccount:demo:web");
    }
}
