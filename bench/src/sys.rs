//! Machine facts and process accounting from /proc.

use std::time::Duration;

/// utime + stime of a process, from /proc/<pid>/stat.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = clock_ticks();
    Some(Duration::from_secs_f64((utime + stime) as f64 / ticks))
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Steal time of each CPU (ready to run while the hypervisor ran something else), from
/// /proc/stat, indexed by CPU number. On a shared host it is the noise under every figure.
pub fn steal() -> Vec<Duration> {
    let ticks = clock_ticks();
    std::fs::read_to_string("/proc/stat")
        .map(|s| parse_steal(&s))
        .unwrap_or_default()
        .into_iter()
        .map(|t| Duration::from_secs_f64(t as f64 / ticks))
        .collect()
}

/// The `steal` column (the 8th after the name) of each `cpuN` line, in clock ticks.
pub fn parse_steal(stat: &str) -> Vec<u64> {
    stat.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            f.next()?.strip_prefix("cpu")?.parse::<usize>().ok()?;
            f.nth(7)?.parse().ok()
        })
        .collect()
}

/// Resident set size in bytes (VmRSS) and its peak (VmHWM).
pub fn rss(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Pins a process (all its threads) to `cpus` with taskset, when there is more than one core.
pub fn pin(pid: u32, cpus: &str) -> bool {
    cores() > 1 && taskset(pid, cpus)
}

fn taskset(pid: u32, cpus: &str) -> bool {
    std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A kernel thread moved off the proxies' CPU for the run, and where it was allowed before.
#[derive(Debug, Clone)]
pub struct MovedThread {
    pub pid: u32,
    pub name: String,
    pub was: String,
}

/// Moves kernel threads whose name starts with one of `prefixes` to `cpus` (e.g. `kdamond`,
/// the DAMON monitor, which wakes every ~0.5 s and runs for 1-5 ms: on the proxies' CPU it
/// stalls both proxies of a pair for that long). Only kernel threads (empty command line).
pub fn move_kernel_threads(prefixes: &[&str], cpus: &str) -> Vec<MovedThread> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    let mut moved = vec![];
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let read = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}")).ok();
        let Some(name) = read("comm").map(|c| c.trim().to_string()) else {
            continue;
        };
        let kernel_thread = read("cmdline").is_some_and(|c| c.is_empty());
        if !kernel_thread || !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let was = read("status").and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        });
        // `taskset`, not `pin`: the caller has usually pinned itself already, and then sees
        // one core.
        if let Some(was) = was
            && taskset(pid, cpus)
        {
            moved.push(MovedThread { pid, name, was });
        }
    }
    moved
}

/// Puts moved kernel threads back where they were allowed to run.
pub fn restore_kernel_threads(moved: &[MovedThread]) {
    for t in moved {
        taskset(t.pid, &t.was);
    }
}

/// Percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() { 0.0 } else { xs[xs.len() / 2] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_per_cpu() {
        let stat = "cpu  339881 353276 78066 181511 1540 0 3075 8564 0 0\n\
                    cpu0 154303 175493 38429 108245 386 0 1196 4420 0 0\n\
                    cpu1 185577 177783 39636 73265 1153 0 1879 4143 0 0\n\
                    cpu2 1 2 3\n\
                    intr 1 2 3 4 5 6 7 8 9\n";
        assert_eq!(parse_steal(stat), vec![4420, 4143]);
        assert!(parse_steal("").is_empty());
    }
}
