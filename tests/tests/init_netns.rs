//! `musubi-proxy init` for real: rules written inside a pod network namespace, checked with
//! real TCP connections from a peer namespace over a veth pair and from inside the pod.
//! Skips (with a printed reason) unless run as root with `ip netns` and iptables available.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use musubi_proxy::orig_dst::original_dst;
use musubi_tests::netns::{self, Netns};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// The connection `l` accepts within a second, if any.
async fn accepted(l: &TcpListener) -> Option<TcpStream> {
    tokio::time::timeout(Duration::from_secs(1), l.accept())
        .await
        .ok()
        .and_then(Result::ok)
        .map(|(tcp, _)| tcp)
}

/// Whether `l` has nothing to accept (checked briefly, after the connection was established).
async fn idle(l: &TcpListener) -> bool {
    tokio::time::timeout(Duration::from_millis(100), l.accept())
        .await
        .is_err()
}

fn init(pod: &Netns, args: &[&str]) -> std::process::Output {
    let bin = netns::proxy_binary();
    let mut all = vec![bin.to_str().unwrap(), "init"];
    all.extend_from_slice(args);
    pod.exec(&all)
}

fn jumps(saved: &str, chain: &str) -> usize {
    saved
        .lines()
        .filter(|l| l.starts_with(&format!("-A {chain} ")) && l.contains("-j MUSUBI_"))
        .count()
}

#[tokio::test]
async fn init_rules_redirect_real_connections() {
    if netns::skip("init_rules_redirect_real_connections") {
        return;
    }
    let v6 = netns::ipv6();
    let pod = Netns::new("pod");
    let peer = Netns::new("peer");
    let (pod_addrs, peer_addrs): (Vec<&str>, Vec<&str>) = if v6 {
        (
            vec!["10.77.0.1/24", "fd77::1/64"],
            vec!["10.77.0.2/24", "10.77.0.3/24", "fd77::2/64"],
        )
    } else {
        (vec!["10.77.0.1/24"], vec!["10.77.0.2/24", "10.77.0.3/24"])
    };
    netns::link(&pod, &pod_addrs, &peer, &peer_addrs);

    let mut args = vec![
        "--skip-inbound-ports",
        "7000-7001",
        "--skip-outbound-ports",
        "7100",
        "--skip-outbound-cidrs",
        "10.77.0.3/32",
    ];
    if !v6 {
        args.push("--no-ipv6");
    }
    let out = init(&pod, &args);
    assert!(
        out.status.success(),
        "init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let any = if v6 { "[::]" } else { "0.0.0.0" };
    let inbound = pod.listen(&format!("{any}:4143"));
    let outbound = pod.listen(&format!("{any}:4140"));
    let app = pod.listen(&format!("{any}:8080"));
    let skipped_app = pod.listen(&format!("{any}:7000"));
    let remote = peer.listen(&format!("{any}:9000"));
    let remote_skipped = peer.listen(&format!("{any}:7100"));

    // Inbound: a connection to an application port lands on 4143, and the original
    // destination is the port the client asked for.
    let _c = peer.connect("10.77.0.1:8080").unwrap();
    let tcp = accepted(&inbound)
        .await
        .expect("inbound redirected to 4143");
    assert_eq!(original_dst(&tcp), Some("10.77.0.1:8080".parse().unwrap()));
    assert!(idle(&app).await, "the app port itself must not see it");

    // Skipped inbound ports (and the range's other end) go straight to the application.
    let _c = peer.connect("10.77.0.1:7000").unwrap();
    assert!(accepted(&skipped_app).await.is_some());
    assert!(idle(&inbound).await, "skipped inbound port was redirected");

    // Outbound from an application UID (this test runs as root, not 2102): to 4140.
    let _c = pod.connect("10.77.0.2:9000").unwrap();
    let tcp = accepted(&outbound)
        .await
        .expect("outbound redirected to 4140");
    assert_eq!(original_dst(&tcp), Some("10.77.0.2:9000".parse().unwrap()));
    assert!(idle(&remote).await);

    // Skipped outbound port and CIDR: straight to the peer.
    let _c = pod.connect("10.77.0.2:7100").unwrap();
    assert!(accepted(&remote_skipped).await.is_some());
    let _c = pod.connect("10.77.0.3:9000").unwrap();
    assert!(accepted(&remote).await.is_some());
    assert!(idle(&outbound).await, "skipped port/CIDR was redirected");

    // Traffic inside the pod (loopback, own pod IP) is left alone.
    let _c = pod.connect("127.0.0.1:8080").unwrap();
    assert!(accepted(&app).await.is_some(), "loopback was redirected");
    let _c = pod.connect("10.77.0.1:8080").unwrap();
    assert!(accepted(&app).await.is_some(), "own pod IP was redirected");
    assert!(idle(&outbound).await && idle(&inbound).await);

    // The proxy's own UID is never redirected.
    let out = pod.exec(&[
        "setpriv",
        "--reuid",
        "2102",
        "--regid",
        "2102",
        "--clear-groups",
        "bash",
        "-c",
        "exec 3<>/dev/tcp/10.77.0.2/9000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        accepted(&remote).await.is_some(),
        "proxy UID connection did not reach the peer"
    );
    assert!(idle(&outbound).await, "proxy UID connection was redirected");

    if v6 {
        let _c = peer.connect("[fd77::1]:8080").unwrap();
        let tcp = accepted(&inbound).await.expect("IPv6 inbound redirected");
        assert_eq!(original_dst(&tcp), Some("[fd77::1]:8080".parse().unwrap()));
        let _c = pod.connect("[fd77::2]:9000").unwrap();
        let tcp = accepted(&outbound).await.expect("IPv6 outbound redirected");
        let want: SocketAddr = "[fd77::2]:9000".parse().unwrap();
        assert_eq!(original_dst(&tcp), Some(want));
    }

    // A connection made to the listener directly has no original destination.
    let _c = peer.connect("10.77.0.1:4143").unwrap();
    let tcp = accepted(&inbound).await.expect("direct to 4143");
    assert_eq!(original_dst(&tcp), None);

    // Idempotent: a second run leaves one jump per built-in chain and the same rules.
    let first = pod.nat_rules(false);
    let out = init(&pod, &args);
    assert!(out.status.success());
    let second = pod.nat_rules(false);
    let rules = |s: &str| {
        s.lines()
            .filter(|l| l.starts_with("-A"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        rules(&first),
        rules(&second),
        "second run changed the rules"
    );
    assert_eq!(jumps(&second, "PREROUTING"), 1, "{second}");
    assert_eq!(jumps(&second, "OUTPUT"), 1, "{second}");
    if v6 {
        let saved6 = pod.nat_rules(true);
        assert_eq!(jumps(&saved6, "PREROUTING"), 1, "{saved6}");
        assert_eq!(jumps(&saved6, "OUTPUT"), 1, "{saved6}");
    }
    // ...and still works.
    let _c = peer.connect("10.77.0.1:8081").unwrap();
    let tcp = accepted(&inbound).await.expect("still redirected");
    assert_eq!(original_dst(&tcp).map(|a| a.port()), Some(8081));
}

#[tokio::test]
async fn dry_run_prints_rules_and_changes_nothing() {
    if netns::skip("dry_run_prints_rules_and_changes_nothing") {
        return;
    }
    let pod = Netns::new("dry");
    let before = pod.nat_rules(false);
    let out = init(&pod, &["--dry-run", "--proxy-uid", "1337"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("*nat"), "{text}");
    assert!(text.contains("-A MUSUBI_OUTPUT -m owner --uid-owner 1337 -j RETURN"));
    assert!(text.contains("-A PREROUTING -p tcp -j MUSUBI_PREROUTING"));
    let after = pod.nat_rules(false);
    assert!(
        !after.contains("MUSUBI"),
        "dry run changed the table:\n{after}"
    );
    let strip = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(strip(&before), strip(&after));
}

/// Exit codes: 64 for bad arguments; 1 with the tool's stderr when iptables fails. Needs no
/// root: the failing iptables is a stand-in script first on PATH.
#[test]
fn init_exit_codes() {
    let bin = netns::proxy_binary();
    for args in [
        vec!["--skip-outbound-cidrs", "10.0.0.0/99"],
        vec!["--skip-inbound-ports", "9000-80"],
        vec!["--inbound-port", "http"],
        vec!["--backend", "nftables"],
    ] {
        let out = std::process::Command::new(&bin)
            .arg("init")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(args[0]), "{args:?}: {err}");
    }

    let dir = tempfile::tempdir().unwrap();
    let script = |name: &str, body: &str| {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.path().join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    script("iptables-nft-save", "echo '*nat'; echo COMMIT");
    script(
        "iptables-nft-restore",
        "cat >/dev/null; echo 'iptables-restore: line 3 failed' >&2; exit 2",
    );
    let out = std::process::Command::new(&bin)
        .args(["init", "--backend", "nft"])
        .env("PATH", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3 failed"), "{err}");
}
