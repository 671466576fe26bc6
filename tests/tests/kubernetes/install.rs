//! The Helm chart installed into the real API server (`helm template` + server-side apply):
//! every object accepted; then `musubi check` reads the installation, and flags an expired
//! issuer.

use crate::support::{ok, with_stdin};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use musubi::check::{self, Level};
use musubi_identity::TrustDomain;
use musubi_identity::ca::{generate_issuer, generate_root};
use musubi_tests::apiserver::ApiServer;
use std::path::Path;
use std::time::{Duration, SystemTime};

const NS: &str = "musubi-system";
const DAY: Duration = Duration::from_secs(86400);

fn render(api: &ApiServer, files: &Path) -> String {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/musubi");
    let certs: Vec<String> = [
        ("identity.trustAnchorsPEM", "ca.crt"),
        ("identity.issuer.crtPEM", "issuer.crt"),
        ("identity.issuer.keyPEM", "issuer.key"),
    ]
    .iter()
    .flat_map(|(k, f)| {
        [
            "--set-file".to_string(),
            format!("{k}={}", files.join(f).display()),
        ]
    })
    .collect();
    let out = api
        .tool("helm")
        .args(["template", "musubi"])
        .arg(&chart)
        .args(["--namespace", NS, "--include-crds"])
        // Other tests share this API server: a webhook for every namespace with no injector
        // behind it must not refuse their pods.
        .args(["--set", "injector.failurePolicy=Ignore"])
        .args(&certs)
        .output()
        .unwrap();
    let lint = api
        .tool("helm")
        .arg("lint")
        .arg(&chart)
        .args(&certs)
        .output()
        .unwrap();
    let said = ok(&lint, "helm lint");
    assert!(
        said.contains("0 chart(s) failed") && !said.contains("[WARNING]"),
        "{said}"
    );
    ok(&out, "helm template")
}

#[tokio::test]
async fn chart_installs_and_check_flags_an_expired_issuer() {
    let api = musubi_tests::api_server_or_skip!();
    let kube = api.client().await;
    let td = TrustDomain::new("cluster.local").unwrap();
    let now = SystemTime::now();
    let root = generate_root(&td, 3650 * DAY, now).unwrap();
    let issuer = generate_issuer(&td, &root.cert_pem, &root.key_pem, 365 * DAY, now).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), &root.cert_pem).unwrap();
    std::fs::write(dir.path().join("issuer.crt"), &issuer.cert_pem).unwrap();
    std::fs::write(dir.path().join("issuer.key"), &issuer.key_pem).unwrap();

    let manifests = render(api, dir.path());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(NS.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(kube.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let mut apply = api.tool("kubectl");
    apply.args([
        "apply",
        "--server-side",
        "--field-manager=musubi-test",
        "-f",
        "-",
    ]);
    let applied = ok(
        &with_stdin(apply, &manifests),
        "kubectl apply --server-side",
    );
    let objects = manifests
        .split("\n---")
        .filter(|d| d.lines().any(|l| l.starts_with("kind:")))
        .count();
    let accepted = applied
        .lines()
        .filter(|l| l.ends_with("serverside-applied"))
        .count();
    assert_eq!(
        accepted, objects,
        "every rendered object accepted:\n{applied}"
    );
    for kind in [
        "customresourcedefinition.apiextensions.k8s.io/meshtls.policy.musubi.io",
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/musubi-injector",
        "deployment.apps/musubi-identity",
        "deployment.apps/musubi-controller",
        "deployment.apps/musubi-injector",
        "clusterrole.rbac.authorization.k8s.io/musubi-controller",
        "poddisruptionbudget.policy/musubi-identity",
        "secret/musubi-identity-issuer",
        "secret/musubi-injector-tls",
        "configmap/musubi-config",
    ] {
        assert!(applied.contains(kind), "{kind} missing from:\n{applied}");
    }
    // The stored injector config is what the injector parses.
    let cm = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(kube.clone(), NS)
        .get("musubi-config")
        .await
        .unwrap();
    let cfg = musubi_injector::InjectConfig::parse(&cm.data.unwrap()["config.yaml"]).unwrap();
    assert_eq!(cfg.control_plane_namespace, NS);
    assert!(
        cfg.trust_anchors_pem
            .contains(root.cert_pem.lines().nth(1).unwrap())
    );

    let findings = check::run(&kube, NS, SystemTime::now()).await;
    let level_of = |fs: &[check::Finding], what: &str| {
        fs.iter()
            .find(|f| f.what == what)
            .unwrap_or_else(|| panic!("no finding {what:?} in {fs:#?}"))
            .level
    };
    assert_eq!(
        level_of(&findings, "CRD meshtls.policy.musubi.io"),
        Level::Ok
    );
    assert_eq!(level_of(&findings, "issuer certificate"), Level::Ok);
    assert_eq!(level_of(&findings, "trust anchor"), Level::Ok);
    // No kubelet here: nothing runs, and check says so.
    assert_eq!(
        level_of(&findings, "deployment musubi-system/musubi-identity"),
        Level::Fail
    );
    assert_eq!(level_of(&findings, "injector webhook"), Level::Fail);

    // An expired issuer is flagged.
    let long_ago = now - 400 * DAY;
    let old_root = generate_root(&td, 3650 * DAY, long_ago).unwrap();
    let expired = generate_issuer(
        &td,
        &old_root.cert_pem,
        &old_root.key_pem,
        30 * DAY,
        long_ago,
    )
    .unwrap();
    let patch = serde_json::json!({ "stringData": { "tls.crt": expired.cert_pem, "tls.key": expired.key_pem } });
    Api::<Secret>::namespaced(kube.clone(), NS)
        .patch(
            "musubi-identity-issuer",
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .unwrap();
    let findings = check::run(&kube, NS, SystemTime::now()).await;
    let issuer = findings
        .iter()
        .find(|f| f.what == "issuer certificate")
        .unwrap();
    assert_eq!(issuer.level, Level::Fail, "{issuer}");
    assert!(issuer.detail.starts_with("expired 3"), "{issuer}");

    // `musubi install` prints the same chart, and the API server accepts all of it.
    let printed = musubi::install::render(&musubi::install::generate(SystemTime::now()).unwrap());
    let mut dry = api.tool("kubectl");
    dry.args([
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "--field-manager=musubi-test",
        "-f",
        "-",
    ]);
    let said = ok(
        &with_stdin(dry, &printed),
        "musubi install | kubectl apply --dry-run=server",
    );
    assert!(
        said.contains("namespace/musubi-system serverside-applied (server dry run)"),
        "{said}"
    );
    assert!(
        said.contains("deployment.apps/musubi-injector serverside-applied (server dry run)"),
        "{said}"
    );

    // Leave the shared API server without a cluster-wide webhook.
    let mut del = api.tool("kubectl");
    del.args(["delete", "mutatingwebhookconfiguration", "musubi-injector"]);
    ok(&del.output().unwrap(), "kubectl delete webhook");
}

/// The manifests `musubi install` embeds are what the chart renders today.
#[test]
fn musubi_install_embeds_the_current_chart() {
    let Some(bin) = musubi_tests::apiserver::bin_dir() else {
        assert!(
            std::env::var_os("MUSUBI_REQUIRE_K8S").is_none(),
            "helm not built"
        );
        eprintln!("SKIPPED: helm not built (scripts/k8s-tools.sh)");
        return;
    };
    let out = tempfile::NamedTempFile::new().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/render-install.sh");
    let status = std::process::Command::new(script)
        .arg(out.path())
        .env("MUSUBI_K8S_BIN", bin)
        .status()
        .unwrap();
    assert!(status.success());
    let fresh = std::fs::read_to_string(out.path()).unwrap();
    assert!(
        fresh == musubi::install::MANIFESTS,
        "cli/src/install/manifests.yaml is stale: run scripts/render-install.sh"
    );
}

/// `gatewayAPI.installCRDs=true` renders Gateway API's route CRDs (kept on uninstall), unless
/// the cluster has them from someone else already.
#[tokio::test]
async fn the_chart_installs_gateway_api_crds_only_where_missing() {
    let api = musubi_tests::api_server_or_skip!();
    let fetched = std::process::Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gateway-api-crds.sh"),
    )
    .output()
    .unwrap();
    ok(&fetched, "scripts/gateway-api-crds.sh");
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/musubi");
    let template = |install: bool, server: bool| {
        let mut helm = api.tool("helm");
        helm.args(["template", "musubi"]).arg(&chart);
        helm.args(["--namespace", NS, "--set"]);
        helm.arg(format!("gatewayAPI.installCRDs={install}"));
        for v in [
            "identity.trustAnchorsPEM=-----BEGIN CERTIFICATE----- x",
            "identity.issuer.crtPEM=x",
            "identity.issuer.keyPEM=x",
            "injector.tls.crtPEM=x",
            "injector.tls.keyPEM=x",
            "injector.tls.caPEM=x",
        ] {
            helm.args(["--set", v]);
        }
        if server {
            helm.arg("--dry-run=server");
        }
        ok(&helm.output().unwrap(), "helm template")
    };
    let with = template(true, false);
    assert!(with.contains("name: httproutes.gateway.networking.k8s.io"));
    assert!(with.contains("name: grpcroutes.gateway.networking.k8s.io"));
    assert!(with.contains("helm.sh/resource-policy: keep"));
    assert!(!template(false, false).contains("httproutes.gateway.networking.k8s.io"));
    // Installed by someone else (kubectl here): left alone.
    let mut apply = api.tool("kubectl");
    apply.args(["apply", "--server-side", "--force-conflicts", "-f"]);
    apply.arg(chart.join("gateway-api/httproutes.yaml"));
    ok(&apply.output().unwrap(), "kubectl apply (HTTPRoute CRD)");
    let live = template(true, true);
    assert!(
        !live.contains("name: httproutes.gateway.networking.k8s.io"),
        "an existing CRD is not taken over"
    );
}
