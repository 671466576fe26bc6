//! `musubi-injector`: the HTTPS admission webhook.

use clap::Parser;
use musubi_injector::InjectConfig;
use musubi_injector::server::{self, ApiNamespaces, Webhook};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "musubi-injector",
    version,
    about = "Musubi's mutating admission webhook: adds the proxy to pods of namespaces annotated musubi.io/inject: enabled"
)]
struct Args {
    /// HTTPS listen address.
    #[arg(long, env = "MUSUBI_INJECTOR_LISTEN", default_value = "0.0.0.0:8443")]
    listen: String,
    /// Serving certificate chain (PEM), trusted by the webhook configuration's caBundle.
    #[arg(long, env = "MUSUBI_INJECTOR_TLS_CERT")]
    tls_cert: PathBuf,
    /// Serving key (PEM).
    #[arg(long, env = "MUSUBI_INJECTOR_TLS_KEY")]
    tls_key: PathBuf,
    /// Mesh configuration (`config.yaml` of the musubi-config ConfigMap).
    #[arg(long, env = "MUSUBI_INJECTOR_CONFIG")]
    config: PathBuf,
    /// Kubeconfig to reach the API server (default: in-cluster, then $KUBECONFIG).
    #[arg(long, env = "MUSUBI_INJECTOR_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
}

/// Exit code for bad configuration (EX_CONFIG).
const EX_CONFIG: i32 = 78;

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("musubi-injector: {what}: {e}");
    std::process::exit(EX_CONFIG)
}

fn main() {
    musubi_identity::logging::init("info");
    let args = Args::parse();
    musubi_identity::crypto::install_default();
    let read = |p: &PathBuf, what: &str| {
        std::fs::read(p).unwrap_or_else(|e| fail(&format!("{what} {}", p.display()), e))
    };
    let cfg_text =
        String::from_utf8(read(&args.config, "--config")).unwrap_or_else(|e| fail("--config", e));
    let config = InjectConfig::parse(&cfg_text)
        .unwrap_or_else(|e| fail(&format!("--config {}", args.config.display()), e));
    let tls = musubi_identity::tls::webhook_server_config(
        &read(&args.tls_cert, "--tls-cert"),
        &read(&args.tls_key, "--tls-key"),
    )
    .unwrap_or_else(|e| fail("--tls-cert/--tls-key", e));
    let rt = musubi_identity::logging::runtime_or_exit("musubi-injector");
    rt.block_on(async move {
        let client = match &args.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .unwrap_or_else(|e| fail("--kubeconfig", e));
                let c = kube::Config::from_custom_kubeconfig(kc, &Default::default())
                    .await
                    .unwrap_or_else(|e| fail("--kubeconfig", e));
                kube::Client::try_from(c).unwrap_or_else(|e| fail("--kubeconfig", e))
            }
            None => kube::Client::try_default()
                .await
                .unwrap_or_else(|e| fail("Kubernetes client", e)),
        };
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .unwrap_or_else(|e| fail(&format!("--listen {}", args.listen), e));
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(%addr, "injector listening");
        let hook = Webhook::new(config, Arc::new(ApiNamespaces(client)));
        tokio::select! {
            () = server::serve(listener, tls, hook) => {}
            _ = tokio::signal::ctrl_c() => {}
            () = sigterm() => {}
        }
        tracing::info!("injector stopping");
    });
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
