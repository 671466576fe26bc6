//! Test support: throwaway CAs and SVIDs generated at test time. Used by this crate's tests,
//! the cross-process suite and benchmarks; never by production code paths.

use crate::bundle::TrustBundle;
use crate::ca::{self, Issuer};
use crate::spiffe_id::{SpiffeId, TrustDomain};
use crate::store::CredentialStore;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A root + issuer pair for one trust domain, all in memory.
pub struct TestCa {
    pub trust_domain: TrustDomain,
    pub root: ca::GeneratedCa,
    pub issuer_pem: ca::GeneratedCa,
    pub bundle: TrustBundle,
    pub issuer: Issuer,
}

/// A leaf SVID with its key.
pub struct TestSvid {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
    pub key_pair: rcgen::KeyPair,
}

impl TestSvid {
    pub fn store(&self) -> Arc<CredentialStore> {
        let store = CredentialStore::new();
        if let Err(e) = store.install(self.chain.clone(), self.key.clone_key()) {
            panic!("installing a test SVID: {e}");
        }
        store
    }

    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| crate::pem::encode_cert(c))
            .collect()
    }

    pub fn key_pem(&self) -> String {
        self.key_pair.serialize_pem()
    }
}

#[allow(clippy::expect_used)] // test support: failing loudly is the point
impl TestCa {
    pub fn new(td: &str) -> Self {
        let trust_domain = TrustDomain::new(td).expect("trust domain");
        let now = SystemTime::now();
        let root =
            ca::generate_root(&trust_domain, Duration::from_secs(86400 * 365), now).expect("root");
        let issuer_pem = ca::generate_issuer(
            &trust_domain,
            &root.cert_pem,
            &root.key_pem,
            Duration::from_secs(86400 * 30),
            now,
        )
        .expect("issuer");
        let bundle =
            TrustBundle::new(trust_domain.clone(), vec![root.cert_der.clone()]).expect("bundle");
        let issuer = Issuer::from_pem(
            issuer_pem.cert_pem.as_bytes(),
            issuer_pem.key_pem.as_bytes(),
            &bundle,
            now,
        )
        .expect("issuer loads");
        TestCa {
            trust_domain,
            root,
            issuer_pem,
            bundle,
            issuer,
        }
    }

    pub fn id(&self, ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::workload(&self.trust_domain, ns, sa).expect("id")
    }

    /// A valid 1-hour SVID for `id` (which may be of any trust domain: the CA signs what it is told).
    pub fn svid(&self, id: &SpiffeId) -> TestSvid {
        self.svid_at(id, SystemTime::now(), Duration::from_secs(3600))
    }

    /// An SVID as if issued at `now` for `ttl` (past `now` for expired, future for not-yet-valid).
    pub fn svid_at(&self, id: &SpiffeId, now: SystemTime, ttl: Duration) -> TestSvid {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key_pair);
        let leaf = self.issuer.sign(&spki, id, ttl, now).expect("sign");
        let mut chain = vec![leaf.leaf];
        chain.extend(leaf.intermediates);
        TestSvid {
            chain,
            key: PrivatePkcs8KeyDer::from(key_pair.serialize_der()),
            key_pair,
        }
    }
}

/// Parses a DER chain + PKCS#8 key with the `spiffe` crate (the reference X509-SVID rules) and
/// returns the SPIFFE ID it found.
pub fn spiffe_svid_id(chain_der: &[u8], pkcs8_key: &[u8]) -> Result<String, String> {
    spiffe::X509Svid::parse_from_der(chain_der, pkcs8_key)
        .map(|svid| svid.spiffe_id().to_string())
        .map_err(|e| e.to_string())
}
