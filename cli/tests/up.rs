//! `musubi up` as a user runs it: the demo mesh, and the user's own services from a file.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: fail loudly

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_musubi");

/// A process, by pid and start time (so a reused pid is not mistaken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Proc {
    pid: i32,
    start: u64,
}

/// (state, ppid, start time) of a process from /proc/<pid>/stat.
fn stat(pid: i32) -> Option<(char, i32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses: the fields start after the last ')'.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    Some((
        fields.first()?.chars().next()?,
        fields.get(1)?.parse().ok()?,
        fields.get(19)?.parse().ok()?,
    ))
}

fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Every process below `root` now, by walking the parent links of all of /proc.
fn descendants(root: i32) -> Vec<Proc> {
    let table: Vec<(i32, i32, u64)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let (_, ppid, start) = stat(pid)?;
            Some((pid, ppid, start))
        })
        .collect();
    let mut found = vec![root];
    let mut out = Vec::new();
    while let Some(parent) = found.pop() {
        for &(pid, ppid, start) in &table {
            if ppid == parent {
                found.push(pid);
                out.push(Proc { pid, start });
            }
        }
    }
    out
}

/// Still there, zombies included (a zombie is gone only once reaped). An orphan adopted by this
/// test process (see `adopt_orphans`) is reaped here.
fn alive(p: &Proc) -> bool {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    if let Some((state, ppid, _)) = stat(p.pid)
        && state == 'Z'
        && u32::try_from(ppid) == Ok(std::process::id())
    {
        let _ = waitpid(
            nix::unistd::Pid::from_raw(p.pid),
            Some(WaitPidFlag::WNOHANG),
        );
    }
    matches!(stat(p.pid), Some((_, _, start)) if start == p.start)
}

/// Makes this test process the one that orphans below it are re-parented to (instead of
/// init), so that whether they are reaped does not depend on what init does here.
fn adopt_orphans() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
}

fn describe(procs: &[Proc]) -> Vec<String> {
    procs
        .iter()
        .map(|p| format!("{} {:?} {:?}", p.pid, stat(p.pid), cmdline(p.pid)))
        .collect()
}

/// Polls `cond` until it holds or `within` passes.
fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running `musubi up`: what it printed, and every process below it once it said it is up.
/// Dropping it SIGKILLs all of them, so a failing test leaves nothing behind either.
struct Up {
    child: Option<Child>,
    lines: Vec<String>,
    procs: Vec<Proc>,
}

impl Up {
    fn pid(&self) -> nix::unistd::Pid {
        let child = self.child.as_ref().unwrap();
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap())
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).unwrap();
    }

    /// Waits (bounded) for `up` to exit.
    fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "musubi up did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, and `up` must stop cleanly.
    fn stop(mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.wait(Duration::from_secs(30));
        assert!(status.success(), "musubi up exited with {status}");
    }

    fn alive(&self) -> Vec<Proc> {
        self.procs.iter().copied().filter(alive).collect()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        for p in self.alive() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let procs = std::mem::take(&mut self.procs);
        eventually(Duration::from_secs(5), || procs.iter().all(|p| !alive(p)));
    }
}

/// Runs `musubi up` until it says it is up.
fn up(args: &[&str], state: &std::path::Path) -> Up {
    let mut child = Command::new(BIN)
        .arg("up")
        .args(args)
        .arg("--state")
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut up = Up {
        child: Some(child),
        lines: Vec::new(),
        procs: Vec::new(),
    };
    let mut reader = BufReader::new(stdout).lines();
    for line in reader.by_ref() {
        let line = line.unwrap();
        let done = line.contains("Ctrl-C");
        up.lines.push(line);
        if done {
            break;
        }
    }
    // Keep reading (and discarding) the rest, as a terminal would.
    std::thread::spawn(move || reader.for_each(drop));
    up.procs = descendants(up.pid().as_raw());
    up
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

#[test]
fn demo_mesh_serves_web_api_store_over_mtls() {
    let state = tempfile::tempdir().unwrap();
    let up = up(&[], state.path());
    let lines = &up.lines;
    let entry = entry(lines);
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
    up.stop();
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
    let up = up(&["-f", mesh.to_str().unwrap()], state.path());
    let entry = entry(&up.lines);
    // `up` waits for the app to listen before printing the entry, so the first request works.
    let (status, body) = get(&entry, "/hello.txt");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "hello from a user service\n");
    up.stop();

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

/// `host:port` of each service's app and of its proxy's admin listener, as `up` printed them.
fn services(lines: &[String]) -> Vec<(String, String, String)> {
    lines
        .iter()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next()?.to_string();
            (words.next()? == "app").then_some(())?;
            let app = words.next()?.to_string();
            let admin = l.split("http://").nth(1)?.split('/').next()?.to_string();
            Some((name, app, admin))
        })
        .collect()
}

fn accepts(addr: &str) -> bool {
    std::net::TcpStream::connect(addr).is_ok()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Ending {
    Sigterm,
    /// To `up`'s pid only, not its process group (a terminal's Ctrl-C signals the whole group).
    Sigint,
    RunFor,
    Sigkill,
}

/// However `up` ends, every process it started (supervisors, proxies, shells, apps) is gone
/// and reaped, and the apps' ports are closed.
fn nothing_outlives_up(ending: Ending) {
    use nix::sys::signal::Signal;
    adopt_orphans();
    let state = tempfile::tempdir().unwrap();
    let args: &[&str] = match ending {
        Ending::RunFor => &["--run-for", "6s"],
        _ => &[],
    };
    let mut up = up(args, state.path());

    // What was collected is the whole mesh: three proxies, the three demo apps (under `sh`),
    // and a supervisor above each of the six.
    let argv: Vec<Vec<String>> = up.procs.iter().map(|p| cmdline(p.pid)).collect();
    let count = |what: &[&str]| {
        argv.iter()
            .filter(|a| a.get(1..).is_some_and(|rest| rest == what))
            .count()
    };
    assert_eq!(count(&["proxy"]), 3, "{argv:#?}");
    for app in ["web", "api", "store"] {
        assert_eq!(count(&["demo", app]), 1, "{app}: {argv:#?}");
    }
    let supervisors = argv
        .iter()
        .filter(|a| a.get(1).map(String::as_str) == Some("supervise"))
        .count();
    assert_eq!(supervisors, 6, "{argv:#?}");
    let mut ports: Vec<String> = services(&up.lines).into_iter().map(|s| s.1).collect();
    ports.push(entry(&up.lines));
    assert_eq!(ports.len(), 4, "{:#?}", up.lines);
    for addr in &ports {
        assert!(accepts(addr), "{addr} is not listening while up runs");
    }

    match ending {
        Ending::Sigterm => up.signal(Signal::SIGTERM),
        Ending::Sigint => up.signal(Signal::SIGINT),
        Ending::RunFor => {}
        Ending::Sigkill => up.signal(Signal::SIGKILL),
    }
    let status = up.wait(Duration::from_secs(30));
    if ending == Ending::Sigkill {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "{status}");
    } else {
        assert!(
            status.success(),
            "{ending:?}: musubi up exited with {status}"
        );
        // `up` waits for its supervisors, each for everything below it: nothing is left the
        // moment `up` has exited.
        assert_eq!(describe(&up.alive()), Vec::<String>::new(), "{ending:?}");
    }
    // After a SIGKILL, the supervisors learn of it from the kernel and stop the rest.
    let procs = up.procs.clone();
    let gone = eventually(Duration::from_secs(20), || procs.iter().all(|p| !alive(p)));
    assert!(
        gone,
        "{ending:?}: still alive: {:#?}",
        describe(&up.alive())
    );
    let closed = eventually(Duration::from_secs(5), || !ports.iter().any(|a| accepts(a)));
    assert!(
        closed,
        "{ending:?}: a port still accepts connections: {ports:?}"
    );
}

#[test]
fn sigterm_stops_everything() {
    nothing_outlives_up(Ending::Sigterm);
}

#[test]
fn sigint_to_up_alone_stops_everything() {
    nothing_outlives_up(Ending::Sigint);
}

#[test]
fn run_for_stops_everything() {
    nothing_outlives_up(Ending::RunFor);
}

#[test]
fn sigkill_of_up_leaves_nothing_behind() {
    nothing_outlives_up(Ending::Sigkill);
}

fn identity(admin: &str) -> (String, std::time::SystemTime) {
    let (status, body) = get(admin, "/debug/identity");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let sha = v["certificate_sha256"].as_str().unwrap().to_string();
    let not_after = humantime::parse_rfc3339(v["not_after"].as_str().unwrap()).unwrap();
    (sha, not_after)
}

fn claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&json).unwrap()
}

/// With tokens that live 4 s, certificates that live 30 s and the identity service refusing a
/// token the second it expires, every proxy keeps getting new certificates long after the
/// first tokens expired: `up` mints them again, and the proxies read the new ones.
#[test]
fn tokens_are_minted_again_and_certificates_keep_renewing() {
    use std::os::unix::fs::PermissionsExt;
    const TOKEN_TTL: Duration = Duration::from_secs(4);
    let state = tempfile::tempdir().unwrap();
    let up = up(
        &[
            "--token-ttl",
            "4s",
            "--svid-ttl",
            "30s",
            "--traffic-every",
            "0.5",
        ],
        state.path(),
    );
    let started = Instant::now();
    let admins: Vec<(String, String)> = services(&up.lines)
        .into_iter()
        .map(|(name, _, admin)| (name, admin))
        .collect();
    assert_eq!(admins.len(), 3, "{:#?}", up.lines);
    let token_path = state.path().join("tokens").join("demo.web.jwt");

    // Per proxy: each certificate it held, with when it was first seen.
    let mut certs: Vec<Vec<(String, std::time::SystemTime, Duration)>> = vec![Vec::new(); 3];
    let mut tokens: Vec<String> = Vec::new();
    let enough = |certs: &[Vec<(String, std::time::SystemTime, Duration)>]| {
        certs
            .iter()
            .all(|c| c.len() >= 4 && c.last().is_some_and(|(_, _, seen)| *seen >= TOKEN_TTL * 3))
    };
    let deadline = started + Duration::from_secs(25);
    while !enough(&certs) {
        assert!(
            Instant::now() < deadline,
            "certificates did not keep renewing: {:#?}",
            certs
                .iter()
                .zip(&admins)
                .map(|(c, (name, _))| (name, c.iter().map(|x| x.2).collect::<Vec<_>>()))
                .collect::<Vec<_>>()
        );
        for ((_, admin), seen) in admins.iter().zip(certs.iter_mut()) {
            let (sha, not_after) = identity(admin);
            if seen.last().map(|c| &c.0) != Some(&sha) {
                seen.push((sha, not_after, started.elapsed()));
            }
        }
        let token = std::fs::read_to_string(&token_path).unwrap();
        if tokens.last() != Some(&token) {
            tokens.push(token);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // `not_after` has whole seconds: two renewals within a second share it.
    for c in &certs {
        let not_after: Vec<_> = c.iter().map(|x| x.1).collect();
        assert!(
            not_after.windows(2).all(|w| w[1] >= w[0]) && not_after.last() > not_after.first(),
            "each new certificate must live at least as long as the one before: {not_after:?}"
        );
    }
    // The token file: private, replaced every couple of seconds, each token living 4 s.
    let mode = std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        tokens.len() >= 5,
        "{} tokens in {:?}",
        tokens.len(),
        started.elapsed()
    );
    for t in &tokens {
        let c = claims(t);
        assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 4);
    }
    // And the mesh still works end to end, over the latest certificates.
    let (status, body) = get(&entry(&up.lines), "/");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("greeting=hello from the store"), "{body}");
    up.stop();
}

#[test]
fn lifetimes_below_the_minimum_are_refused() {
    for (flag, value) in [("--token-ttl", "3s"), ("--svid-ttl", "10s")] {
        let out = Command::new(BIN)
            .args(["up", flag, value, "--state", "/nonexistent/never-created"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag) && err.contains("too short"), "{err}");
    }
}

/// The routing example for `up` (examples/routing/up.yaml): 10,000 requests from web's side
/// through its outbound proxy, 10 % of them answered by the canary (within five standard
/// deviations of a binomial sample of that size).
#[test]
fn the_routing_example_splits_90_10() {
    use std::io::{BufRead, BufReader, Read, Write};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let state = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(root.join("examples/routing/up.yaml")).unwrap();
    let echo = root.join("examples/routing/echo.py");
    let file = state.path().join("up.yaml");
    std::fs::write(
        &file,
        example.replace("examples/routing/echo.py", echo.to_str().unwrap()),
    )
    .unwrap();
    let up = up(&["-f", file.to_str().unwrap()], state.path());
    let outbound = up
        .lines
        .iter()
        .find(|l| l.trim_start().starts_with("web "))
        .and_then(|l| l.split("HTTP_PROXY ").nth(1))
        .map(|s| s.trim_end_matches(')').to_string())
        .unwrap_or_else(|| panic!("no outbound for web in {:#?}", up.lines));
    const N: usize = 10_000;
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let outbound = outbound.clone();
            std::thread::spawn(move || {
                // One keep-alive connection per thread; responses carry content-length.
                let tcp = std::net::TcpStream::connect(&outbound).unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut w = tcp.try_clone().unwrap();
                let mut r = BufReader::new(tcp);
                let mut canary = 0;
                for _ in 0..N / 4 {
                    write!(w, "GET http://order-server.k1s0-service/ HTTP/1.1\r\nHost: order-server.k1s0-service\r\n\r\n").unwrap();
                    let mut len = 0;
                    let mut status = String::new();
                    r.read_line(&mut status).unwrap();
                    assert!(status.contains(" 200 "), "{status}");
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        if h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    if body.starts_with(b"canary") {
                        canary += 1;
                    }
                }
                canary
            })
        })
        .collect();
    let canary: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let (p, n) = (0.10, N as f64);
    let tolerance = 5.0 * (p * (1.0 - p) / n).sqrt();
    let share = canary as f64 / n;
    assert!(
        (share - p).abs() <= tolerance,
        "canary answered {canary} of {N}: {:.2} % (expected 10 % ± {:.2} %)",
        share * 100.0,
        tolerance * 100.0
    );
    up.stop();
}
