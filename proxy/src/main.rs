//! `musubi-proxy`: run the sidecar, or write a pod's iptables rules (`init`).

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "musubi-proxy", version, about = "Musubi sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the iptables rules that redirect a pod's traffic through the proxy.
    Init(musubi_proxy::init::InitArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Init(a) => musubi_proxy::init::run(a),
    };
    if let Err(e) = result {
        eprintln!("musubi-proxy: {e:#}");
        std::process::exit(e.exit_code());
    }
}
