//! Constant-rate load with fortio (the generator Istio publishes with), and its JSON result
//! reduced to what the report needs.

use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// What is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Http1,
    Http2,
    Grpc,
    /// HTTP/1.1 as [`Kind::Http1`], to the service with ten routes and a 90/10 split.
    Routed,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Http1 => "http1",
            Kind::Http2 => "http2",
            Kind::Grpc => "grpc",
            Kind::Routed => "routed",
        }
    }
}

/// One fortio run.
#[derive(Debug, Clone)]
pub struct Load {
    pub kind: Kind,
    /// `host:port` fortio connects to.
    pub target: String,
    /// Host / :authority the request names (the proxies route on it).
    pub authority: String,
    pub rps: u32,
    pub connections: u32,
    pub duration: Duration,
}

/// Latencies in milliseconds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub achieved_rps: f64,
    pub requests: u64,
    pub errors: u64,
}

pub fn fortio() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("MUSUBI_FORTIO") {
        return Ok(PathBuf::from(p));
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cached = PathBuf::from(home).join(".cache/musubi/bin/fortio");
    if cached.exists() {
        return Ok(cached);
    }
    bail!("fortio not found: run scripts/bench-tools.sh (or set MUSUBI_FORTIO)")
}

/// Runs fortio pinned to `cpus` and parses its result.
pub async fn run(load: &Load, cpus: Option<&str>) -> Result<Outcome> {
    let fortio = fortio()?;
    let mut args: Vec<String> = vec![
        "load".into(),
        "-quiet".into(),
        "-json".into(),
        "-".into(),
        "-qps".into(),
        load.rps.to_string(),
        "-c".into(),
        load.connections.to_string(),
        "-t".into(),
        format!("{}ms", load.duration.as_millis()),
        // 10 µs histogram resolution: the default 1 ms would hide what a proxy adds.
        "-r".into(),
        "0.00001".into(),
        "-p".into(),
        "50,90,99,99.9".into(),
        "-uniform".into(),
        "-allow-initial-errors".into(),
    ];
    match load.kind {
        Kind::Http1 | Kind::Routed => {
            args.extend(["-H".into(), format!("Host: {}", load.authority)]);
            args.push(format!("http://{}/", load.target));
        }
        Kind::Http2 => {
            args.extend([
                "-h2".into(),
                "-H".into(),
                format!("Host: {}", load.authority),
            ]);
            args.push(format!("http://{}/", load.target));
        }
        Kind::Grpc => {
            args.extend([
                "-grpc".into(),
                "-H".into(),
                format!("Host: {}", load.authority),
            ]);
            args.push(load.target.clone());
        }
    }
    let mut cmd = match cpus {
        Some(c) => {
            let mut cmd = tokio::process::Command::new("taskset");
            cmd.args(["-c", c]).arg(&fortio);
            cmd
        }
        None => tokio::process::Command::new(&fortio),
    };
    let out = cmd
        .args(&args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", fortio.display()))?;
    let json: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "fortio gave no JSON result (exit {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    parse(&json, load.kind)
}

/// Reduces fortio's JSON to an [`Outcome`] (a pure function; tested below).
pub fn parse(json: &Value, kind: Kind) -> Result<Outcome> {
    let hist = &json["DurationHistogram"];
    let pct = |p: f64| -> f64 {
        hist["Percentiles"]
            .as_array()
            .and_then(|ps| {
                ps.iter()
                    .find(|x| (x["Percentile"].as_f64().unwrap_or(-1.0) - p).abs() < 1e-9)
            })
            .and_then(|x| x["Value"].as_f64())
            .unwrap_or(f64::NAN)
            * 1000.0
    };
    let requests = hist["Count"].as_u64().context("fortio JSON: no count")?;
    let ok_code = match kind {
        Kind::Grpc => "SERVING",
        _ => "200",
    };
    let ok = json["RetCodes"][ok_code].as_u64().unwrap_or(0);
    Ok(Outcome {
        p50: pct(50.0),
        p90: pct(90.0),
        p99: pct(99.0),
        p999: pct(99.9),
        max: hist["Max"].as_f64().unwrap_or(f64::NAN) * 1000.0,
        achieved_rps: json["ActualQPS"].as_f64().unwrap_or(0.0),
        requests,
        errors: requests.saturating_sub(ok),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fortio_json() {
        let json = serde_json::json!({
            "ActualQPS": 999.5,
            "RetCodes": { "200": 9990, "503": 5 },
            "DurationHistogram": {
                "Count": 9995, "Max": 0.0042,
                "Percentiles": [
                    { "Percentile": 50, "Value": 0.0002 },
                    { "Percentile": 90, "Value": 0.0003 },
                    { "Percentile": 99, "Value": 0.0005 },
                    { "Percentile": 99.9, "Value": 0.001 }
                ]
            }
        });
        let o = parse(&json, Kind::Http1).unwrap();
        assert_eq!(o.requests, 9995);
        assert_eq!(o.errors, 5);
        assert!((o.p99 - 0.5).abs() < 1e-9);
        assert!((o.p999 - 1.0).abs() < 1e-9);
        assert!((o.max - 4.2).abs() < 1e-9);
        let grpc = serde_json::json!({
            "ActualQPS": 10.0,
            "RetCodes": { "SERVING": 10 },
            "DurationHistogram": { "Count": 10, "Max": 0.001, "Percentiles": [] }
        });
        let o = parse(&grpc, Kind::Grpc).unwrap();
        assert_eq!(o.errors, 0);
        assert!(o.p50.is_nan());
        assert!(parse(&serde_json::json!({}), Kind::Http1).is_err());
    }
}
