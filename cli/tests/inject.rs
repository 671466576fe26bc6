//! `musubi inject` and `musubi install` as users run them: the real binary, offline.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

use std::io::Write as _;
use std::process::{Command, Stdio};

fn musubi(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_musubi"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

const DEPLOYMENT: &str = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: app, image: web, ports: [{containerPort: 8080}]}]\n";

#[test]
fn inject_reads_stdin_and_reports_per_workload() {
    let dir = tempfile::tempdir().unwrap();
    let anchors = dir.path().join("ca.crt");
    std::fs::write(
        &anchors,
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let out = musubi(
        &["inject", "--trust-anchors", anchors.to_str().unwrap(), "-"],
        DEPLOYMENT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("name: musubi-proxy") && stdout.contains("name: musubi-init"));
    assert!(stdout.contains("MUSUBI_PROXY_TRUST_ANCHORS_PEM"));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "deployment/web injected"
    );
}

#[test]
fn inject_refuses_bad_input_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let anchors = dir.path().join("ca.crt");
    std::fs::write(&anchors, "-----BEGIN CERTIFICATE-----\n").unwrap();
    let bad = DEPLOYMENT.replace(
        "metadata: {labels",
        "metadata: {annotations: {musubi.io/skip-inbound-ports: nope}, labels",
    );
    let out = musubi(
        &["inject", "--trust-anchors", anchors.to_str().unwrap(), "-"],
        &bad,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("deployment/web") && err.contains("musubi.io/skip-inbound-ports"),
        "{err}"
    );
    let out = musubi(
        &["inject", "--trust-anchors", "/does/not/exist", "-"],
        DEPLOYMENT,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/does/not/exist"));
}

#[test]
fn install_prints_manifests_with_fresh_certificates() {
    let a = musubi(&["install"], "");
    let b = musubi(&["install"], "");
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let (a, b) = (
        String::from_utf8(a.stdout).unwrap(),
        String::from_utf8(b.stdout).unwrap(),
    );
    assert!(a.starts_with("apiVersion: v1\nkind: Namespace"));
    assert!(a.contains("kind: MutatingWebhookConfiguration"));
    assert_ne!(a, b, "each run generates its own trust anchor");
    // Only half of the user's certificates is an error, not a silent generation.
    let out = musubi(&["install", "--trust-anchors", "/tmp/x.pem"], "");
    assert!(!out.status.success());
}
