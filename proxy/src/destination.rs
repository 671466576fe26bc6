//! What discovery says is behind a destination, as the proxy uses it; converted once from the
//! controller's protobuf, refusing anything malformed.

use musubi_identity::SpiffeId;
use musubi_proto::discovery::v1 as pb;
use std::net::{IpAddr, SocketAddr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Protocol {
    Detect,
    Http1,
    Http2,
    Opaque,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    /// Where to connect: the endpoint proxy's inbound listener (explicit mode) or the
    /// application port itself (transparent mode: the far side's iptables redirect it).
    pub connect: SocketAddr,
    /// The application port, conveyed in the transport header.
    pub app_port: u16,
    /// The SPIFFE ID its proxy must present; `None` for an endpoint outside the mesh.
    #[serde(serialize_with = "ser_id")]
    pub identity: Option<SpiffeId>,
    pub weight: u32,
    pub transport: Transport,
    /// For an endpoint without identity: it may be reached in plaintext (its namespace is
    /// PERMISSIVE). Otherwise clients refuse it.
    pub plaintext_allowed: bool,
}

/// How to talk to an endpoint's proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Transport {
    /// Another Musubi proxy: ALPN `musubi.transport/1` and the transport header.
    Musubi,
    /// Any mTLS peer speaking HTTP/2 (ALPN `h2`), such as an Envoy sidecar.
    H2Mtls,
}

fn ser_id<S: serde::Serializer>(id: &Option<SpiffeId>, s: S) -> Result<S::Ok, S::Error> {
    match id {
        Some(id) => s.serialize_some(&id.to_string()),
        None => s.serialize_none(),
    }
}

/// A meshed service behind a destination.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Destination {
    pub authority: String,
    pub protocol: Protocol,
    /// Ready endpoints only.
    pub endpoints: Vec<Endpoint>,
    /// Empty: every request goes to `endpoints`.
    pub routes: crate::route::Routes,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    #[error("endpoint #{index}: address {address:?} is not an IP address")]
    BadAddress { index: usize, address: String },
    #[error("endpoint #{index}: port {port} is not valid")]
    BadPort { index: usize, port: u32 },
    #[error("endpoint #{index}: identity: {reason}")]
    BadIdentity { index: usize, reason: String },
    #[error("update names neither a service nor `unknown`")]
    Empty,
}

fn port(index: usize, p: u32) -> Result<u16, DestinationError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0)
        .ok_or(DestinationError::BadPort { index, port: p })
}

/// `Ok(None)`: the destination is not a meshed service.
pub fn from_update(u: &pb::ServiceUpdate) -> Result<Option<Destination>, DestinationError> {
    if u.unknown {
        return Ok(None);
    }
    let s = u.service.as_ref().ok_or(DestinationError::Empty)?;
    let protocol = match pb::Protocol::try_from(s.protocol).unwrap_or(pb::Protocol::Detect) {
        pb::Protocol::Detect => Protocol::Detect,
        pb::Protocol::Http1 => Protocol::Http1,
        pb::Protocol::Http2 => Protocol::Http2,
        pb::Protocol::Opaque => Protocol::Opaque,
    };
    let mut endpoints = Vec::new();
    for (index, e) in s.endpoints.iter().enumerate() {
        let ip: IpAddr = e
            .address
            .parse()
            .map_err(|_| DestinationError::BadAddress {
                index,
                address: e.address.clone(),
            })?;
        let app_port = port(index, e.port)?;
        let connect_port = if e.proxy_port == 0 {
            app_port
        } else {
            port(index, e.proxy_port)?
        };
        let identity = if e.identity.is_empty() {
            None
        } else {
            Some(
                SpiffeId::parse(&e.identity).map_err(|err| DestinationError::BadIdentity {
                    index,
                    reason: err.to_string(),
                })?,
            )
        };
        if e.ready {
            endpoints.push(Endpoint {
                connect: SocketAddr::new(ip, connect_port),
                app_port,
                identity,
                weight: e.weight.max(1),
                transport: match pb::Transport::try_from(e.transport)
                    .unwrap_or(pb::Transport::Musubi)
                {
                    pb::Transport::Musubi => Transport::Musubi,
                    pb::Transport::H2Mtls => Transport::H2Mtls,
                },
                plaintext_allowed: e.plaintext_allowed,
            });
        }
    }
    Ok(Some(Destination {
        authority: s.authority.clone(),
        protocol,
        endpoints,
        routes: crate::route::Routes::from_pb(&s.routes),
        version: u.version,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(address: &str, port: u32, proxy_port: u32, identity: &str, ready: bool) -> pb::Endpoint {
        pb::Endpoint {
            address: address.into(),
            port,
            identity: identity.into(),
            weight: 0,
            ready,
            proxy_port,
            labels: Default::default(),
            transport: 0,
            plaintext_allowed: false,
        }
    }

    fn update(endpoints: Vec<pb::Endpoint>) -> pb::ServiceUpdate {
        pb::ServiceUpdate {
            unknown: false,
            version: 3,
            service: Some(pb::Service {
                name: "api".into(),
                namespace: "shop".into(),
                authority: "api.shop.svc.cluster.local:80".into(),
                port: 80,
                protocol: pb::Protocol::Http1 as i32,
                endpoints,
                routes: vec![],
                client_policy: None,
            }),
        }
    }

    #[test]
    fn conversion_table() {
        let id = "spiffe://cluster.local/ns/shop/sa/api";
        let d = from_update(&update(vec![
            ep("127.0.0.1", 9001, 14143, id, true),
            ep("10.0.0.2", 9001, 0, "", true),
            ep("10.0.0.3", 9001, 0, id, false),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(d.protocol, Protocol::Http1);
        assert_eq!(d.endpoints.len(), 2, "not-ready endpoints are left out");
        assert_eq!(d.endpoints[0].connect.to_string(), "127.0.0.1:14143");
        assert_eq!(d.endpoints[0].app_port, 9001);
        assert_eq!(d.endpoints[0].weight, 1);
        assert_eq!(d.endpoints[1].connect.to_string(), "10.0.0.2:9001");
        assert_eq!(d.endpoints[1].identity, None);

        let unknown = pb::ServiceUpdate {
            unknown: true,
            ..Default::default()
        };
        assert_eq!(from_update(&unknown), Ok(None));
        assert_eq!(
            from_update(&pb::ServiceUpdate::default()),
            Err(DestinationError::Empty)
        );
        let bad = [
            (ep("nope", 80, 0, id, true), "not an IP"),
            (ep("10.0.0.1", 0, 0, id, true), "port 0"),
            (ep("10.0.0.1", 80, 70000, id, true), "port 70000"),
            (ep("10.0.0.1", 80, 0, "http://x", true), "identity"),
        ];
        for (e, says) in bad {
            let err = from_update(&update(vec![e])).unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
    }
}
