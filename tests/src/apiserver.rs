//! A real Kubernetes API server for the tests: etcd + kube-apiserver (built from their Go
//! modules by `scripts/k8s-tools.sh`) on 127.0.0.1, with a service-account issuer and signing
//! key (TokenRequest/TokenReview work), RBAC, the admission webhooks, and an admin client
//! certificate. There is no kubelet or controller-manager: pods stay Pending and nothing
//! creates ReplicaSets, default service accounts or endpoints; tests create what they need.
//!
//! One API server per test process ([`shared`]), started on first use. Its processes run
//! under `setpriv --pdeathsig KILL` from a thread that lives as long as the process, so they
//! go away when the test binary exits, however it exits.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The issuer the API server writes into service-account tokens.
pub const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// Where `scripts/k8s-tools.sh` put the binaries (`MUSUBI_K8S_BIN` overrides).
pub fn bin_dir() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("MUSUBI_K8S_BIN") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var("HOME").ok()?;
    let base = Path::new(&home).join(".cache/musubi/k8s");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(&base)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("kube-apiserver").exists() && p.join("etcd").exists())
        .collect();
    versions.sort();
    versions.pop()
}

/// A running API server and what a client needs to reach it.
pub struct ApiServer {
    pub url: String,
    pub dir: PathBuf,
    /// Admin kubeconfig (system:masters).
    pub kubeconfig: PathBuf,
    pub bin: PathBuf,
    /// PEM of the CA that signed the serving certificate (and client certificates).
    pub ca_pem: String,
    ca: (CertificateParams, KeyPair),
    /// Asks the thread that owns the processes to restart kube-apiserver; it answers when the
    /// new one is ready.
    restart: std::sync::Mutex<Option<std::sync::mpsc::Sender<std::sync::mpsc::Sender<()>>>>,
}

impl ApiServer {
    /// A client with admin rights.
    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("kube config");
        kube::Client::try_from(cfg).expect("kube client")
    }

    /// A kubeconfig for a client certificate with `user` and `groups` (for RBAC tests).
    pub fn kubeconfig_for(&self, user: &str, groups: &[&str]) -> PathBuf {
        let (cert, key) = client_cert(&self.ca, user, groups);
        let path = self.dir.join(format!("kubeconfig-{user}"));
        std::fs::write(&path, kubeconfig_yaml(&self.url, &self.ca_pem, &cert, &key)).unwrap();
        path
    }

    /// Stops kube-apiserver and starts it again on the same port and etcd (the state survives);
    /// returns once it is ready. Blocking: call it from `spawn_blocking` in async tests.
    pub fn restart_apiserver(&self) {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        self.restart
            .lock()
            .unwrap()
            .as_ref()
            .expect("restart channel")
            .send(done_tx)
            .unwrap();
        done_rx.recv().unwrap();
    }

    /// Runs a tool from the bin directory (`kubectl`, `helm`) with the admin kubeconfig.
    pub fn tool(&self, name: &str) -> Command {
        let mut c = Command::new(self.bin.join(name));
        c.env("KUBECONFIG", &self.kubeconfig);
        c.env("HOME", &self.dir);
        c
    }
}

static SHARED: OnceLock<Option<ApiServer>> = OnceLock::new();

/// The test process's API server, started on first use; `None` (with a message) when the
/// binaries are not installed, so a test can print SKIPPED.
pub fn shared() -> Option<&'static ApiServer> {
    SHARED
        .get_or_init(|| {
            let Some(bin) = bin_dir() else {
                assert!(
                    std::env::var_os("MUSUBI_REQUIRE_K8S").is_none(),
                    "MUSUBI_REQUIRE_K8S is set but kube-apiserver/etcd are not built (scripts/k8s-tools.sh)"
                );
                eprintln!(
                    "SKIPPED: kube-apiserver/etcd not built; run ./scripts/k8s-tools.sh (the test command does)"
                );
                return None;
            };
            let (tx, rx) = std::sync::mpsc::channel();
            // The children's parent-death signal fires when this thread ends: keep it alive.
            std::thread::spawn(move || {
                let (api, mut children, apiserver_args) = start(bin);
                let (restart_tx, restart_rx) =
                    std::sync::mpsc::channel::<std::sync::mpsc::Sender<()>>();
                *api.restart.lock().unwrap() = Some(restart_tx);
                let (bin, dir) = (api.bin.clone(), api.dir.clone());
                tx.send(api).unwrap();
                // The static keeps the sender, so this loop (and the thread) lives as long as
                // the process.
                while let Ok(done) = restart_rx.recv() {
                    let _ = children[1].kill();
                    let _ = children[1].wait();
                    children[1] = spawn(&bin, "kube-apiserver", &apiserver_args, &dir);
                    let api = SHARED.get().and_then(Option::as_ref).expect("started");
                    wait_ready(api, &dir, &mut children);
                    let _ = done.send(());
                }
            });
            Some(rx.recv().unwrap())
        })
        .as_ref()
}

/// Skips the calling test (returns) when there is no API server.
#[macro_export]
macro_rules! api_server_or_skip {
    () => {
        match $crate::apiserver::shared() {
            Some(api) => api,
            None => return,
        }
    };
}

/// A client certificate for `user` in `groups`, signed by the API server's client CA.
fn client_cert(ca: &(CertificateParams, KeyPair), user: &str, groups: &[&str]) -> (String, String) {
    let issuer = Issuer::from_params(&ca.0, &ca.1);
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, user);
    for g in groups {
        dn.push(DnType::OrganizationName, *g);
    }
    p.distinguished_name = dn;
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ca() -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "musubi-test-kubernetes-ca");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key).unwrap();
    let pem = cert.pem();
    (p, key, pem)
}

fn kubeconfig_yaml(url: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> String {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    certificate-authority-data: {}\nusers:\n- name: user\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: user\ncurrent-context: test\n",
        b64(ca_pem),
        b64(cert_pem),
        b64(key_pem)
    )
}

fn spawn(bin: &Path, name: &str, args: &[String], dir: &Path) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--"])
        .arg(bin.join(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {name}: {e}"))
}

const DIR_PREFIX: &str = "musubi-kube-";
const OWNER_FILE: &str = "owner.pid";

/// Removes the working directories (etcd's data is ~130 MB each) that earlier test processes
/// left behind: the directory has to outlive this process's last test, so nothing removes it
/// at exit; the next run does, once its owner is gone.
fn remove_stale_dirs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let named = entry.file_name().to_string_lossy().starts_with(DIR_PREFIX);
        let owner = std::fs::read_to_string(path.join(OWNER_FILE)).ok();
        let gone = owner
            .and_then(|pid| pid.trim().parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if named && gone {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn start(bin: PathBuf) -> (ApiServer, Vec<Child>, Vec<String>) {
    remove_stale_dirs(&std::env::temp_dir());
    let dir = tempfile::Builder::new()
        .prefix(DIR_PREFIX)
        .tempdir()
        .unwrap()
        .keep();
    std::fs::write(dir.join(OWNER_FILE), std::process::id().to_string()).unwrap();
    let (ca_params, ca_key, ca_pem) = ca();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let serving_key = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    sp.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving = sp.signed_by(&serving_key, &issuer).unwrap();
    let sa_key = KeyPair::generate().unwrap();
    let files = [
        ("ca.crt", ca_pem.clone()),
        ("serving.crt", serving.pem()),
        ("serving.key", serving_key.serialize_pem()),
        ("sa.key", sa_key.serialize_pem()),
        ("sa.pub", sa_key.public_key_pem()),
    ];
    for (name, contents) in &files {
        std::fs::write(dir.join(name), contents).unwrap();
    }
    let p = |f: &str| dir.join(f).display().to_string();

    let etcd_port = free_port();
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let etcd = spawn(
        &bin,
        "etcd",
        &[
            format!("--data-dir={}", p("etcd")),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls=http://127.0.0.1:{}", free_port()),
            "--log-level=warn".into(),
            "--quota-backend-bytes=536870912".into(),
            "--unsafe-no-fsync".into(),
        ],
        &dir,
    );
    let port = free_port();
    let apiserver_args: Vec<String> = vec![
        format!("--etcd-servers={etcd_url}"),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        // No `kubernetes` Service endpoints: the reconciler refuses a loopback address.
        "--endpoint-reconciler-type=none".into(),
        format!("--secure-port={port}"),
        format!("--tls-cert-file={}", p("serving.crt")),
        format!("--tls-private-key-file={}", p("serving.key")),
        format!("--client-ca-file={}", p("ca.crt")),
        format!("--service-account-issuer={SA_ISSUER}"),
        format!("--service-account-key-file={}", p("sa.pub")),
        format!("--service-account-signing-key-file={}", p("sa.key")),
        format!("--api-audiences={SA_ISSUER}"),
        "--service-cluster-ip-range=10.96.0.0/16".into(),
        "--authorization-mode=RBAC".into(),
        "--enable-admission-plugins=MutatingAdmissionWebhook,ValidatingAdmissionWebhook".into(),
        format!("--cert-dir={}", p("certs")),
        "--v=1".into(),
    ];
    let apiserver = spawn(&bin, "kube-apiserver", &apiserver_args, &dir);
    let url = format!("https://127.0.0.1:{port}");
    let ca = (ca_params, ca_key);
    let (cert, key) = client_cert(&ca, "musubi-test-admin", &["system:masters"]);
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, kubeconfig_yaml(&url, &ca_pem, &cert, &key)).unwrap();
    let api = ApiServer {
        url,
        dir: dir.clone(),
        kubeconfig,
        bin,
        ca_pem,
        ca,
        restart: std::sync::Mutex::new(None),
    };
    let mut children = vec![etcd, apiserver];
    wait_ready(&api, &dir, &mut children);
    (api, children, apiserver_args)
}

/// Waits for `/readyz` (all post-start hooks done: RBAC bootstrap roles, system namespaces).
fn wait_ready(api: &ApiServer, dir: &Path, children: &mut [Child]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    let log_tail = |name: &str| {
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    };
    loop {
        for (child, name) in children.iter_mut().zip(["etcd", "kube-apiserver"]) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{name} exited ({status}); last log lines:\n{}",
                    log_tail(name)
                );
            }
        }
        let out = api
            .tool("kubectl")
            .args(["get", "--raw", "/readyz"])
            .output()
            .unwrap();
        if out.status.success() {
            // The default namespace exists once the bootstrap controller has run.
            let ns = api
                .tool("kubectl")
                .args(["get", "namespace", "default", "-o", "name"])
                .output()
                .unwrap();
            if ns.status.success() {
                return;
            }
        }
        if Instant::now() > deadline {
            panic!(
                "kube-apiserver not ready after 90 s; last log lines:\n{}",
                log_tail("kube-apiserver")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
