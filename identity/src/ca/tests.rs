use super::*;
use crate::testing::TestCa;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_SUBJECT_ALT_NAME};

fn p256_spki() -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    (key, spki)
}

#[test]
fn leaf_is_an_x509_svid() {
    let ca = TestCa::new("cluster.local");
    let id = ca.id("shop", "web");
    let (_key, spki) = p256_spki();
    let now = SystemTime::now();
    let leaf = ca.issuer.sign(&spki, &id, DEFAULT_SVID_TTL, now).unwrap();
    let cert = cert::parse(&leaf.leaf).unwrap();

    // Exactly one URI SAN, critical because the subject is empty.
    let san = cert
        .extensions()
        .iter()
        .find(|e| e.oid == OID_X509_EXT_SUBJECT_ALT_NAME)
        .unwrap();
    assert!(san.critical);
    let ParsedExtension::SubjectAlternativeName(names) = san.parsed_extension() else {
        panic!("SAN does not parse");
    };
    assert_eq!(
        names.general_names,
        vec![GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")]
    );
    assert!(
        cert.subject().iter().next().is_none(),
        "subject should be empty"
    );

    // CA:FALSE, critical.
    let bc = cert
        .extensions()
        .iter()
        .find(|e| e.oid == OID_X509_EXT_BASIC_CONSTRAINTS)
        .unwrap();
    assert!(bc.critical);
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);

    // digitalSignature only; serverAuth + clientAuth.
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature());
    assert!(!ku.key_cert_sign() && !ku.crl_sign());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);

    // Lifetime: backdated a minute, 24 h by default.
    let v = cert::validity(&leaf.leaf).unwrap();
    let secs = |d: Duration| d.as_secs() as i64;
    let nb = secs(now.duration_since(v.not_before).unwrap());
    assert!((59..=61).contains(&nb), "backdated {nb}s");
    let life = secs(v.not_after.duration_since(now).unwrap());
    assert!((86_399..=86_400).contains(&life), "lifetime {life}s");
    assert_eq!(leaf.not_after, v.not_after);

    // The chain handed out is the issuer, not the anchor.
    assert_eq!(leaf.intermediates, vec![ca.issuer.certificate().clone()]);
    assert!(!leaf.intermediates.contains(&ca.root.cert_der));
}

#[test]
fn serials_differ() {
    let ca = TestCa::new("td");
    let id = ca.id("a", "b");
    let (_k, spki) = p256_spki();
    let now = SystemTime::now();
    let a = cert::parse(
        &ca.issuer
            .sign(&spki, &id, DEFAULT_SVID_TTL, now)
            .unwrap()
            .leaf,
    )
    .unwrap()
    .serial
    .clone();
    let b = cert::parse(
        &ca.issuer
            .sign(&spki, &id, DEFAULT_SVID_TTL, now)
            .unwrap()
            .leaf,
    )
    .unwrap()
    .serial
    .clone();
    assert_ne!(a, b);
}

#[test]
fn not_after_is_clamped_to_the_issuer() {
    let ca = TestCa::new("td");
    let (_k, spki) = p256_spki();
    let leaf = ca
        .issuer
        .sign(
            &spki,
            &ca.id("a", "b"),
            Duration::from_secs(86400 * 400),
            SystemTime::now(),
        )
        .unwrap();
    let issuer_not_after = ca.issuer.not_after();
    let got = cert::validity(&leaf.leaf).unwrap().not_after;
    assert_eq!(got, issuer_not_after);
}

#[test]
fn accepted_by_the_spiffe_crate() {
    let ca = TestCa::new("example.org");
    let id = ca.id("billing", "api");
    let svid = ca.svid(&id);
    let chain: Vec<u8> = svid.chain.iter().flat_map(|c| c.to_vec()).collect();
    let parsed = spiffe::X509Svid::parse_from_der(&chain, svid.key.secret_pkcs8_der()).unwrap();
    assert_eq!(parsed.spiffe_id().to_string(), id.to_string());
    let bundle = spiffe::X509Bundle::parse_from_der(
        spiffe::TrustDomain::new("example.org").unwrap(),
        ca.root.cert_der.as_ref(),
    )
    .unwrap();
    assert_eq!(bundle.authorities().len(), 1);
}

#[test]
fn issuer_load_refusals() {
    let ca = TestCa::new("td");
    let other = TestCa::new("td");
    let now = SystemTime::now();
    let leaf = ca.svid(&ca.id("a", "b"));
    let expired = generate_issuer(
        &ca.trust_domain,
        &ca.root.cert_pem,
        &ca.root.key_pem,
        Duration::from_secs(60),
        now - Duration::from_secs(3600),
    )
    .unwrap();
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "leaf as issuer",
            leaf.chain_pem(),
            leaf.key_pem(),
            "not a CA",
        ),
        (
            "key of another issuer",
            ca.issuer_pem.cert_pem.clone(),
            other.issuer_pem.key_pem.clone(),
            "does not match",
        ),
        (
            "issuer from another root",
            other.issuer_pem.cert_pem.clone(),
            other.issuer_pem.key_pem.clone(),
            "trust anchor",
        ),
        (
            "expired",
            expired.cert_pem,
            expired.key_pem,
            "not valid now",
        ),
        (
            "no cert",
            String::new(),
            ca.issuer_pem.key_pem.clone(),
            "CERTIFICATE",
        ),
        (
            "no key",
            ca.issuer_pem.cert_pem.clone(),
            String::new(),
            "private key",
        ),
    ];
    for (name, cert_pem, key_pem, want) in cases {
        let err = Issuer::from_pem(cert_pem.as_bytes(), key_pem.as_bytes(), &ca.bundle, now)
            .expect_err(name);
        assert!(err.to_string().contains(want), "{name}: {err}");
    }
}

#[test]
fn root_can_be_the_issuer() {
    let ca = TestCa::new("td");
    let issuer = Issuer::from_pem(
        ca.root.cert_pem.as_bytes(),
        ca.root.key_pem.as_bytes(),
        &ca.bundle,
        SystemTime::now(),
    )
    .unwrap();
    let (_k, spki) = p256_spki();
    let leaf = issuer
        .sign(&spki, &ca.id("a", "b"), DEFAULT_SVID_TTL, SystemTime::now())
        .unwrap();
    assert_eq!(leaf.intermediates.len(), 1);
}

#[test]
fn issuer_debug_never_prints_the_key() {
    let ca = TestCa::new("td");
    let dbg = format!("{:?}", ca.issuer);
    assert!(!dbg.contains("PRIVATE"));
    let key_body: String = ca.issuer_pem.key_pem.lines().nth(1).unwrap().to_string();
    assert!(!dbg.contains(&key_body));
}
