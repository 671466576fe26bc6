use super::*;
use crate::spiffe_id::TrustDomain;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::workload(&TrustDomain::new("cluster.local").unwrap(), ns, sa).unwrap()
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

fn csr_with(key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = sans;
    params.serialize_request(key).unwrap().der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

#[test]
fn accepts_matching_or_absent_san() {
    let key = p256();
    let me = id("a", "x");
    let good = build_csr(&key, &me).unwrap();
    let checked = check_csr(&good, &me).unwrap();
    assert_eq!(
        checked.spki_der,
        rcgen::PublicKeyData::subject_public_key_info(&key)
    );
    assert!(check_csr(&csr_with(&key, vec![]), &me).is_ok());
}

#[test]
fn refusal_table() {
    let key = p256();
    let me = id("a", "x");
    let mut tampered = build_csr(&key, &me).unwrap();
    // Flip a bit inside the signed info (the SAN's last character): the signature breaks.
    let pos = tampered
        .windows(3)
        .position(|w| w == b"a/x" || w == b"/sa")
        .unwrap();
    tampered[pos] ^= 0x01;
    let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let mut trailing = build_csr(&key, &me).unwrap();
    trailing.push(0);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "escalation: CSR for another service account",
            build_csr(&key, &id("a", "y")).unwrap(),
            "csr_identity_mismatch",
        ),
        (
            "another trust domain",
            csr_with(&key, vec![uri("spiffe://evil.org/ns/a/sa/x")]),
            "csr_identity_mismatch",
        ),
        (
            "extra DNS SAN",
            csr_with(
                &key,
                vec![
                    uri(&me.uri()),
                    SanType::DnsName("x.a.svc".try_into().unwrap()),
                ],
            ),
            "csr_extra_san",
        ),
        (
            "IP SAN",
            csr_with(&key, vec![SanType::IpAddress("10.0.0.1".parse().unwrap())]),
            "csr_extra_san",
        ),
        (
            "e-mail SAN",
            csr_with(&key, vec![SanType::Rfc822Name("a@b.c".try_into().unwrap())]),
            "csr_extra_san",
        ),
        (
            "two URIs, both ours",
            csr_with(&key, vec![uri(&me.uri()), uri(&me.uri())]),
            "csr_extra_san",
        ),
        ("bad signature", tampered, "csr_bad_signature"),
        (
            "P-384 key",
            build_csr(&p384, &me).unwrap(),
            "csr_unsupported_key",
        ),
        (
            "Ed25519 key",
            build_csr(&ed, &me).unwrap(),
            "csr_unsupported_key",
        ),
        ("garbage", b"not a csr".to_vec(), "csr_malformed"),
        ("empty", vec![], "csr_malformed"),
        ("trailing bytes", trailing, "csr_malformed"),
        ("oversized", vec![0x30; MAX_CSR_BYTES + 1], "csr_too_large"),
    ];
    for (name, der, reason) in cases {
        let err = check_csr(&der, &me).expect_err(name);
        assert_eq!(err.reason(), reason, "{name}: {err}");
        assert!(!err.to_string().is_empty());
    }
}

#[test]
fn mismatch_message_names_both_identities() {
    let key = p256();
    let err = check_csr(&build_csr(&key, &id("a", "y")).unwrap(), &id("a", "x")).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("spiffe://cluster.local/ns/a/sa/y"), "{msg}");
    assert!(msg.contains("spiffe://cluster.local/ns/a/sa/x"), "{msg}");
}
