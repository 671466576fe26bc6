//! `musubi-bench`: reproducible whole-system benchmarks. See bench/README.md.

mod certify;
mod mesh;
mod sys;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "musubi-bench",
    about = "Musubi benchmarks (see bench/README.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Certificates per second: raw signing in-process, and end to end over gRPC+TLS against
    /// a `musubi-identity serve` process pinned to one core.
    Certify(certify::Args),
    /// What a mesh costs: baseline vs a Musubi proxy pair vs an Envoy pair, side by side.
    Mesh(mesh::Args),
    /// The benchmark's backend (started by `mesh` as its own process).
    #[command(hide = true)]
    Backend(mesh::backend::Args),
}

fn main() -> Result<()> {
    musubi_identity::crypto::install_default();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match cli.command {
            Command::Certify(a) => certify::run(a).await,
            Command::Mesh(a) => mesh::run(a).await,
            Command::Backend(a) => mesh::backend::run(a).await,
        }
    })
}
