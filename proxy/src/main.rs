//! `musubi-proxy`: run the sidecar (configured by `MUSUBI_PROXY_*` environment variables), or
//! write a pod's iptables rules (`init`).

use clap::{Parser, Subcommand};
use musubi_proxy::config::{Config, Env};
use musubi_proxy::run;

/// Exit code for a bad configuration (EX_USAGE).
const EXIT_CONFIG: i32 = 64;

#[derive(Parser)]
#[command(name = "musubi-proxy", version, about = "Musubi sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default). Configuration comes from MUSUBI_PROXY_* variables.
    Run,
    /// Write the iptables rules that redirect a pod's traffic through the proxy.
    Init(musubi_proxy::init::InitArgs),
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Init(a)) => {
            if let Err(e) = musubi_proxy::init::run(a) {
                eprintln!("musubi-proxy init: {e:#}");
                std::process::exit(e.exit_code());
            }
        }
        None | Some(Command::Run) => {
            musubi_identity::crypto::install_default();
            musubi_identity::logging::init("info");
            let config = match Config::from_source(&Env) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("musubi-proxy: bad configuration: {e}");
                    std::process::exit(EXIT_CONFIG);
                }
            };
            let mut builder = if config.workers == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(config.workers);
                b
            };
            let rt = match builder.enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("musubi-proxy: cannot start the runtime: {e}");
                    std::process::exit(1);
                }
            };
            if let Err(e) = rt.block_on(run::serve_until_signal(config)) {
                eprintln!("musubi-proxy: {e}");
                std::process::exit(EXIT_CONFIG);
            }
        }
    }
}
