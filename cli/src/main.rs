//! `musubi`: the command users type. `musubi up` runs a whole mesh on this machine.

use clap::{Parser, Subcommand};

mod control_plane;
mod credentials;
mod demo;
mod spec;
mod supervise;
mod up;

#[derive(Parser)]
#[command(name = "musubi", version, about = "Musubi service mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole mesh on this machine: identity service, controller, and a proxy in front of
    /// every service (a demo mesh, or your services with -f mesh.yaml).
    Up(up::UpArgs),
    /// Print the control plane's Kubernetes manifests (`musubi install | kubectl apply
    /// --server-side -f -`), with a new trust anchor and issuer unless you give yours.
    Install(musubi::install::InstallArgs),
    /// Add the Musubi proxy to the workloads in Kubernetes YAML (like the injector webhook does).
    Inject(musubi::inject::InjectArgs),
    /// Check Musubi in the current cluster: control plane, webhook, CRDs, certificates.
    Check {
        /// The control plane's namespace.
        #[arg(long, default_value = "musubi-system")]
        namespace: String,
    },
    /// Run a proxy (configured by MUSUBI_PROXY_* variables), as `musubi up` does for each service.
    #[command(hide = true)]
    Proxy,
    /// Run one of the demo applications.
    #[command(hide = true)]
    Demo {
        #[arg(value_enum)]
        app: demo::App,
    },
    /// Run a program so that it (and whatever it starts) ends when the parent ends, as
    /// `musubi up` does for each proxy and application.
    #[command(hide = true)]
    Supervise(supervise::SuperviseArgs),
}

fn main() {
    musubi_identity::crypto::install_default();
    musubi_identity::logging::init("warn");
    let cli = Cli::parse();
    let rt = musubi_identity::logging::runtime_or_exit("musubi");
    let result = rt.block_on(async {
        match cli.command {
            Command::Up(a) => up::up(a).await,
            Command::Inject(a) => musubi::inject::run(a).await,
            Command::Install(a) => musubi::install::run(a),
            Command::Check { namespace } => check(&namespace).await,
            Command::Proxy => proxy().await,
            Command::Demo { app } => demo::run(app).await,
            Command::Supervise(a) => supervise::run(a).await.map(|code| std::process::exit(code)),
        }
    });
    if let Err(e) = result {
        eprintln!("musubi: {e:#}");
        std::process::exit(1);
    }
}

async fn check(namespace: &str) -> anyhow::Result<()> {
    use musubi::check::Level;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach a cluster (in-cluster or $KUBECONFIG): {e}"))?;
    let findings = musubi::check::run(&client, namespace, std::time::SystemTime::now()).await;
    for f in &findings {
        println!("{f}");
    }
    let worst = findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok);
    match worst {
        Level::Fail => anyhow::bail!("some checks failed"),
        Level::Warn => println!("\nStatus: ok, with warnings"),
        Level::Ok => println!("\nStatus: ok"),
    }
    Ok(())
}

async fn proxy() -> anyhow::Result<()> {
    use musubi_proxy::config::{Config, Env};
    let config =
        Config::from_source(&Env).map_err(|e| anyhow::anyhow!("bad configuration: {e}"))?;
    Ok(musubi_proxy::run::serve_until_signal(config).await?)
}
