//! `musubi supervise --parent <pid> -- <program> <args>`: the process `musubi up` starts every
//! proxy and application under, so that nothing `up` started outlives it, however `up` ends.
//!
//! The supervisor asks the kernel for SIGTERM when `up` dies (PR_SET_PDEATHSIG, which also
//! covers a SIGKILL or a crash of `up`), becomes a child subreaper (so processes the program
//! leaves behind, daemons included, are re-parented to it rather than to init), and starts the
//! program in a process group of its own. On SIGTERM, SIGINT, SIGHUP or SIGQUIT, on `up`'s
//! death, or when the program exits, it sends SIGTERM to that group and to every process below
//! it, SIGKILL after a grace period, reaps them all and exits with the program's exit code.
//! It is not a general-purpose init: it supervises one program and never restarts it.

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::sys::prctl;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getpid, getppid};
use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::task::Poll;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

/// How long the program's processes get between SIGTERM and SIGKILL. Longer than the drain
/// timeout `up` gives its proxies (5 s), so a draining proxy is not cut short.
pub const GRACE: Duration = Duration::from_secs(8);
/// How long SIGKILLed processes get to disappear (they cannot refuse; this only bounds the
/// wait for ones stuck in the kernel).
pub const KILL_WAIT: Duration = Duration::from_secs(2);
/// Exit code when `up` was already gone before the program could start.
const EXIT_PARENT_GONE: i32 = 70;

#[derive(clap::Args)]
pub struct SuperviseArgs {
    /// The pid of the process that started this one (`musubi up`); the supervisor exits at once,
    /// without starting the program, if that process is already gone.
    #[arg(long)]
    parent: i32,
    /// The program and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<OsString>,
}

/// Signals that mean "stop", received as a stream each.
pub struct StopSignals(Vec<(&'static str, tokio::signal::unix::Signal)>);

impl StopSignals {
    /// Installs handlers for `kinds` (from then on they no longer end the process).
    pub fn new(kinds: &[(&'static str, SignalKind)]) -> std::io::Result<Self> {
        kinds
            .iter()
            .map(|&(name, kind)| Ok((name, signal(kind)?)))
            .collect::<std::io::Result<_>>()
            .map(StopSignals)
    }

    /// The next stop signal, by name.
    pub async fn recv(&mut self) -> &'static str {
        std::future::poll_fn(|cx| {
            for (name, s) in self.0.iter_mut() {
                if s.poll_recv(cx).is_ready() {
                    return Poll::Ready(*name);
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// What a terminal shell would report for this exit: the code, or 128 + the signal.
pub fn exit_code(status: &WaitStatus) -> Option<i32> {
    match *status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// The fields of `/proc/<pid>/stat` the supervisor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub state: char,
    pub ppid: i32,
}

/// Parses `/proc/<pid>/stat`: `pid (comm) state ppid …`, where comm may itself hold spaces and
/// parentheses (so the state follows the *last* `)`).
pub fn parse_stat(line: &str) -> Option<ProcStat> {
    let (head, rest) = line.rsplit_once(')')?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some(ProcStat { pid, state, ppid })
}

/// Every process below `root` by parent links (not `root` itself), parents before children.
pub fn descendants(table: &[ProcStat], root: i32) -> Vec<i32> {
    let mut found = vec![root];
    let mut next = 0;
    while next < found.len() {
        let parent = found[next];
        next += 1;
        for p in table {
            if p.ppid == parent && p.pid != root && !found.contains(&p.pid) {
                found.push(p.pid);
            }
        }
    }
    found.remove(0);
    found
}

/// Every process on the machine, as far as `/proc` shows them (processes that vanish while it
/// is read are skipped).
fn proc_table() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        e.file_name().to_str()?.parse::<u32>().ok()?;
        parse_stat(&std::fs::read_to_string(e.path().join("stat")).ok()?)
    })
    .collect()
}

/// Sends `sig` to the program's process group and to every process below this one (which
/// covers processes that left the group, e.g. with setsid).
fn signal_all(group: Pid, sig: Signal) {
    let _ = killpg(group, sig);
    for pid in descendants(&proc_table(), getpid().as_raw()) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// Reaps every child that has exited, noting the program's exit code; returns whether any
/// child is left. As a subreaper, no child left means no process below this one is left.
fn reap(program: Pid, code: &mut Option<i32>) -> bool {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return true,
            Ok(status) => {
                if status.pid() == Some(program) {
                    *code = exit_code(&status).or(*code);
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => return false,
        }
    }
}

/// Waits until no child is left (true), or `within` passes (false).
async fn reap_all(
    program: Pid,
    code: &mut Option<i32>,
    chld: &mut tokio::signal::unix::Signal,
    within: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if !reap(program, code) {
            return true;
        }
        tokio::select! {
            _ = chld.recv() => {}
            _ = tokio::time::sleep_until(deadline) => return !reap(program, code),
        }
    }
}

/// Runs the program until it exits or the supervisor is told to stop (or `up` dies); returns
/// the program's exit code.
pub async fn run(a: SuperviseArgs) -> Result<i32> {
    // First the death signal, then the check: if `up` died before the prctl, the check sees
    // it; if it dies after, the signal comes.
    prctl::set_pdeathsig(Signal::SIGTERM).context("PR_SET_PDEATHSIG")?;
    if getppid().as_raw() != a.parent {
        eprintln!(
            "musubi supervise: process {} is gone; not starting {:?}",
            a.parent, a.command
        );
        return Ok(EXIT_PARENT_GONE);
    }
    prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
    // Handlers before the program starts, so neither a stop nor its exit can be missed. SIGHUP
    // and SIGQUIT come from a terminal to the whole foreground group, this process included:
    // they must not end it without the program.
    let mut stops = StopSignals::new(&[
        ("SIGTERM", SignalKind::terminate()),
        ("SIGINT", SignalKind::interrupt()),
        ("SIGHUP", SignalKind::hangup()),
        ("SIGQUIT", SignalKind::quit()),
    ])?;
    let mut chld = signal(SignalKind::child())?;

    let (program, args) = a.command.split_first().context("no program to supervise")?;
    let child = std::process::Command::new(program)
        .args(args)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", program.to_string_lossy()))?;
    let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
    // Reaped below with waitpid(-1), with everything else this process inherits; dropping a
    // std Child neither waits for nor kills it.
    drop(child);

    let mut code = None;
    loop {
        if !reap(pid, &mut code) || code.is_some() {
            break;
        }
        tokio::select! {
            _ = chld.recv() => {}
            _ = stops.recv() => break,
        }
    }
    // From here on, further stop signals are caught (the handlers stay installed) and ignored:
    // the shutdown below is bounded anyway.
    signal_all(pid, Signal::SIGTERM);
    if !reap_all(pid, &mut code, &mut chld, GRACE).await {
        eprintln!("musubi supervise: still running {GRACE:?} after SIGTERM; sending SIGKILL");
        signal_all(pid, Signal::SIGKILL);
        if !reap_all(pid, &mut code, &mut chld, KILL_WAIT).await {
            eprintln!("musubi supervise: some processes did not go away after SIGKILL");
        }
    }
    Ok(code.unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_stat_table() {
        let cases = [
            ("1 (init) S 0 1 1 0", Some((1, 'S', 0))),
            ("4242 (musubi) R 17 4242 4242", Some((4242, 'R', 17))),
            // comm with spaces and parentheses: the state follows the last ')'.
            ("77 (a (b) c) Z 5 77 77", Some((77, 'Z', 5))),
            ("88 (x)y) S 3 0", Some((88, 'S', 3))),
            ("", None),
            ("12 (sh) S", None),
            ("12 (sh) S notapid", None),
            ("nope (sh) S 1", None),
        ];
        for (line, want) in cases {
            let got = parse_stat(line).map(|p| (p.pid, p.state, p.ppid));
            assert_eq!(got, want, "{line:?}");
        }
    }

    fn table(links: &[(i32, i32)]) -> Vec<ProcStat> {
        links
            .iter()
            .map(|&(pid, ppid)| ProcStat {
                pid,
                state: 'S',
                ppid,
            })
            .collect()
    }

    #[test]
    fn descendants_table() {
        // (pid, ppid)
        let t = table(&[
            (1, 0),
            (10, 1),
            (11, 10),
            (12, 10),
            (13, 11),
            (20, 1),
            (21, 20),
        ]);
        let cases: [(i32, &[i32]); 5] = [
            (10, &[11, 12, 13]),
            (11, &[13]),
            (13, &[]),
            (1, &[10, 20, 11, 12, 21, 13]),
            (99, &[]),
        ];
        for (root, want) in cases {
            assert_eq!(descendants(&t, root), want, "below {root}");
        }
        // A parent-link loop (impossible in /proc, possible in a torn read) still ends.
        let looped = table(&[(5, 6), (6, 5)]);
        assert_eq!(descendants(&looped, 5), [6]);
    }

    #[test]
    fn exit_code_table() {
        let p = Pid::from_raw(7);
        let cases = [
            (WaitStatus::Exited(p, 0), Some(0)),
            (WaitStatus::Exited(p, 3), Some(3)),
            (WaitStatus::Signaled(p, Signal::SIGTERM, false), Some(143)),
            (WaitStatus::Signaled(p, Signal::SIGKILL, true), Some(137)),
            (WaitStatus::Stopped(p, Signal::SIGSTOP), None),
            (WaitStatus::StillAlive, None),
        ];
        for (status, want) in cases {
            assert_eq!(exit_code(&status), want, "{status:?}");
        }
    }
}
