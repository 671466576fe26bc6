//! The `musubi-identity` binary as a user runs it: init, dev, certify, bad configuration.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_musubi-identity");

#[test]
fn init_writes_a_ca_with_private_keys_only_owner_readable() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["init", "--trust-domain", "example.org", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (file, mode) in [
        ("trust-anchor.crt", 0o644),
        ("trust-anchor.key", 0o600),
        ("issuer.crt", 0o644),
        ("issuer.key", 0o600),
    ] {
        let meta = std::fs::metadata(dir.path().join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o077, mode & 0o077, "{file}");
    }
    // A second init refuses to overwrite.
    let again = Command::new(BIN)
        .args(["init", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

#[test]
fn bad_configuration_exits_64_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.crt");
    let out = Command::new(BIN)
        .args(["serve", "--token-validator", "jwks", "--trust-anchors"])
        .arg(&missing)
        .arg("--issuer-cert")
        .arg(&missing)
        .arg("--issuer-key")
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--trust-anchors"), "{err}");
    let out = Command::new(BIN)
        .args(["init", "--trust-domain", "bad/domain", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--trust-domain"));
}

#[test]
fn dev_then_certify_as_the_readme_says() {
    let state = tempfile::tempdir().unwrap();
    let mut dev = Command::new(BIN)
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--state",
        ])
        .arg(state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut printed = String::new();
    let mut lines = BufReader::new(dev.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("Ctrl-C") {
            break;
        }
    }
    // The printed command line, as a user would copy it (minus `cargo run -p ... --`).
    let cmd = printed
        .lines()
        .find(|l| l.contains(" certify "))
        .unwrap_or_else(|| panic!("no certify command in:\n{printed}"));
    let args: Vec<&str> = cmd
        .split(" -- ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    let ok = Command::new(BIN).args(&args).output().unwrap();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        stdout.contains("SPIFFE ID:   spiffe://cluster.local/ns/default/sa/default"),
        "{stdout}"
    );
    assert!(stdout.contains("BEGIN CERTIFICATE"));
    assert!(!stdout.contains("PRIVATE KEY"));

    // The same token cannot get another identity.
    let mut other: Vec<&str> = args.clone();
    let sa = other
        .iter()
        .position(|a| *a == "--service-account")
        .unwrap();
    other[sa + 1] = "admin";
    let refused = Command::new(BIN).args(&other).output().unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("InvalidArgument") && err.contains("ns/default/sa/admin"),
        "{err}"
    );

    // SIGTERM stops it cleanly.
    let term = Command::new("kill")
        .args(["-TERM", &dev.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = dev.wait().unwrap();
    assert!(status.success(), "exit status {status}");
}
