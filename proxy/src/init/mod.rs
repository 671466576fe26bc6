//! `musubi-proxy init`: writes the iptables rules that send a pod's TCP through the proxy
//! (inbound to the inbound listener, outbound to the outbound listener), for IPv4 and IPv6.
//! [`rules`] decides the rules from the arguments (pure); [`apply`] finds the iptables backend
//! and runs `iptables-restore --noflush`. See docs/init.md.

pub mod apply;
pub mod rules;

use apply::Requested;
use rules::{Family, Plan, RawPlan};

/// Exit code for bad arguments (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// Arguments of `musubi-proxy init`. Values are validated by [`Plan::parse`] so that every
/// bad value gets the same clear message and exit code.
#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {
    /// UID the proxy runs as; its own connections are never redirected.
    #[arg(long, default_value = "2102")]
    pub proxy_uid: String,
    /// Port of the proxy's inbound listener (redirect target for inbound TCP).
    #[arg(long, default_value = "4143")]
    pub inbound_port: String,
    /// Port of the proxy's outbound listener (redirect target for outbound TCP).
    #[arg(long, default_value = "4140")]
    pub outbound_port: String,
    /// Port of the proxy's admin server (never redirected).
    #[arg(long, default_value = "4191")]
    pub admin_port: String,
    /// Inbound destination ports not to redirect, e.g. `22,8000-8100`.
    #[arg(long, default_value = "")]
    pub skip_inbound_ports: String,
    /// Outbound destination ports not to redirect, e.g. `25,587,3306`.
    #[arg(long, default_value = "")]
    pub skip_outbound_ports: String,
    /// Outbound destination networks not to redirect, e.g. `169.254.169.254/32,fd00::/8`.
    #[arg(long, default_value = "")]
    pub skip_outbound_cidrs: String,
    /// Which iptables backend to write to: nft, legacy or auto (detect).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Leave IPv6 alone (for kernels without IPv6).
    #[arg(long)]
    pub no_ipv6: bool,
    /// Print the rules (iptables-restore format) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl Default for InitArgs {
    fn default() -> Self {
        InitArgs {
            proxy_uid: "2102".into(),
            inbound_port: "4143".into(),
            outbound_port: "4140".into(),
            admin_port: "4191".into(),
            skip_inbound_ports: String::new(),
            skip_outbound_ports: String::new(),
            skip_outbound_cidrs: String::new(),
            backend: "auto".into(),
            no_ipv6: false,
            dry_run: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("bad argument {0}")]
    Args(#[from] rules::ArgError),
    #[error(transparent)]
    Exec(#[from] apply::ExecError),
}

impl InitError {
    pub fn exit_code(&self) -> i32 {
        match self {
            InitError::Args(_) => EXIT_USAGE,
            InitError::Exec(_) => 1,
        }
    }
}

/// Validates the arguments into a plan and the requested backend.
pub fn plan(args: &InitArgs) -> Result<(Plan, Requested), InitError> {
    let plan = Plan::parse(&RawPlan {
        proxy_uid: &args.proxy_uid,
        inbound_port: &args.inbound_port,
        outbound_port: &args.outbound_port,
        admin_port: &args.admin_port,
        skip_inbound_ports: &args.skip_inbound_ports,
        skip_outbound_ports: &args.skip_outbound_ports,
        skip_outbound_cidrs: &args.skip_outbound_cidrs,
        ipv6: !args.no_ipv6,
    })?;
    let requested: Requested = args.backend.parse()?;
    Ok((plan, requested))
}

pub fn run(args: InitArgs) -> Result<(), InitError> {
    let (plan, requested) = plan(&args)?;
    if args.dry_run {
        print!("{}", rules::render_all(&plan));
        return Ok(());
    }
    let backend = apply::detect(requested)?;
    apply::apply(&plan, Family::V4, backend)?;
    if plan.ipv6 {
        apply::apply(&plan, Family::V6, backend)?;
    }
    eprintln!(
        "musubi-proxy init: rules written ({backend:?} backend{})",
        if plan.ipv6 {
            ", IPv4 and IPv6"
        } else {
            ", IPv4"
        }
    );
    Ok(())
}
