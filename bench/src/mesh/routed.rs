//! The routed point's service, written once for both pairs: ten rules on `routed.bench`, nine
//! that match a path prefix and a header (the load matches none of them, so every request is
//! checked against all nine) and a catch-all that splits 90/10 between two services. Both
//! services are the same backend behind the same server proxy, so the backend's work is the
//! same as the unrouted point's and the difference is what routing costs.

use anyhow::{Context, Result, bail};
use std::fmt::Write;
use std::net::SocketAddr;
use std::time::Duration;

/// Rules with a prefix and a header match, before the catch-all.
pub const MATCH_RULES: usize = 9;
/// The header those rules match (value: the rule's number).
const HEADER: &str = "x-bench-rule";
/// The catch-all's split: (service / Envoy cluster, weight).
pub const SPLIT: [(&str, u32); 2] = [("routed-a", 90), ("routed-b", 10)];

/// The authority the load names (Musubi's outbound resolves it with the port, Envoy's virtual
/// host matches it without).
pub const MUSUBI_AUTHORITY: &str = "routed.bench:80";
pub const ENVOY_AUTHORITY: &str = "routed.bench";

fn prefix(i: usize) -> String {
    format!("/bench-{i}")
}

/// The mesh file's `services` entries: the routed parent (no endpoints of its own: a request
/// that is not routed fails, so an unrouted run cannot pass for a routed one) and the two
/// split services, both on `endpoints`.
pub fn mesh_services(endpoints: &str) -> String {
    let mut s = String::from("- { name: routed, namespace: bench, port: 80, protocol: detect }\n");
    for (name, _) in SPLIT {
        let _ = writeln!(
            s,
            "- {{ name: {name}, namespace: bench, port: 80, protocol: detect, endpoints: {endpoints} }}"
        );
    }
    s
}

/// The mesh file's `routes` section.
pub fn mesh_routes() -> String {
    let mut s = String::from(
        "routes:\n- name: routed\n  namespace: bench\n  parentRefs: [{ name: routed, port: 80 }]\n  rules:\n",
    );
    for i in 0..MATCH_RULES {
        let _ = writeln!(
            s,
            "  - matches: [{{ path: {{ type: PathPrefix, value: {} }}, headers: [{{ name: {HEADER}, value: \"{i}\" }}] }}]\n    backendRefs: [{{ name: {}, port: 80 }}]",
            prefix(i),
            SPLIT[0].0
        );
    }
    let refs: Vec<String> = SPLIT
        .iter()
        .map(|(name, w)| format!("{{ name: {name}, port: 80, weight: {w} }}"))
        .collect();
    let _ = writeln!(s, "  - backendRefs: [{}]", refs.join(", "));
    s
}

/// Envoy's cluster name for a split service.
pub fn envoy_cluster(service: &str) -> String {
    service.replace('-', "_")
}

/// The client Envoy's virtual host for the routed authority: the same ten routes in the same
/// order (Envoy takes the first match, as Musubi's precedence does here), `path_separated_prefix`
/// being Gateway API's `PathPrefix`.
pub fn envoy_virtual_host() -> String {
    let mut s = format!(
        "\n            - name: routed\n              domains: [\"{ENVOY_AUTHORITY}\"]\n              routes:"
    );
    for i in 0..MATCH_RULES {
        let _ = write!(
            s,
            "\n              - match: {{ path_separated_prefix: \"{}\", headers: [{{ name: {HEADER}, string_match: {{ exact: \"{i}\" }} }}] }}\n                route: {{ cluster: {}, timeout: 0s }}",
            prefix(i),
            envoy_cluster(SPLIT[0].0)
        );
    }
    let clusters: Vec<String> = SPLIT
        .iter()
        .map(|(name, w)| format!("{{ name: {}, weight: {w} }}", envoy_cluster(name)))
        .collect();
    let _ = write!(
        s,
        "\n              - match: {{ prefix: \"/\" }}\n                route: {{ weighted_clusters: {{ clusters: [{}] }}, timeout: 0s }}",
        clusters.join(", ")
    );
    s
}

/// Requests per split service as the client proxy counted them, in [`SPLIT`] order.
pub type Split = Vec<(String, u64)>;

/// From Musubi's `/metrics`: `musubi_proxy_route_requests_total` by backend.
pub fn musubi_split(metrics: &str) -> Split {
    SPLIT
        .iter()
        .map(|(name, _)| {
            let backend = format!("backend=\"{name}.bench.");
            let n = metrics
                .lines()
                .filter(|l| {
                    l.starts_with("musubi_proxy_route_requests_total{") && l.contains(&backend)
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>();
            (name.to_string(), n as u64)
        })
        .collect()
}

/// From Envoy's `/stats`: each split cluster's `upstream_rq_total`.
pub fn envoy_split(stats: &str) -> Split {
    SPLIT
        .iter()
        .map(|(name, _)| {
            let key = format!("cluster.{}.upstream_rq_total: ", envoy_cluster(name));
            let n = stats
                .lines()
                .find_map(|l| l.strip_prefix(&key)?.trim().parse().ok())
                .unwrap_or(0);
            (name.to_string(), n)
        })
        .collect()
}

/// The body of `GET path` from an admin endpoint (HTTP/1.1, `Connection: close`).
pub async fn admin_get(addr: SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).await?;
        anyhow::Ok(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .with_context(|| format!("GET {path} from {addr}: no answer in 5 s"))??;
    let text = String::from_utf8_lossy(&out);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("GET {path} from {addr}: no HTTP response");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "GET {path} from {addr}: {}",
            head.lines().next().unwrap_or("")
        );
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_string())
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_rules_on_both_pairs() {
        let routes = mesh_routes();
        assert_eq!(routes.matches("  - ").count(), MATCH_RULES + 1);
        assert_eq!(routes.matches("x-bench-rule").count(), MATCH_RULES);
        assert!(routes.contains("weight: 90") && routes.contains("weight: 10"));
        let vhost = envoy_virtual_host();
        assert_eq!(vhost.matches("- match:").count(), MATCH_RULES + 1);
        assert!(vhost.contains("{ name: routed_a, weight: 90 }, { name: routed_b, weight: 10 }"));
        // The load's path, `/`, matches none of the nine prefixes.
        assert!((0..MATCH_RULES).all(|i| prefix(i) != "/"));
    }

    #[test]
    fn splits_from_counters() {
        let metrics = "# TYPE musubi_proxy_route_requests counter\n\
            musubi_proxy_route_requests_total{route=\"bench/routed\",backend=\"routed-a.bench.svc.cluster.local:80\"} 900\n\
            musubi_proxy_route_requests_total{route=\"bench/routed\",backend=\"routed-b.bench.svc.cluster.local:80\"} 100\n\
            musubi_proxy_requests_total{backend=\"routed-a.bench.svc.cluster.local:80\"} 7\n";
        assert_eq!(
            musubi_split(metrics),
            vec![("routed-a".into(), 900), ("routed-b".into(), 100)]
        );
        let stats = "cluster.routed_a.upstream_rq_total: 91\ncluster.routed_b.upstream_rq_total: 9\ncluster.server_http.upstream_rq_total: 5\n";
        assert_eq!(
            envoy_split(stats),
            vec![("routed-a".into(), 91), ("routed-b".into(), 9)]
        );
        assert_eq!(musubi_split("")[0].1, 0);
        assert_eq!(dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
        assert_eq!(dechunk("zz\r\n"), "");
    }
}
