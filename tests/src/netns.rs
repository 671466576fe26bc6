//! Network namespaces for the transparent-capture tests: create them (deleted on drop), link
//! them with veth pairs, run commands inside them (`ip netns exec`), and open sockets inside
//! them from this process (a short-lived thread joins the namespace with `setns`; the socket
//! stays in that namespace whatever thread uses it afterwards).
//!
//! These tests need root and `ip netns`; [`skip_reason`] says why they cannot run so the
//! tests print it and pass instead of failing on a laptop.

use nix::sched::{CloneFlags, setns};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Why namespace tests cannot run here, or `None` when they can.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Some(format!(
                "`ip netns` unavailable: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Err(e) => return Some(format!("`ip` not found ({e}); install iproute2")),
    }
    if Command::new("iptables-restore")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some("iptables-restore not found; install iptables".into());
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        return Some("setpriv not found; install util-linux".into());
    }
    None
}

/// Prints why the test is skipped and returns true, or returns false when it can run. With
/// `MUSUBI_REQUIRE_NETNS` set (CI), a test that cannot run fails instead.
pub fn skip(test: &str) -> bool {
    match skip_reason() {
        Some(why) if std::env::var_os("MUSUBI_REQUIRE_NETNS").is_some() => {
            panic!("MUSUBI_REQUIRE_NETNS is set but {test} cannot run: {why}")
        }
        Some(why) => {
            println!("SKIPPED {test}: {why} (needs root, iproute2 and iptables)");
            true
        }
        None => false,
    }
}

/// Whether the kernel has IPv6.
pub fn ipv6() -> bool {
    std::path::Path::new("/proc/sys/net/ipv6").exists()
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A unique short tag (pid + counter) for namespace and interface names.
pub fn unique() -> String {
    format!(
        "{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace, deleted (with its interfaces and sockets' routes) when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(role: &str) -> Netns {
        let name = format!("musubi-{role}-{}", unique());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `ip netns exec <ns> args...`, returning its output whatever the exit status.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("ip netns exec")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// Like [`Netns::exec`], panicking with stderr unless it succeeds; returns stdout.
    pub fn run(&self, args: &[&str]) -> String {
        run(&mut self.command(args))
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    }

    /// Runs `fut` to completion on a fresh single-threaded runtime whose thread is inside
    /// this namespace (so its connections start here). Blocks the calling worker.
    pub fn block_on<F>(&self, fut: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        tokio::task::block_in_place(|| {
            std::thread::scope(|s| {
                s.spawn(move || {
                    let file = std::fs::File::open(&path).expect("open netns");
                    setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime")
                        .block_on(fut)
                })
                .join()
                .expect("netns thread")
            })
        })
    }

    /// A listener inside this namespace (call from within a Tokio runtime).
    pub fn listen(&self, addr: &str) -> tokio::net::TcpListener {
        let addr: SocketAddr = addr.parse().expect("listen address");
        let std = self
            .enter(move || std::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        std.set_nonblocking(true).unwrap();
        tokio::net::TcpListener::from_std(std).unwrap()
    }

    /// Connects from inside this namespace (as this process's UID).
    pub fn connect(&self, addr: &str) -> std::io::Result<std::net::TcpStream> {
        let addr: SocketAddr = addr.parse().expect("connect address");
        self.enter(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)))
    }

    /// `GET path` over plain HTTP/1.1 from inside this namespace, with no proxy settings:
    /// (status line, body).
    pub fn http_get(&self, addr: &str, path: &str) -> std::io::Result<(String, String)> {
        use std::io::{Read, Write};
        let mut tcp = self.connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            tcp,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut out = Vec::new();
        tcp.read_to_end(&mut out)?;
        let out = String::from_utf8_lossy(&out).into_owned();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((out.as_str(), ""));
        let status = head.lines().next().unwrap_or("").to_string();
        Ok((status, body.to_string()))
    }

    /// `iptables-save -t nat` (or ip6tables) inside this namespace.
    pub fn nat_rules(&self, v6: bool) -> String {
        self.run(&[
            if v6 {
                "ip6tables-save"
            } else {
                "iptables-save"
            },
            "-t",
            "nat",
        ])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Links `a` and `b` with a veth pair, giving each side its addresses (`10.1.0.1/24`,
/// `fd00::1/64`; IPv6 ones without duplicate-address detection). Returns the interface names.
pub fn link(a: &Netns, a_addrs: &[&str], b: &Netns, b_addrs: &[&str]) -> (String, String) {
    let tag = unique();
    let (ia, ib) = (format!("va{tag}"), format!("vb{tag}"));
    assert!(ia.len() <= 15, "interface name too long: {ia}");
    run(Command::new("ip").args([
        "link", "add", &ia, "netns", &a.name, "type", "veth", "peer", "name", &ib, "netns", &b.name,
    ]));
    for (ns, iface, addrs) in [(a, &ia, a_addrs), (b, &ib, b_addrs)] {
        for addr in addrs {
            let mut args = vec!["ip", "addr", "add", addr, "dev", iface.as_str()];
            if addr.contains(':') {
                args.push("nodad");
            }
            ns.run(&args);
        }
        ns.run(&["ip", "link", "set", iface, "up"]);
    }
    (ia, ib)
}

/// A child process killed (and reaped) when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `musubi-proxy` binary, built (once per test binary) from this workspace so it is never
/// stale. `MUSUBI_PROXY_BIN` names a prebuilt one instead.
pub fn proxy_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("MUSUBI_PROXY_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        let status = Command::new(cargo)
            .current_dir(&root)
            // `--bin` without `-p` resolves features for the whole workspace, as the test
            // build does, so the dependencies it built are reused rather than built again.
            .args(["build", "--quiet", "--bin", "musubi-proxy"])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building musubi-proxy failed");
        // target/debug/deps/<test> -> target/debug/musubi-proxy
        let exe = std::env::current_exe().expect("current exe");
        let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
        let bin = dir.join("musubi-proxy");
        assert!(bin.exists(), "{} not found", bin.display());
        bin
    })
    .clone()
}
