//! `musubi up` as a user runs it: the demo mesh, and the user's own services from a file.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_musubi");

/// Runs `musubi up` and returns it with the entry address once it says it is up.
fn up(args: &[&str], state: &std::path::Path) -> (Child, Vec<String>) {
    let mut child = Command::new(BIN)
        .arg("up")
        .args(args)
        .arg("--state")
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let mut reader = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in reader.by_ref() {
        let line = line.unwrap();
        let done = line.contains("Ctrl-C");
        lines.push(line);
        if done {
            break;
        }
    }
    // Keep reading (and discarding) the rest, as a terminal would.
    std::thread::spawn(move || reader.for_each(drop));
    (child, lines)
}

fn try_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    tcp.read_to_string(&mut out)?;
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((
        status,
        out.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    ))
}

fn get(addr: &str, path: &str) -> (u16, String) {
    try_get(addr, path).unwrap()
}

fn entry(lines: &[String]) -> String {
    lines
        .iter()
        .find_map(|l| {
            l.trim().strip_prefix("entry").map(|r| {
                r.trim()
                    .trim_start_matches("http://")
                    .split('/')
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
        })
        .unwrap_or_else(|| panic!("no entry line in {lines:#?}"))
}

fn stop(mut child: Child) {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "musubi up exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "musubi up did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn demo_mesh_serves_web_api_store_over_mtls() {
    let state = tempfile::tempdir().unwrap();
    let (child, lines) = up(&[], state.path());
    let entry = entry(&lines);
    let (status, body) = get(&entry, "/");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("api: called by spiffe://cluster.local/ns/demo/sa/web"),
        "{body}"
    );
    assert!(body.contains("greeting=hello from the store"), "{body}");
    assert!(
        body.contains("store: called by spiffe://cluster.local/ns/demo/sa/api"),
        "{body}"
    );
    // Each proxy's metrics endpoint is printed and serves the golden metrics.
    let metrics = lines
        .iter()
        .find(|l| l.trim_start().starts_with("api"))
        .unwrap();
    let admin = metrics
        .split("http://")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let (status, text) = get(&admin, "/metrics");
    assert_eq!(status, 200);
    assert!(
        text.contains("musubi_proxy_responses_total{direction=\"inbound\""),
        "{text}"
    );
    stop(child);
}

#[test]
fn user_services_from_a_mesh_file() {
    let state = tempfile::tempdir().unwrap();
    let www = state.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from a user service\n").unwrap();
    let mesh = state.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        format!(
            "namespace: mine\nservices:\n  - name: files\n    command: cd '{}' && exec python3 -m http.server --bind 127.0.0.1 $PORT\n    expose: true\n",
            www.display()
        ),
    )
    .unwrap();
    let (child, lines) = up(&["-f", mesh.to_str().unwrap()], state.path());
    let entry = entry(&lines);
    // `up` waits for the app to listen before printing the entry, so the first request works.
    let (status, body) = get(&entry, "/hello.txt");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "hello from a user service\n");
    stop(child);

    // A bad mesh file is refused with the reason.
    std::fs::write(&mesh, "services:\n  - name: Bad_Name\n    command: x\n").unwrap();
    let out = Command::new(BIN)
        .args(["up", "-f"])
        .arg(&mesh)
        .arg("--state")
        .arg(state.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("services[0] (Bad_Name)"));
}
