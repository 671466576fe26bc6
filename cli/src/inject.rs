//! `musubi inject FILE|-`: the webhook's patch applied offline to YAML manifests.

use musubi_injector::InjectConfig;
use std::io::Read as _;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct InjectArgs {
    /// Manifest file, or `-` for standard input.
    pub file: String,
    /// Trust anchors (PEM) the proxies verify peers against (default: read from the cluster's
    /// musubi-config ConfigMap).
    #[arg(long)]
    pub trust_anchors: Option<PathBuf>,
    /// Mesh configuration (the musubi-config ConfigMap's config.yaml) instead of the cluster's.
    #[arg(long, conflicts_with = "trust_anchors")]
    pub config: Option<PathBuf>,
    /// The control plane's namespace.
    #[arg(long, default_value = "musubi-system")]
    pub namespace: String,
    /// Proxy image (default: the chart's).
    #[arg(long)]
    pub proxy_image: Option<String>,
}

async fn config(a: &InjectArgs) -> anyhow::Result<InjectConfig> {
    use anyhow::Context as _;
    let mut cfg = if let Some(path) = &a.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--config {}", path.display()))?;
        InjectConfig::parse(&text)
            .map_err(|e| anyhow::anyhow!("--config {}: {e}", path.display()))?
    } else if let Some(path) = &a.trust_anchors {
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("--trust-anchors {}", path.display()))?;
        let mut c = InjectConfig::with_anchors(pem);
        c.control_plane_namespace = a.namespace.clone();
        c
    } else {
        let client = kube::Client::try_default().await.context(
            "no --trust-anchors or --config given, and no cluster to read musubi-config from",
        )?;
        let cm =
            kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client, &a.namespace)
                .get("musubi-config")
                .await
                .with_context(|| format!("reading ConfigMap {}/musubi-config", a.namespace))?;
        let text = cm
            .data
            .and_then(|d| d.get("config.yaml").cloned())
            .ok_or_else(|| anyhow::anyhow!("ConfigMap musubi-config has no config.yaml"))?;
        InjectConfig::parse(&text).map_err(|e| anyhow::anyhow!("musubi-config: {e}"))?
    };
    if let Some(image) = &a.proxy_image {
        cfg.proxy.image = image.clone();
    }
    Ok(cfg)
}

/// Prints the injected manifests on stdout and one line per workload on stderr.
pub async fn run(a: InjectArgs) -> anyhow::Result<()> {
    let text = if a.file == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(&a.file).map_err(|e| anyhow::anyhow!("{}: {e}", a.file))?
    };
    let cfg = config(&a).await?;
    let (out, outcomes) = musubi_injector::manifest::inject(&text, &cfg)?;
    print!("{out}");
    for o in outcomes {
        eprintln!("{} {}", o.resource, o.result);
    }
    Ok(())
}
