//! Certificate signing requests as the identity service receives them from workloads, and the
//! same bytes as a peer's certificate (the SPIFFE ID and validity the proxies read from it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use musubi_identity::SpiffeId;
use musubi_identity::{cert, csr};
use std::sync::LazyLock;

/// The identity the token proved (the seeds' CSRs ask for this one, or for another).
static PROVEN: LazyLock<SpiffeId> = LazyLock::new(|| {
    SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").expect("a valid SPIFFE ID")
});

fuzz_target!(|data: &[u8]| {
    match csr::check_csr(data, &PROVEN) {
        Ok(checked) => assert!(!checked.spki_der.is_empty()),
        Err(e) => {
            let _ = (e.reason(), e.to_string());
        }
    }
    let _ = cert::spiffe_id(data);
    let _ = cert::validity(data);
});
