//! The I/O half of `musubi-proxy init`: find which iptables backend the system uses, read what
//! is already there, and feed the rules to `iptables-restore --noflush`. Decisions about what
//! the output means are pure functions, tested below.

use super::rules::{self, Family, Plan};
use std::io::Write;
use std::process::{Command, Stdio};

/// The kernel interface the iptables tools drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
}

/// What `--backend` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    Auto,
    Nft,
    Legacy,
}

impl std::str::FromStr for Requested {
    type Err = rules::ArgError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Requested::Auto),
            "nft" => Ok(Requested::Nft),
            "legacy" => Ok(Requested::Legacy),
            other => Err(rules::ArgError {
                flag: "--backend",
                problem: format!("{other:?}: expected nft, legacy or auto"),
            }),
        }
    }
}

/// Running an iptables tool failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot run {command}: {error}")]
    Spawn {
        command: String,
        error: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("no iptables tools found (install iptables)")]
    NoIptables,
}

fn rule_count(saved: &str) -> usize {
    saved.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Picks the backend. With `auto`: the one that already holds rules (the system's own or
/// Kubernetes' choice), else what `iptables --version` reports, else whichever tools exist.
/// `None` inputs mean the tool could not be run.
pub fn choose(
    requested: Requested,
    legacy_saved: Option<&str>,
    nft_saved: Option<&str>,
    version: Option<&str>,
) -> Result<Backend, ExecError> {
    match requested {
        Requested::Nft => return Ok(Backend::Nft),
        Requested::Legacy => return Ok(Backend::Legacy),
        Requested::Auto => {}
    }
    let legacy_rules = legacy_saved.map(rule_count).unwrap_or(0);
    let nft_rules = nft_saved.map(rule_count).unwrap_or(0);
    if legacy_rules > 0 && nft_rules == 0 {
        return Ok(Backend::Legacy);
    }
    if nft_rules > 0 && legacy_rules == 0 {
        return Ok(Backend::Nft);
    }
    match version {
        Some(v) if v.contains("nf_tables") => return Ok(Backend::Nft),
        Some(v) if v.contains("legacy") => return Ok(Backend::Legacy),
        _ => {}
    }
    match (nft_saved, legacy_saved) {
        (Some(_), _) => Ok(Backend::Nft),
        (None, Some(_)) => Ok(Backend::Legacy),
        (None, None) => Err(ExecError::NoIptables),
    }
}

/// The tool for `family`, `backend` and `action` (`save` or `restore`): the backend-specific
/// name first (`iptables-nft-restore`), then the plain one (`iptables-restore`).
fn tool_names(family: Family, backend: Backend, action: &str) -> [String; 2] {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    let flavour = match backend {
        Backend::Nft => "nft",
        Backend::Legacy => "legacy",
    };
    [
        format!("{base}-{flavour}-{action}"),
        format!("{base}-{action}"),
    ]
}

/// Runs the first of `names` that exists with `args` and `stdin`, returning its stdout.
fn run_tool(names: &[String], args: &[&str], stdin: Option<&str>) -> Result<String, ExecError> {
    let mut last = ExecError::NoIptables;
    for name in names {
        let command = format!("{name} {}", args.join(" "));
        let child = Command::new(name)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                last = ExecError::Spawn { command, error: e };
                continue;
            }
            Err(error) => return Err(ExecError::Spawn { command, error }),
        };
        // A tool that exits early (bad input) closes its stdin: the broken pipe matters less
        // than what the tool said, so wait for it and report its stderr first.
        let written = match (stdin, child.stdin.take()) {
            (Some(text), Some(mut pipe)) => pipe.write_all(text.as_bytes()),
            _ => Ok(()),
        };
        let out = child.wait_with_output().map_err(|error| ExecError::Spawn {
            command: command.clone(),
            error,
        })?;
        if !out.status.success() {
            return Err(ExecError::Failed {
                command,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        if let Err(error) = written {
            return Err(ExecError::Spawn { command, error });
        }
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(last)
}

/// Looks at the system to decide the backend.
pub fn detect(requested: Requested) -> Result<Backend, ExecError> {
    if requested != Requested::Auto {
        return choose(requested, None, None, None);
    }
    let save = |b: Backend| {
        run_tool(
            &tool_names(Family::V4, b, "save")[..1],
            &["-t", "nat"],
            None,
        )
        .ok()
    };
    let legacy = save(Backend::Legacy);
    let nft = save(Backend::Nft);
    let version = run_tool(&["iptables".to_string()], &["--version"], None).ok();
    choose(
        requested,
        legacy.as_deref(),
        nft.as_deref(),
        version.as_deref(),
    )
}

/// Applies the plan for one family: reads the `nat` table, then restores our chains (and any
/// missing jump) without flushing anything else.
pub fn apply(plan: &Plan, family: Family, backend: Backend) -> Result<(), ExecError> {
    let saved = run_tool(&tool_names(family, backend, "save"), &["-t", "nat"], None)?;
    let text = rules::render(plan, family, rules::present(&saved));
    run_tool(
        &tool_names(family, backend, "restore"),
        &["--noflush"],
        Some(&text),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NFT_WITH_RULES: &str =
        "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n";
    const EMPTY: &str = "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n";

    #[test]
    fn backend_table() {
        use Backend::*;
        let cases: Vec<(
            Requested,
            Option<&str>,
            Option<&str>,
            Option<&str>,
            Option<Backend>,
        )> = vec![
            (Requested::Nft, None, None, None, Some(Nft)),
            (
                Requested::Legacy,
                Some(EMPTY),
                Some(NFT_WITH_RULES),
                None,
                Some(Legacy),
            ),
            // Rules already in one backend win over what `iptables --version` says.
            (
                Requested::Auto,
                Some(NFT_WITH_RULES),
                Some(EMPTY),
                Some("iptables v1.8.9 (nf_tables)"),
                Some(Legacy),
            ),
            (
                Requested::Auto,
                Some(EMPTY),
                Some(NFT_WITH_RULES),
                Some("iptables v1.8.9 (legacy)"),
                Some(Nft),
            ),
            // Both or neither: the version decides.
            (
                Requested::Auto,
                Some(EMPTY),
                Some(EMPTY),
                Some("iptables v1.8.9 (legacy)"),
                Some(Legacy),
            ),
            (
                Requested::Auto,
                Some(NFT_WITH_RULES),
                Some(NFT_WITH_RULES),
                Some("iptables v1.8.9 (nf_tables)"),
                Some(Nft),
            ),
            // No version: whichever tools run.
            (Requested::Auto, Some(EMPTY), None, None, Some(Legacy)),
            (
                Requested::Auto,
                None,
                Some(EMPTY),
                Some("iptables v1.4.21"),
                Some(Nft),
            ),
            (Requested::Auto, None, None, None, None),
        ];
        for (i, (req, legacy, nft, version, want)) in cases.into_iter().enumerate() {
            let got = choose(req, legacy, nft, version).ok();
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn backend_flag() {
        assert_eq!("nft".parse::<Requested>().unwrap(), Requested::Nft);
        assert_eq!("auto".parse::<Requested>().unwrap(), Requested::Auto);
        assert!("nftables".parse::<Requested>().is_err());
    }

    #[test]
    fn tools() {
        assert_eq!(
            tool_names(Family::V6, Backend::Legacy, "restore"),
            ["ip6tables-legacy-restore", "ip6tables-restore"]
        );
    }
}
