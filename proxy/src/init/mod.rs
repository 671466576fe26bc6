//! `musubi-proxy init`: iptables rules for a pod's network namespace (being written).

/// Arguments of `musubi-proxy init`.
#[derive(clap::Args, Debug)]
pub struct InitArgs {}

#[derive(Debug, thiserror::Error)]
#[error("not implemented yet")]
pub struct InitError;

impl InitError {
    pub fn exit_code(&self) -> i32 {
        1
    }
}

pub fn run(_args: InitArgs) -> Result<(), InitError> {
    Err(InitError)
}
