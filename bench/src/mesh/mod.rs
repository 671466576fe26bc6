//! `musubi-bench mesh`: what a mesh costs. The same constant-rate load straight to a backend
//! (baseline), through a Musubi proxy pair and through an Envoy pair, side by side in one run,
//! repeated with the order of systems rotated, medians and spreads reported.

pub mod backend;
mod envoy_config;
mod load;
mod report;
mod routed;
mod tcp;
mod topology;

use crate::sys;
use anyhow::Result;
use load::{Kind, Load, Outcome};
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;
use topology::{ControlPlane, ProxyPorts, System, Which};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Smoke run (about a minute): one repetition, one-second points, a single capacity step.
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of every point (the order of systems rotates between them).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Length of every latency point.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Write the JSON result here (e.g. bench/results/<date>-<host>.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Measure only these latency points, `KIND:RPS:CONNECTIONS` (KIND: http1, http2, grpc, or
    /// routed: HTTP/1.1 to a service with ten routes and a 90/10 split; e.g. `http1:1000:16`;
    /// repeatable), and skip capacity, opaque TCP and start-to-ready: for profiling one path.
    #[arg(long = "point", value_parser = parse_point)]
    pub points: Vec<Point>,
    /// Measure only opaque TCP (throughput and new mTLS connections per second): for
    /// before/after a change of the copy path.
    #[arg(long, conflicts_with = "points")]
    pub opaque_only: bool,
}

/// `KIND:RPS:CONNECTIONS`, e.g. `grpc:1000:16`.
pub fn parse_point(s: &str) -> Result<Point, String> {
    let parts: Vec<&str> = s.split(':').collect();
    let [kind, rps, connections] = parts.as_slice() else {
        return Err(format!("{s:?}: expected KIND:RPS:CONNECTIONS"));
    };
    let kind = match *kind {
        "http1" => Kind::Http1,
        "http2" => Kind::Http2,
        "grpc" => Kind::Grpc,
        "routed" => Kind::Routed,
        k => return Err(format!("{k:?}: kind is http1, http2, grpc or routed")),
    };
    let number = |x: &str, what: &str| {
        x.parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{x:?}: {what} must be a positive integer"))
    };
    Ok(Point {
        kind,
        rps: number(rps, "RPS")?,
        connections: number(connections, "connections")?,
    })
}

/// One latency point of the plan.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    pub kind: Kind,
    pub rps: u32,
    pub connections: u32,
}

impl Point {
    pub fn label(&self) -> String {
        format!(
            "{} {} rps {} conn",
            self.kind.label(),
            self.rps,
            self.connections
        )
    }
}

/// The latency plan: the scenarios 1–3, and HTTP/1.1 through ten routes with a split
/// (quick: one point of each kind).
pub fn plan(quick: bool) -> Vec<Point> {
    let p = |kind, rps, connections| Point {
        kind,
        rps,
        connections,
    };
    if quick {
        return vec![
            p(Kind::Http1, 1000, 16),
            p(Kind::Http2, 1000, 16),
            p(Kind::Grpc, 1000, 16),
            p(Kind::Routed, 1000, 16),
        ];
    }
    vec![
        p(Kind::Http1, 200, 16),
        p(Kind::Http1, 1000, 16),
        p(Kind::Routed, 1000, 16),
        p(Kind::Http1, 2000, 16),
        p(Kind::Http2, 1000, 16),
        p(Kind::Grpc, 1000, 16),
        p(Kind::Http1, 1000, 1),
        p(Kind::Http1, 1000, 4),
        p(Kind::Http1, 1000, 64),
    ]
}

/// Capacity steps (requests per second).
pub fn capacity_steps(quick: bool) -> Vec<u32> {
    if quick {
        return vec![2000];
    }
    let mut steps = vec![2000u32];
    while let Some(&last) = steps.last()
        && last < 60_000
    {
        steps.push(last * 3 / 2);
    }
    steps
}

/// One measurement of one system at one point.
#[derive(Debug, Clone)]
pub struct Sample {
    pub outcome: Outcome,
    /// Millicores per 1000 RPS, per proxy (client, server).
    pub millicores_per_krps: Vec<f64>,
    /// VmRSS after the run, per proxy, bytes.
    pub rss: Vec<u64>,
    /// Steal time during the run, per CPU, percent of the run.
    pub steal_pct: Vec<f64>,
}

async fn measure(sys_: &System, point: Point, duration: Duration) -> Result<Sample> {
    let t = &sys_.targets;
    let (target, authority) = match point.kind {
        Kind::Grpc => (&t.grpc, &t.grpc_authority),
        Kind::Routed => (&t.routed, &t.routed_authority),
        Kind::Http1 | Kind::Http2 => (&t.http, &t.http_authority),
    };
    let before: Vec<Duration> = sys_
        .proxies
        .iter()
        .map(|(_, pid)| sys::cpu_time(*pid).unwrap_or_default())
        .collect();
    let stolen = sys::steal();
    let started = std::time::Instant::now();
    let outcome = load::run(
        &Load {
            kind: point.kind,
            target: target.clone(),
            authority: authority.clone(),
            rps: point.rps,
            connections: point.connections,
            duration,
        },
        Some(topology::LOAD_CPUS),
    )
    .await?;
    let wall = started.elapsed().as_secs_f64().max(1e-9);
    let steal_pct = sys::steal()
        .iter()
        .zip(stolen)
        .map(|(after, before)| after.saturating_sub(before).as_secs_f64() / wall * 100.0)
        .collect();
    let secs = duration.as_secs_f64();
    let krps = (outcome.achieved_rps / 1000.0).max(1e-9);
    let millicores_per_krps = sys_
        .proxies
        .iter()
        .zip(before)
        .map(|((_, pid), b)| {
            let used = sys::cpu_time(*pid).unwrap_or_default().saturating_sub(b);
            used.as_secs_f64() / secs * 1000.0 / krps
        })
        .collect();
    let rss = sys_
        .proxies
        .iter()
        .map(|(_, pid)| sys::rss(*pid).map(|r| r.0).unwrap_or(0))
        .collect();
    Ok(Sample {
        outcome,
        millicores_per_krps,
        rss,
        steal_pct,
    })
}

/// The highest rates a pair sustained; `*_limit_found` false means it passed every step tried
/// (the figure is a lower bound).
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub which: Which,
    /// p99 ≤ baseline p99 + 1 ms, no errors, ≥ 99 % achieved.
    pub latency_bound: Option<u32>,
    pub latency_limit_found: bool,
    /// No errors, ≥ 99 % achieved.
    pub throughput_bound: Option<u32>,
    pub throughput_limit_found: bool,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            which: Which::Musubi,
            latency_bound: None,
            latency_limit_found: false,
            throughput_bound: None,
            throughput_limit_found: false,
        }
    }
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct Results {
    /// (point label, system) → samples, in plan order.
    pub latency: Vec<(Point, Which, Vec<Sample>)>,
    pub capacity: Vec<Capacity>,
    /// system → opaque throughput samples (Gbit/s); "rustls" for the reference.
    pub throughput: Vec<(String, Vec<f64>)>,
    /// system → new mTLS connections per second samples.
    pub handshakes: Vec<(String, Vec<f64>)>,
    /// system → start-to-ready samples (ms).
    pub ready_ms: Vec<(String, Vec<f64>)>,
    /// system → peak RSS per proxy (bytes), read at the end.
    pub peak_rss: Vec<(Which, Vec<u64>)>,
    /// system → requests per split service of the routed service, as its client proxy
    /// counted them (warm-up included); empty without a routed point.
    pub split: Vec<(Which, routed::Split)>,
}

/// Kernel threads moved for the run; restored when dropped, however the run ends.
struct Moved(Vec<sys::MovedThread>);

impl Drop for Moved {
    fn drop(&mut self) {
        sys::restore_kernel_threads(&self.0);
    }
}

fn rotated(rep: usize) -> Vec<Which> {
    let mut order = vec![Which::Baseline, Which::Musubi, Which::Envoy];
    order.rotate_left(rep % 3);
    order
}

pub async fn run(a: Args) -> Result<()> {
    let (repeats, duration) = if a.quick {
        (1, Duration::from_secs(1))
    } else {
        (a.repeats.max(1), a.duration)
    };
    load::fortio()?;
    // Counted before pinning: afterwards this process sees only its own CPU.
    let cores = sys::cores();
    let pinned = cores > 1 && sys::pin(std::process::id(), topology::LOAD_CPUS);
    // Periodic kernel work off the proxies' CPU too, put back when the run ends.
    let moved = Moved(if pinned {
        sys::move_kernel_threads(&["kdamond"], topology::LOAD_CPUS)
    } else {
        vec![]
    });
    let (_backend, b) = topology::backend().await?;
    let server = ProxyPorts::on("127.0.0.12").await?;
    let cp = ControlPlane::start(b, server.inbound).await?;
    let (musubi, musubi_ready) = topology::musubi(&cp, b, &server).await?;
    let (envoy, envoy_ready) = topology::envoy(&cp, b).await?;
    let baseline = topology::baseline(b);
    let systems = [&baseline, &musubi, &envoy];
    let by = |w: Which| systems.iter().find(|s| s.which == w).copied();
    let mut r = Results::default();

    let only_latency = !a.points.is_empty();
    let points = if only_latency {
        a.points.clone()
    } else if a.opaque_only {
        vec![]
    } else {
        plan(a.quick)
    };
    // Warm up every path (pools, handshakes) before measuring anything; the routed service only
    // when it is measured, so that runs without it do exactly what they did before it existed.
    let routed_points = points.iter().any(|p| p.kind == Kind::Routed);
    let mut warm = vec![Kind::Http1, Kind::Grpc];
    if routed_points {
        warm.push(Kind::Routed);
    }
    for s in systems {
        for &kind in &warm {
            let p = Point {
                kind,
                rps: 200,
                connections: 16,
            };
            measure(s, p, Duration::from_secs(1)).await?;
        }
    }

    for point in points {
        let mut per: Vec<(Which, Vec<Sample>)> = vec![];
        for rep in 0..repeats {
            for w in rotated(rep) {
                let Some(s) = by(w) else { continue };
                eprintln!("  {} · {} · run {}", point.label(), w.label(), rep + 1);
                let sample = measure(s, point, duration).await?;
                match per.iter_mut().find(|(x, _)| *x == w) {
                    Some((_, v)) => v.push(sample),
                    None => per.push((w, vec![sample])),
                }
            }
        }
        per.sort_by_key(|(w, _)| *w as u8);
        for (w, v) in per {
            // A point given twice is one point measured in two blocks (`A B B A` cancels drift
            // between the two): its samples are pooled.
            let same = r
                .latency
                .iter_mut()
                .find(|(p, x, _)| p.label() == point.label() && *x == w);
            match same {
                Some((_, _, pooled)) => pooled.extend(v),
                None => r.latency.push((point, w, v)),
            }
        }
    }
    if routed_points {
        // A check, not a figure: failing to read it must not cost the run's measurements.
        for s in [&musubi, &envoy] {
            let counted = split(s).await.unwrap_or_else(|e| {
                eprintln!("  {}: routed split not read: {e:#}", s.which.label());
                vec![]
            });
            r.split.push((s.which, counted));
        }
    }

    if only_latency {
        return finish(&r, pinned, &moved.0, cores, repeats, duration, &a);
    }

    // Capacity: raise the rate until p99 > baseline p99 + 1 ms, errors, or < 99 % achieved.
    let step_len = if a.quick {
        duration
    } else {
        Duration::from_secs(3)
    };
    // Two figures per system: the criterion (latency-bound), and the plain throughput
    // bound (no errors, ≥ 99 % of the rate), which still separates the pairs when both have
    // tails beyond baseline + 1 ms on this machine.
    let mut best: Vec<Capacity> = [Which::Musubi, Which::Envoy]
        .into_iter()
        .map(|which| Capacity {
            which,
            ..Capacity::default()
        })
        .collect();
    let steps = if a.opaque_only {
        vec![]
    } else {
        capacity_steps(a.quick)
    };
    for rate in steps {
        let point = Point {
            kind: Kind::Http1,
            rps: rate,
            connections: 16,
        };
        eprintln!("  capacity · {rate} rps");
        let base = measure(&baseline, point, step_len).await?.outcome;
        for c in best.iter_mut().filter(|c| !c.throughput_limit_found) {
            let Some(s) = by(c.which) else { continue };
            let o = measure(s, point, step_len).await?.outcome;
            if !c.latency_limit_found {
                if sustained(&o, rate, &base) {
                    c.latency_bound = Some(rate);
                } else {
                    c.latency_limit_found = true;
                }
            }
            if keeps_up(&o, rate) {
                c.throughput_bound = Some(rate);
            } else {
                c.throughput_limit_found = true;
            }
        }
        if best.iter().all(|c| c.throughput_limit_found) {
            break;
        }
    }
    r.capacity = best;

    // Opaque TCP: bulk throughput and new mTLS connections per second.
    let tcp_len = if a.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(3)
    };
    let mut thr: Vec<(String, Vec<f64>)> = vec![];
    let mut hs: Vec<(String, Vec<f64>)> = vec![];
    for rep in 0..repeats {
        eprintln!("  opaque TCP · run {}", rep + 1);
        push(
            &mut thr,
            "rustls alone",
            tcp::rustls_alone(&cp.identity, tcp_len).await?,
        );
        for w in rotated(rep) {
            let Some(s) = by(w) else { continue };
            push(
                &mut thr,
                w.label(),
                tcp::throughput(&s.targets, tcp_len).await?,
            );
            push(
                &mut hs,
                w.label(),
                tcp::handshakes(&s.targets, 8, tcp_len).await?,
            );
        }
    }
    r.throughput = thr;
    r.handshakes = hs;

    // Start-to-ready: the two pair proxies, plus fresh ones.
    let mut ready = musubi_ready
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect::<Vec<_>>();
    for _ in 0..repeats {
        let ports = ProxyPorts::on("127.0.0.15").await?;
        let (_child, t) = cp.proxy("client", &ports, "1").await?;
        ready.push(t.as_secs_f64() * 1000.0);
    }
    r.ready_ms = vec![
        ("musubi".into(), ready),
        ("envoy".into(), vec![envoy_ready.as_secs_f64() * 1000.0]),
    ];
    for s in [&musubi, &envoy] {
        let peaks = s
            .proxies
            .iter()
            .map(|(_, pid)| sys::rss(*pid).map(|x| x.1).unwrap_or(0))
            .collect();
        r.peak_rss.push((s.which, peaks));
    }

    finish(&r, pinned, &moved.0, cores, repeats, duration, &a)
}

/// Prints the tables and writes the JSON file when asked.
fn finish(
    r: &Results,
    pinned: bool,
    moved: &[sys::MovedThread],
    cores: usize,
    repeats: usize,
    duration: Duration,
    a: &Args,
) -> Result<()> {
    println!("{}", report::markdown(r, pinned));
    let moved_names: Vec<&str> = moved.iter().map(|t| t.name.as_str()).collect();
    if !moved_names.is_empty() {
        println!(
            "Kernel threads kept on CPU {} for the run: {}.",
            topology::LOAD_CPUS,
            moved_names.join(", ")
        );
    }
    if let Some(out) = &a.out {
        let doc = json!({
            "machine": {
                "host": sys::hostname(),
                "cpu": sys::cpu_model(),
                "cores": cores,
                "pinned": pinned,
                "kernel_threads_on_load_cpu": moved_names,
            },
            "versions": versions(),
            "settings": { "repeats": repeats, "duration_s": duration.as_secs_f64(), "quick": a.quick },
            "results": report::json(r),
        });
        std::fs::write(out, serde_json::to_string_pretty(&doc)?)?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// The capacity criterion: no errors, at least 99 % of the rate achieved, and p99 within 1 ms
/// of the baseline's at the same rate.
pub fn sustained(o: &Outcome, rate: u32, baseline: &Outcome) -> bool {
    keeps_up(o, rate) && o.p99 <= baseline.p99 + 1.0
}

/// No errors and at least 99 % of the rate achieved.
pub fn keeps_up(o: &Outcome, rate: u32) -> bool {
    o.errors == 0 && o.achieved_rps >= 0.99 * f64::from(rate)
}

/// How the client proxy of `s` split the routed service's requests, from its admin endpoint.
async fn split(s: &System) -> Result<routed::Split> {
    let Some(admin) = s.client_admin else {
        return Ok(vec![]);
    };
    Ok(match s.which {
        Which::Envoy => routed::envoy_split(
            &routed::admin_get(admin, "/stats?filter=upstream_rq_total$").await?,
        ),
        _ => routed::musubi_split(&routed::admin_get(admin, "/metrics").await?),
    })
}

fn push(v: &mut Vec<(String, Vec<f64>)>, key: &str, x: f64) {
    match v.iter_mut().find(|(k, _)| k == key) {
        Some((_, xs)) => xs.push(x),
        None => v.push((key.to_string(), vec![x])),
    }
}

fn versions() -> serde_json::Value {
    let first_line = |cmd: &mut std::process::Command| {
        cmd.output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    };
    let envoy =
        first_line(std::process::Command::new(musubi_tests::envoy::binary()).arg("--version"));
    let fortio = load::fortio()
        .map(|f| first_line(std::process::Command::new(f).arg("version")))
        .unwrap_or_default();
    let git = first_line(std::process::Command::new("git").args(["rev-parse", "--short", "HEAD"]));
    json!({
        "musubi": format!("{} ({git})", env!("CARGO_PKG_VERSION")),
        "envoy": envoy.rsplit("version: ").next().unwrap_or("").to_string(),
        "fortio": fortio,
        "key_exchange": envoy_config::KX_GROUP,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_parsing() {
        let p = parse_point("grpc:1000:16").unwrap();
        assert_eq!((p.kind, p.rps, p.connections), (Kind::Grpc, 1000, 16));
        let p = parse_point("routed:1000:16").unwrap();
        assert_eq!(
            (p.kind, p.label()),
            (Kind::Routed, "routed 1000 rps 16 conn".into())
        );
        for quick in [true, false] {
            let routed = plan(quick)
                .iter()
                .filter(|p| p.kind == Kind::Routed)
                .count();
            assert_eq!(routed, 1, "quick: {quick}");
        }
        for (bad, says) in [
            ("http1:1000", "KIND:RPS:CONNECTIONS"),
            ("tcp:1000:16", "kind is"),
            ("http1:fast:16", "RPS must"),
            ("http1:1000:0", "connections must"),
        ] {
            let e = parse_point(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn capacity_criteria() {
        let base = Outcome {
            p99: 0.5,
            ..Outcome::default()
        };
        let o = |p99: f64, achieved_rps: f64, errors: u64| Outcome {
            p99,
            achieved_rps,
            errors,
            ..Outcome::default()
        };
        // (outcome, keeps up, sustained) at 1000 RPS
        let cases = [
            (o(1.4, 995.0, 0), true, true),
            (o(1.6, 995.0, 0), true, false),
            (o(1.0, 980.0, 0), false, false),
            (o(1.0, 1000.0, 1), false, false),
        ];
        for (i, (out, up, sus)) in cases.iter().enumerate() {
            assert_eq!(keeps_up(out, 1000), *up, "case {i}");
            assert_eq!(sustained(out, 1000, &base), *sus, "case {i}");
        }
        assert_eq!(capacity_steps(true), vec![2000]);
        assert!(
            capacity_steps(false)
                .windows(2)
                .all(|w| w[1] == w[0] * 3 / 2)
        );
    }
}
