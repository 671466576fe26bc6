use super::*;
use crate::testing::TestCa;

#[test]
fn certify_for_table() {
    let ca = TestCa::new("cluster.local");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr_for = |ns, sa| crate::csr::build_csr(&key, &ca.id(ns, sa)).unwrap();
    let w = |ns: &str, sa: &str| Workload {
        namespace: ns.into(),
        service_account: sa.into(),
    };
    let ttl = Duration::from_secs(3600);
    let now = SystemTime::now();
    let cases: Vec<(&str, Workload, Vec<u8>, Result<&str, &str>)> = vec![
        (
            "matching",
            w("a", "x"),
            csr_for("a", "x"),
            Ok("spiffe://cluster.local/ns/a/sa/x"),
        ),
        (
            "escalation",
            w("a", "x"),
            csr_for("a", "y"),
            Err("csr_identity_mismatch"),
        ),
        (
            "other namespace",
            w("a", "x"),
            csr_for("b", "x"),
            Err("csr_identity_mismatch"),
        ),
        (
            "token names an invalid account",
            w("a", "X_Y"),
            csr_for("a", "x"),
            Err("token_bad_identity"),
        ),
        (
            "garbage CSR",
            w("a", "x"),
            b"nope".to_vec(),
            Err("csr_malformed"),
        ),
    ];
    for (name, workload, csr, want) in cases {
        let got = certify_for(&ca.issuer, &ca.trust_domain, ttl, &workload, &csr, now)
            .map(|(id, leaf)| {
                assert_eq!(crate::cert::spiffe_id(&leaf.leaf).unwrap(), id, "{name}");
                id.to_string()
            })
            .map_err(|r| r.reason);
        assert_eq!(got.as_deref().map_err(|e| *e), want, "{name}");
    }
}

#[test]
fn refusals_map_to_grpc_codes() {
    let r: Refusal = TokenError::Expired.into();
    assert_eq!(
        (r.code, r.reason),
        (tonic::Code::Unauthenticated, "token_expired")
    );
    let r: Refusal = TokenError::Unavailable("down".into()).into();
    assert_eq!(r.code, tonic::Code::Unavailable);
    let r: Refusal = CsrError::BadSignature.into();
    assert_eq!(
        (r.code, r.reason),
        (tonic::Code::InvalidArgument, "csr_bad_signature")
    );
    let status = r.into_status();
    assert_eq!(
        status.metadata().get(REFUSAL_HEADER).unwrap(),
        "csr_bad_signature"
    );
}

#[test]
fn client_refusals_say_what_to_do() {
    let peer: IpAddr = "10.1.2.3".parse().unwrap();
    let cases = [
        (
            ClientRefusal::Busy { limit: 4 },
            "client_limit",
            &["10.1.2.3", "at most 4", "wait for the earlier ones"][..],
        ),
        (
            ClientRefusal::Throttled {
                retry_after: Duration::from_millis(2500),
            },
            "client_refusal_rate",
            &["10.1.2.3", "invalid tokens", "retry in 2 s"][..],
        ),
        (
            ClientRefusal::Throttled {
                retry_after: Duration::from_millis(10),
            },
            "client_refusal_rate",
            &["retry in 1 s"][..],
        ),
        (
            ClientRefusal::Full,
            "overloaded",
            &["retry with backoff"][..],
        ),
    ];
    for (refused, reason, words) in cases {
        let r = client_refusal(&refused, peer);
        assert_eq!(
            (r.code, r.reason),
            (tonic::Code::ResourceExhausted, reason),
            "{refused:?}"
        );
        for w in words {
            assert!(
                r.message.contains(w),
                "{refused:?}: {:?} lacks {w:?}",
                r.message
            );
        }
    }
}

#[test]
fn clients_are_keyed_by_canonical_ip() {
    let cases = [
        (Some("10.0.0.1:443"), "10.0.0.1"),
        (Some("[::ffff:10.0.0.1]:443"), "10.0.0.1"),
        (Some("[2001:db8::1]:443"), "2001:db8::1"),
        (None, "::"),
    ];
    for (peer, want) in cases {
        let peer = peer.map(|p| p.parse().unwrap());
        assert_eq!(client_ip(peer).to_string(), want, "{peer:?}");
    }
}
