//! The pure half of `musubi-proxy init`: validated arguments in, `iptables-restore` text out.
//! Nothing here touches the system, so every decision is unit-tested with a table of cases.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;

/// Our chains in the `nat` table. Each is flushed and refilled on every run.
pub const PREROUTING: &str = "MUSUBI_PREROUTING";
pub const INBOUND_REDIRECT: &str = "MUSUBI_INBOUND_REDIRECT";
pub const OUTPUT: &str = "MUSUBI_OUTPUT";
pub const OUTBOUND_REDIRECT: &str = "MUSUBI_OUTBOUND_REDIRECT";

/// The rule in the built-in `PREROUTING` chain that sends TCP to our chain.
pub const PREROUTING_JUMP: &str = "-A PREROUTING -p tcp -j MUSUBI_PREROUTING";
/// The rule in the built-in `OUTPUT` chain that sends TCP to our chain.
pub const OUTPUT_JUMP: &str = "-A OUTPUT -p tcp -j MUSUBI_OUTPUT";

/// An argument that does not make sense, in the user's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag}: {problem}")]
pub struct ArgError {
    pub flag: &'static str,
    pub problem: String,
}

fn arg_err(flag: &'static str, problem: impl Into<String>) -> ArgError {
    ArgError {
        flag,
        problem: problem.into(),
    }
}

/// A port or an inclusive range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn one(port: u16) -> Self {
        PortRange {
            first: port,
            last: port,
        }
    }

    /// The `--dport` argument: `25` or `8000:8100`.
    fn dport(&self) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}:{}", self.first, self.last)
        }
    }
}

/// An IP network (`10.0.0.0/8`, `fd00::/8`, or a bare address meaning a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Parses one port (1-65535).
pub fn parse_port(flag: &'static str, s: &str) -> Result<u16, ArgError> {
    match s.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(arg_err(flag, format!("{s:?} is not a port (1-65535)"))),
    }
}

/// Parses `25,587,8000-8100` (empty means none).
pub fn parse_ports(flag: &'static str, s: &str) -> Result<Vec<PortRange>, ArgError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            None => out.push(PortRange::one(parse_port(flag, part)?)),
            Some((a, b)) => {
                let (first, last) = (parse_port(flag, a)?, parse_port(flag, b)?);
                if first > last {
                    return Err(arg_err(
                        flag,
                        format!("{part:?} is not a range (the first port is larger)"),
                    ));
                }
                out.push(PortRange { first, last });
            }
        }
    }
    Ok(out)
}

/// Parses `10.0.0.0/8,fd00::/8,192.168.1.1` (empty means none).
pub fn parse_cidrs(flag: &'static str, s: &str) -> Result<Vec<Cidr>, ArgError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (addr, prefix) = part.split_once('/').unwrap_or((part, ""));
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| arg_err(flag, format!("{part:?} is not a CIDR (bad address)")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() && !part.contains('/') {
            max
        } else {
            match prefix.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => {
                    return Err(arg_err(
                        flag,
                        format!("{part:?} is not a CIDR (prefix must be 0-{max})"),
                    ));
                }
            }
        };
        out.push(Cidr { addr, prefix });
    }
    Ok(out)
}

/// What the rules must do, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub proxy_uid: u32,
    pub inbound_port: u16,
    pub outbound_port: u16,
    /// Inbound destination ports left alone (always includes the proxy's own ports).
    pub skip_inbound: BTreeSet<PortRange>,
    pub skip_outbound: BTreeSet<PortRange>,
    pub skip_cidrs: BTreeSet<Cidr>,
    pub ipv6: bool,
}

/// The raw flag values, before validation.
#[derive(Debug, Clone, Default)]
pub struct RawPlan<'a> {
    pub proxy_uid: &'a str,
    pub inbound_port: &'a str,
    pub outbound_port: &'a str,
    pub admin_port: &'a str,
    pub skip_inbound_ports: &'a str,
    pub skip_outbound_ports: &'a str,
    pub skip_outbound_cidrs: &'a str,
    pub ipv6: bool,
}

impl Plan {
    pub fn parse(raw: &RawPlan<'_>) -> Result<Plan, ArgError> {
        let proxy_uid = raw.proxy_uid.trim().parse::<u32>().map_err(|_| {
            arg_err(
                "--proxy-uid",
                format!("{:?} is not a user id", raw.proxy_uid),
            )
        })?;
        let inbound_port = parse_port("--inbound-port", raw.inbound_port)?;
        let outbound_port = parse_port("--outbound-port", raw.outbound_port)?;
        let admin_port = parse_port("--admin-port", raw.admin_port)?;
        if inbound_port == outbound_port {
            return Err(arg_err(
                "--outbound-port",
                "must differ from --inbound-port",
            ));
        }
        let mut skip_inbound: BTreeSet<PortRange> =
            parse_ports("--skip-inbound-ports", raw.skip_inbound_ports)?
                .into_iter()
                .collect();
        for own in [inbound_port, outbound_port, admin_port] {
            skip_inbound.insert(PortRange::one(own));
        }
        Ok(Plan {
            proxy_uid,
            inbound_port,
            outbound_port,
            skip_inbound,
            skip_outbound: parse_ports("--skip-outbound-ports", raw.skip_outbound_ports)?
                .into_iter()
                .collect(),
            skip_cidrs: parse_cidrs("--skip-outbound-cidrs", raw.skip_outbound_cidrs)?
                .into_iter()
                .collect(),
            ipv6: raw.ipv6,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn holds(self, c: &Cidr) -> bool {
        c.addr.is_ipv4() == (self == Family::V4)
    }
}

/// Which of our jump rules the `nat` table already has (from `iptables-save`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Present {
    pub prerouting_jump: bool,
    pub output_jump: bool,
}

/// Reads `iptables-save -t nat` output for our jump rules.
pub fn present(saved: &str) -> Present {
    let has = |rule: &str| saved.lines().any(|l| l.trim() == rule);
    Present {
        prerouting_jump: has(PREROUTING_JUMP),
        output_jump: has(OUTPUT_JUMP),
    }
}

/// The `iptables-restore --noflush` input for one family. Our chains are declared and flushed,
/// then refilled, so a second run replaces the first; the jumps from the built-in chains are
/// added only when `present` says they are missing, so there is always exactly one of each.
pub fn render(plan: &Plan, family: Family, present: Present) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line("# musubi-proxy init: redirect the pod's TCP through the proxy".into());
    line("*nat".into());
    for chain in [PREROUTING, INBOUND_REDIRECT, OUTPUT, OUTBOUND_REDIRECT] {
        line(format!(":{chain} - [0:0]"));
    }
    for chain in [PREROUTING, INBOUND_REDIRECT, OUTPUT, OUTBOUND_REDIRECT] {
        line(format!("-F {chain}"));
    }

    // Inbound: everything arriving for the pod goes to the inbound listener, except the
    // proxy's own ports and the ports the user asked to skip.
    for r in &plan.skip_inbound {
        line(format!(
            "-A {PREROUTING} -p tcp --dport {} -j RETURN",
            r.dport()
        ));
    }
    line(format!("-A {PREROUTING} -p tcp -j {INBOUND_REDIRECT}"));
    line(format!(
        "-A {INBOUND_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        plan.inbound_port
    ));

    // Outbound: the proxy's own connections leave as they are (else they would loop back into
    // it); so does traffic that stays inside the pod: loopback, and the application talking to
    // its own pod IP (routed over `lo`), which is left unproxied like Linkerd does.
    line(format!(
        "-A {OUTPUT} -m owner --uid-owner {} -j RETURN",
        plan.proxy_uid
    ));
    line(format!("-A {OUTPUT} -o lo -j RETURN"));
    line(format!("-A {OUTPUT} -d {} -j RETURN", family.loopback()));
    for c in plan.skip_cidrs.iter().filter(|c| family.holds(c)) {
        line(format!("-A {OUTPUT} -d {c} -j RETURN"));
    }
    for r in &plan.skip_outbound {
        line(format!(
            "-A {OUTPUT} -p tcp --dport {} -j RETURN",
            r.dport()
        ));
    }
    line(format!("-A {OUTPUT} -p tcp -j {OUTBOUND_REDIRECT}"));
    line(format!(
        "-A {OUTBOUND_REDIRECT} -p tcp -j REDIRECT --to-ports {}",
        plan.outbound_port
    ));

    if !present.prerouting_jump {
        line(PREROUTING_JUMP.into());
    }
    if !present.output_jump {
        line(OUTPUT_JUMP.into());
    }
    line("COMMIT".into());
    out
}

/// Everything a dry run prints: the IPv4 rules, then (unless disabled) the IPv6 rules.
pub fn render_all(plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# iptables-restore --noflush");
    out.push_str(&render(plan, Family::V4, Present::default()));
    if plan.ipv6 {
        let _ = writeln!(out, "# ip6tables-restore --noflush");
        out.push_str(&render(plan, Family::V6, Present::default()));
    }
    out
}

#[cfg(test)]
mod tests;
