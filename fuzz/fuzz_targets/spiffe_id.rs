//! SPIFFE IDs and trust domains from strings (certificate SANs, policy rules, discovery
//! endpoints): no panics, and whatever parses prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use musubi_identity::{SpiffeId, TrustDomain, Workload};
use std::sync::LazyLock;

static CLUSTER_LOCAL: LazyLock<TrustDomain> =
    LazyLock::new(|| TrustDomain::new("cluster.local").expect("a valid trust domain"));

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = SpiffeId::parse(text) {
        check_id(&id);
    }
    if let Ok(td) = TrustDomain::new(text) {
        check_trust_domain(text, &td);
    }
    // The input as `<namespace>\n<service account>` for a workload ID.
    let (namespace, account) = text.split_once('\n').unwrap_or((text, "default"));
    if let Ok(id) = SpiffeId::workload(&CLUSTER_LOCAL, namespace, account) {
        check_id(&id);
        let names = Workload {
            namespace: namespace.to_string(),
            service_account: account.to_string(),
        };
        assert_eq!(id.workload_names(), Some(names), "{id}");
        assert!(id.is_member_of(&CLUSTER_LOCAL));
    }
});

fn check_id(id: &SpiffeId) {
    let text = id.to_string();
    let again = SpiffeId::parse(&text).unwrap_or_else(|e| panic!("{text:?} does not parse: {e}"));
    assert_eq!(&again, id);
    assert_eq!(again.as_str(), text);
    assert_eq!(id.uri(), text);
    let td = id.trust_domain();
    assert_eq!(td.as_str(), id.trust_domain_name());
    assert!(id.is_member_of(&td));
    assert_eq!(text, format!("spiffe://{td}{}", id.path()));
    assert_eq!(TrustDomain::new(td.as_str()).as_ref(), Ok(&td));
    if let Some(w) = id.workload_names() {
        assert_eq!(id.namespace().as_ref(), Some(&w.namespace));
        // The stricter Kubernetes name rules may refuse the names; if not, same ID.
        if let Ok(built) = SpiffeId::workload(&td, &w.namespace, &w.service_account) {
            assert_eq!(&built, id);
        }
    }
}

fn check_trust_domain(text: &str, td: &TrustDomain) {
    assert_eq!(td.as_str(), text.to_ascii_lowercase(), "stored lowercase");
    assert_eq!(TrustDomain::new(&td.to_string()).as_ref(), Ok(td));
    let id = SpiffeId::workload(td, "ns", "sa")
        .unwrap_or_else(|e| panic!("no workload ID in trust domain {td}: {e}"));
    assert!(id.is_member_of(td));
    assert_eq!(id.trust_domain(), *td);
}
