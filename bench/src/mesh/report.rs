//! The run's markdown tables and JSON: medians across repetitions with their spread, latency
//! added over the baseline, and the musubi/envoy and musubi/baseline ratios.

use super::load::Kind;
use super::topology::Which;
use super::{Point, Results, Sample};
use crate::sys::median;
use serde_json::{Value, json};
use std::fmt::Write;

const MB: f64 = 1024.0 * 1024.0;

/// Median of one figure across samples.
fn med(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    median(samples.iter().map(f).collect())
}

fn spread(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> (f64, f64) {
    let xs: Vec<f64> = samples.iter().map(f).collect();
    (
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

/// The per-proxy figure `i` (0 client, 1 server), median across samples.
fn per_proxy(samples: &[Sample], i: usize, f: impl Fn(&Sample, usize) -> f64) -> f64 {
    med(samples, |s| f(s, i))
}

/// Median percentiles (ms): p50, p90, p99, p99.9, max.
fn percentiles(samples: &[Sample]) -> [f64; 5] {
    [
        med(samples, |s| s.outcome.p50),
        med(samples, |s| s.outcome.p90),
        med(samples, |s| s.outcome.p99),
        med(samples, |s| s.outcome.p999),
        med(samples, |s| s.outcome.max),
    ]
}

/// The samples of `w` at the point labelled `label`.
fn at<'a>(r: &'a Results, label: &str, w: Which) -> Option<&'a [Sample]> {
    r.latency
        .iter()
        .find(|(p, x, _)| p.label() == label && *x == w)
        .map(|(_, _, s)| s.as_slice())
}

fn cpu(samples: &[Sample]) -> (f64, f64) {
    if samples
        .first()
        .is_none_or(|s| s.millicores_per_krps.len() < 2)
    {
        return (0.0, 0.0);
    }
    (
        per_proxy(samples, 0, |s, i| s.millicores_per_krps[i]),
        per_proxy(samples, 1, |s, i| s.millicores_per_krps[i]),
    )
}

fn rss(samples: &[Sample]) -> (f64, f64) {
    if samples.first().is_none_or(|s| s.rss.len() < 2) {
        return (0.0, 0.0);
    }
    (
        per_proxy(samples, 0, |s, i| s.rss[i] as f64 / MB),
        per_proxy(samples, 1, |s, i| s.rss[i] as f64 / MB),
    )
}

fn fmed(xs: &[f64]) -> f64 {
    median(xs.to_vec())
}

fn range(xs: &[f64]) -> String {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.2}–{hi:.2}")
}

pub fn markdown(r: &Results, pinned: bool) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Latency (ms, median of repetitions; + is added over baseline)\n\nProxies {}pinned to CPU 1, load generator and backend to CPU 0.\n",
        if pinned { "" } else { "NOT " }
    );
    md.push_str("| point | system | p50 | p90 | p99 | p99.9 | max | +p50 | +p90 | +p99 | +p99.9 | p99 spread | achieved rps | errors | mCPU/kRPS client, server | RSS MB client, server |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (point, w, samples) in &r.latency {
        let p = percentiles(samples);
        let base = at(r, &point.label(), Which::Baseline).map(percentiles);
        let added = |i: usize| match (&base, *w) {
            (Some(b), x) if x != Which::Baseline => format!("{:+.3}", p[i] - b[i]),
            _ => "".into(),
        };
        let (lo, hi) = spread(samples, |s| s.outcome.p99);
        let (cc, cs) = cpu(samples);
        let (rc, rs) = rss(samples);
        let proxies = *w != Which::Baseline;
        let _ = writeln!(
            md,
            "| {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} | {:.3}–{:.3} | {:.0} | {} | {} | {} |",
            point.label(),
            w.label(),
            p[0],
            p[1],
            p[2],
            p[3],
            p[4],
            added(0),
            added(1),
            added(2),
            added(3),
            lo,
            hi,
            med(samples, |s| s.outcome.achieved_rps),
            samples.iter().map(|s| s.outcome.errors).sum::<u64>(),
            if proxies {
                format!("{cc:.0}, {cs:.0}")
            } else {
                String::new()
            },
            if proxies {
                format!("{rc:.1}, {rs:.1}")
            } else {
                String::new()
            },
        );
    }
    if let Some(note) = steal_note(r) {
        md.push_str(&note);
    }
    md.push_str("\n## Capacity (HTTP/1.1, 16 connections, 3 s steps ×1.5 from 2000 RPS)\n\n| system | p99 ≤ baseline p99 + 1 ms, no errors, ≥ 99 % achieved | no errors, ≥ 99 % achieved |\n|---|---|---|\n");
    for c in &r.capacity {
        let v = |rate: Option<u32>, found: bool| match (rate, found) {
            (Some(x), true) => x.to_string(),
            (Some(x), false) => format!("≥ {x} (every step passed)"),
            (None, _) => "below the first step".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            c.which.label(),
            v(c.latency_bound, c.latency_limit_found),
            v(c.throughput_bound, c.throughput_limit_found)
        );
    }
    md.push_str("\n## Opaque TCP\n\n| system | throughput Gbit/s (median, range) | new mTLS connections/s (median, range) |\n|---|---|---|\n");
    for (name, xs) in &r.throughput {
        let hs = r
            .handshakes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| format!("{:.0} ({})", fmed(h), range(h)))
            .unwrap_or_default();
        let _ = writeln!(md, "| {name} | {:.2} ({}) | {hs} |", fmed(xs), range(xs));
    }
    md.push_str("\n## Start to ready (ms)\n\n| system | median | range |\n|---|---|---|\n");
    for (name, xs) in &r.ready_ms {
        let _ = writeln!(md, "| {name} | {:.1} | {} |", fmed(xs), range(xs));
    }
    md.push_str("\n## Peak RSS per proxy (MB)\n\n| system | client | server |\n|---|---|---|\n");
    for (w, peaks) in &r.peak_rss {
        let f = |i: usize| peaks.get(i).map(|b| *b as f64 / MB).unwrap_or(0.0);
        let _ = writeln!(md, "| {} | {:.1} | {:.1} |", w.label(), f(0), f(1));
    }
    if !r.split.is_empty() {
        md.push_str("\n## Routed split (requests per split service at the client proxy, warm-up included; configured 90/10)\n\n| system | service | requests | share |\n|---|---|---|---|\n");
        for (w, split) in &r.split {
            let total: u64 = split.iter().map(|(_, n)| n).sum();
            if split.is_empty() {
                let _ = writeln!(md, "| {} | counts not read (see stderr) | | |", w.label());
            } else if total == 0 {
                let _ = writeln!(
                    md,
                    "| {} | NOT ROUTED: no request counted | 0 | |",
                    w.label()
                );
            }
            for (name, n) in split.iter().filter(|_| total > 0) {
                let share = *n as f64 * 100.0 / total as f64;
                let _ = writeln!(md, "| {} | {name} | {n} | {share:.1} % |", w.label());
            }
        }
    }
    md.push_str("\n## Musubi against the targets\n\n");
    for (name, value) in ratios(r) {
        let _ = writeln!(md, "* {name}: {value}");
    }
    md
}

/// How much CPU time the hypervisor took during the latency points, per CPU (median and max
/// over every sample): what makes two runs on the same VM disagree.
fn steal_note(r: &Results) -> Option<String> {
    let samples: Vec<&Sample> = r.latency.iter().flat_map(|(_, _, s)| s).collect();
    let cpus = samples.iter().map(|s| s.steal_pct.len()).max()?;
    let per_cpu: Vec<String> = (0..cpus)
        .map(|i| {
            let xs: Vec<f64> = samples
                .iter()
                .filter_map(|s| s.steal_pct.get(i).copied())
                .collect();
            let max = xs.iter().copied().fold(0.0, f64::max);
            format!("CPU {i} median {:.1} %, max {max:.1} %", median(xs))
        })
        .collect();
    (cpus > 0).then(|| {
        format!(
            "\nSteal during the latency points (CPU time the hypervisor gave to something else): {}.\n",
            per_cpu.join("; ")
        )
    })
}

/// The headline comparisons (name, formatted value).
pub fn ratios(r: &Results) -> Vec<(String, String)> {
    let mut out = vec![];
    let key = "http1 1000 rps 16 conn";
    if let (Some(b), Some(m), Some(e)) = (
        at(r, key, Which::Baseline),
        at(r, key, Which::Musubi),
        at(r, key, Which::Envoy),
    ) {
        let (b, m_p, e_p) = (percentiles(b), percentiles(m), percentiles(e));
        let (am, ae) = (m_p[2] - b[2], e_p[2] - b[2]);
        out.push((
            "added p99 at 1000 RPS, musubi/envoy (target ≤ 0.5)".into(),
            format!("{:.2} (+{am:.3} ms vs +{ae:.3} ms)", am / ae),
        ));
        let (mc, ms) = cpu(m);
        let (ec, es) = cpu(e);
        out.push((
            "CPU per 1000 RPS, both proxies, musubi/envoy (target ≤ 0.5)".into(),
            format!(
                "{:.2} ({:.0} vs {:.0} millicores)",
                (mc + ms) / (ec + es),
                mc + ms,
                ec + es
            ),
        ));
        let (rc, rs) = rss(m);
        out.push((
            "Musubi RSS under load (target ≤ 15 MB)".into(),
            format!("client {rc:.1} MB, server {rs:.1} MB"),
        ));
        out.push((
            "p99 at 1000 RPS, musubi/baseline".into(),
            format!("{:.2}", m_p[2] / b[2]),
        ));
    }
    out.extend(routed_ratios(r));
    let cap = |w: Which| r.capacity.iter().find(|c| c.which == w).copied();
    if let (Some(m), Some(e)) = (cap(Which::Musubi), cap(Which::Envoy)) {
        if let (Some(mr), Some(er)) = (m.latency_bound, e.latency_bound) {
            out.push((
                "max sustainable RPS (latency-bound), musubi/envoy (target ≥ 1.5)".into(),
                format!("{:.2} ({mr} vs {er})", f64::from(mr) / f64::from(er)),
            ));
        }
        if let (Some(mr), Some(er)) = (m.throughput_bound, e.throughput_bound) {
            out.push((
                "max RPS kept up with (no errors, ≥ 99 %), musubi/envoy".into(),
                format!("{:.2} ({mr} vs {er})", f64::from(mr) / f64::from(er)),
            ));
        }
    }
    let thr = |n: &str| r.throughput.iter().find(|t| t.0 == n).map(|t| fmed(&t.1));
    if let (Some(m), Some(t)) = (thr("musubi"), thr("rustls alone")) {
        out.push((
            "opaque mTLS throughput, musubi/rustls alone (target ≥ 0.5)".into(),
            format!("{:.2} ({m:.2} vs {t:.2} Gbit/s)", m / t),
        ));
    }
    if let Some((_, xs)) = r.ready_ms.iter().find(|x| x.0 == "musubi") {
        out.push((
            "start to ready (target ≤ 50 ms)".into(),
            format!("{:.1} ms median", fmed(xs)),
        ));
    }
    out
}

/// What routing costs: each routed point against the HTTP/1.1 point at the same rate and
/// connections, per pair, and the pairs against each other on the routed point.
fn routed_ratios(r: &Results) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut seen: Vec<String> = vec![];
    for (p, _, _) in r.latency.iter().filter(|(p, _, _)| p.kind == Kind::Routed) {
        let label = p.label();
        if seen.contains(&label) {
            continue;
        }
        seen.push(label.clone());
        let plain = Point {
            kind: Kind::Http1,
            ..*p
        }
        .label();
        let at_rate = format!("{} RPS × {}", p.rps, p.connections);
        let both = |s: &[Sample]| {
            let (c, sv) = cpu(s);
            (c + sv, percentiles(s)[2])
        };
        for w in [Which::Musubi, Which::Envoy] {
            if let (Some(ro), Some(pl)) = (at(r, &label, w), at(r, &plain, w)) {
                let ((rc, rp), (pc, pp)) = (both(ro), both(pl));
                out.push((
                    format!("{} routed/unrouted at {at_rate}", w.label()),
                    format!(
                        "CPU {:.2} ({rc:.0} vs {pc:.0} millicores per 1000 RPS, both proxies), p99 {:.2} ({rp:.3} vs {pp:.3} ms)",
                        rc / pc,
                        rp / pp
                    ),
                ));
            }
        }
        if let (Some(m), Some(e)) = (at(r, &label, Which::Musubi), at(r, &label, Which::Envoy)) {
            let ((mc, mp), (ec, ep)) = (both(m), both(e));
            out.push((
                format!("routed at {at_rate}, musubi/envoy"),
                format!(
                    "CPU {:.2} ({mc:.0} vs {ec:.0} millicores), p99 {:.2} ({mp:.3} vs {ep:.3} ms)",
                    mc / ec,
                    mp / ep
                ),
            ));
        }
    }
    out
}

pub fn json(r: &Results) -> Value {
    let latency: Vec<Value> = r
        .latency
        .iter()
        .map(|(p, w, samples)| {
            let pc = percentiles(samples);
            let (cc, cs) = cpu(samples);
            let (rc, rs) = rss(samples);
            json!({
                "point": p.label(),
                "system": w.label(),
                "p50_ms": pc[0], "p90_ms": pc[1], "p99_ms": pc[2], "p999_ms": pc[3], "max_ms": pc[4],
                "p99_ms_each": samples.iter().map(|s| s.outcome.p99).collect::<Vec<_>>(),
                "millicores_per_krps_each": samples.iter().map(|s| s.millicores_per_krps.clone()).collect::<Vec<_>>(),
                "steal_pct_each": samples.iter().map(|s| s.steal_pct.clone()).collect::<Vec<_>>(),
                "achieved_rps": med(samples, |s| s.outcome.achieved_rps),
                "errors": samples.iter().map(|s| s.outcome.errors).sum::<u64>(),
                "millicores_per_krps": [cc, cs],
                "rss_mb": [rc, rs],
            })
        })
        .collect();
    json!({
        "latency": latency,
        "capacity": r.capacity.iter().map(|c| json!({
            "system": c.which.label(),
            "latency_bound_rps": c.latency_bound, "latency_limit_found": c.latency_limit_found,
            "throughput_bound_rps": c.throughput_bound, "throughput_limit_found": c.throughput_limit_found,
        })).collect::<Vec<_>>(),
        "throughput_gbps": r.throughput.iter().map(|(n, xs)| json!({"system": n, "samples": xs})).collect::<Vec<_>>(),
        "handshakes_per_s": r.handshakes.iter().map(|(n, xs)| json!({"system": n, "samples": xs})).collect::<Vec<_>>(),
        "start_to_ready_ms": r.ready_ms.iter().map(|(n, xs)| json!({"system": n, "samples": xs})).collect::<Vec<_>>(),
        "routed_split": r.split.iter().map(|(w, split)| json!({
            "system": w.label(),
            "requests": split.iter().map(|(name, n)| json!({"service": name, "requests": n})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "peak_rss_mb": r.peak_rss.iter().map(|(w, p)| json!({"system": w.label(), "client_server": p.iter().map(|b| *b as f64 / MB).collect::<Vec<_>>()})).collect::<Vec<_>>(),
        "ratios": ratios(r).into_iter().map(|(k, v)| json!({"figure": k, "value": v})).collect::<Vec<_>>(),
    })
}
