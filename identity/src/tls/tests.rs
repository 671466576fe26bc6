//! Real handshakes over real sockets: a matrix of good and bad peers.

use super::*;
use crate::testing::{TestCa, TestSvid};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ALPN: &[&[u8]] = &[b"musubi.test"];

struct Outcome {
    /// What the server saw: the client's identity, or the handshake/IO error.
    server: Result<Option<SpiffeId>, String>,
    /// What the client saw: the echoed reply, or the error (TLS 1.3 reports a rejected client
    /// certificate only when the client reads).
    client: Result<Vec<u8>, String>,
}

async fn exchange(server_cfg: Arc<ServerConfig>, client_cfg: Arc<ClientConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsAcceptor::from(server_cfg)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let peer = peer_identity(tls.get_ref().1.peer_certificates());
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(b"pong!").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let client = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(client_cfg)
            .connect(mesh_server_name(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"ping!").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(buf)
    }
    .await;
    let server = server.await.unwrap();
    Outcome { server, client }
}

struct World {
    ca: TestCa,
    server_id: SpiffeId,
    client_id: SpiffeId,
}

fn world() -> World {
    crate::crypto::install_default();
    let ca = TestCa::new("cluster.local");
    let server_id = ca.id("shop", "api");
    let client_id = ca.id("shop", "web");
    World {
        ca,
        server_id,
        client_id,
    }
}

fn server_cfg(w: &World, svid: &TestSvid) -> Arc<ServerConfig> {
    server_config(svid.store(), &w.ca.bundle, ClientAuth::Required, ALPN).unwrap()
}

fn client_cfg(w: &World, svid: Option<&TestSvid>, expect: &SpiffeId) -> Arc<ClientConfig> {
    client_config(
        svid.map(|s| s.store()),
        &w.ca.bundle,
        ServerIdentity::Exactly(expect.clone()),
        ALPN,
    )
    .unwrap()
}

#[tokio::test]
async fn good_peers_see_each_other() {
    let w = world();
    let out = exchange(
        server_cfg(&w, &w.ca.svid(&w.server_id)),
        client_cfg(&w, Some(&w.ca.svid(&w.client_id)), &w.server_id),
    )
    .await;
    assert_eq!(out.client.unwrap(), b"pong!");
    assert_eq!(out.server.unwrap(), Some(w.client_id.clone()));
}

#[tokio::test]
async fn any_of_accepts_listed_identities() {
    let w = world();
    let cfg = client_config(
        Some(w.ca.svid(&w.client_id).store()),
        &w.ca.bundle,
        ServerIdentity::AnyOf(vec![w.ca.id("x", "y"), w.server_id.clone()]),
        ALPN,
    )
    .unwrap();
    let out = exchange(server_cfg(&w, &w.ca.svid(&w.server_id)), cfg).await;
    assert_eq!(out.client.unwrap(), b"pong!");
}

/// Bad servers: the client must refuse inside the handshake, with a reason.
#[tokio::test]
async fn client_refuses_bad_servers() {
    let w = world();
    let foreign = TestCa::new("cluster.local");
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cases: Vec<(&str, TestSvid, &str)> = vec![
        (
            "wrong identity",
            w.ca.svid(&w.ca.id("shop", "db")),
            "expected spiffe://cluster.local/ns/shop/sa/api",
        ),
        (
            "foreign trust domain",
            w.ca.svid(&SpiffeId::parse("spiffe://evil.org/ns/shop/sa/api").unwrap()),
            "not in trust domain cluster.local",
        ),
        (
            "expired",
            w.ca.svid_at(&w.server_id, now - 3 * hour, hour),
            "expired",
        ),
        (
            "not yet valid",
            w.ca.svid_at(&w.server_id, now + 2 * hour, hour),
            "not valid yet",
        ),
        ("unknown CA", foreign.svid(&w.server_id), "BadSignature"),
    ];
    for (name, svid, want) in cases {
        let out = exchange(
            server_cfg(&w, &svid),
            client_cfg(&w, Some(&w.ca.svid(&w.client_id)), &w.server_id),
        )
        .await;
        let err = out.client.expect_err(name);
        assert!(
            err.contains(want),
            "{name}: client error {err:?} lacks {want:?}"
        );
        assert!(
            out.server.is_err(),
            "{name}: server should see the handshake fail"
        );
    }
}

/// Bad clients: the server must refuse; the client learns it on its first read.
#[tokio::test]
async fn server_refuses_bad_clients() {
    let w = world();
    let foreign = TestCa::new("cluster.local");
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cases: Vec<(&str, Option<TestSvid>, &str)> = vec![
        ("no client certificate", None, "no certificates"),
        (
            "foreign trust domain",
            Some(w.ca.svid(&SpiffeId::parse("spiffe://evil.org/ns/shop/sa/web").unwrap())),
            "not in trust domain cluster.local",
        ),
        (
            "expired",
            Some(w.ca.svid_at(&w.client_id, now - 3 * hour, hour)),
            "expired",
        ),
        (
            "not yet valid",
            Some(w.ca.svid_at(&w.client_id, now + 2 * hour, hour)),
            "not valid yet",
        ),
        (
            "unknown CA with a look-alike name",
            Some(foreign.svid(&w.client_id)),
            "BadSignature",
        ),
        (
            "CA of another name",
            Some(TestCa::new("elsewhere").svid(&w.client_id)),
            "UnknownIssuer",
        ),
    ];
    for (name, svid, want) in cases {
        let out = exchange(
            server_cfg(&w, &w.ca.svid(&w.server_id)),
            client_cfg(&w, svid.as_ref(), &w.server_id),
        )
        .await;
        let server_err = out.server.expect_err(name);
        assert!(
            server_err.contains(want),
            "{name}: server error {server_err:?} lacks {want:?}"
        );
        assert!(out.client.is_err(), "{name}: client must not get a reply");
    }
}

#[tokio::test]
async fn live_connection_survives_rotation_and_new_handshakes_use_the_new_cert() {
    let w = world();
    let first = w.ca.svid(&w.server_id);
    let store = first.store();
    let server_cfg =
        server_config(store.clone(), &w.ca.bundle, ClientAuth::Required, ALPN).unwrap();
    let client_cfg = client_cfg(&w, Some(&w.ca.svid(&w.client_id)), &w.server_id);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4];
                while tls.read_exact(&mut buf).await.is_ok() {
                    if tls.write_all(&buf).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let connect = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(client_cfg.clone())
            .connect(mesh_server_name(), tcp)
            .await
            .unwrap()
    };
    let leaf_of = |tls: &tokio_rustls::client::TlsStream<TcpStream>| {
        crate::cert::fingerprint(&tls.get_ref().1.peer_certificates().unwrap()[0])
    };
    let mut live = connect().await;
    let mut buf = [0u8; 4];
    live.write_all(b"one!").await.unwrap();
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(leaf_of(&live), crate::cert::fingerprint(&first.chain[0]));

    let second = w.ca.svid(&w.server_id);
    store
        .install(second.chain.clone(), second.key.clone_key())
        .unwrap();

    live.write_all(b"two!").await.unwrap();
    live.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"two!");
    assert_eq!(leaf_of(&live), crate::cert::fingerprint(&first.chain[0]));

    let fresh = connect().await;
    assert_eq!(leaf_of(&fresh), crate::cert::fingerprint(&second.chain[0]));
}

#[test]
fn mesh_server_name_is_valid() {
    assert_eq!(
        format!("{:?}", mesh_server_name()),
        format!("{:?}", ServerName::try_from("musubi.mesh").unwrap())
    );
}
