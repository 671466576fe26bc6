//! The transport header: the first bytes a client proxy sends on a new mTLS connection to a
//! server proxy, saying what the connection is for. Documented in `docs/transport.md`.
//!
//! ```text
//! "MSB" 0x01 | u16 length (big endian) | TLV fields (u8 type, u16 length, value)...
//! ```
//! Fields: 1 = target port (u16), 2 = protocol (u8), 3 = authority (UTF-8, for logs and
//! metrics). Unknown field types are skipped, so fields can be added without breaking older
//! proxies. The whole header is at most [`MAX_LEN`] bytes.

use tokio::io::{AsyncRead, AsyncReadExt};

pub const MAGIC: [u8; 4] = *b"MSB\x01";
/// Largest header accepted, in bytes after the length field.
pub const MAX_LEN: usize = 1024;

/// What rides on the connection after the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/2 connection between the proxies carrying the application's requests
    /// (HTTP/1.1 or HTTP/2 from the app; each request says which).
    Http2 = 1,
    /// One HTTP/1.1 connection, passed through as HTTP/1.1 (used for `Upgrade`, e.g. websockets).
    Http1 = 2,
    /// Opaque bytes.
    Opaque = 3,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub port: u16,
    pub protocol: Protocol,
    pub authority: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a Musubi transport header (bad magic)")]
    BadMagic,
    #[error("transport header is {0} bytes; at most {MAX_LEN} are allowed")]
    TooLong(usize),
    #[error("transport header is truncated")]
    Truncated,
    #[error("transport header has no target port")]
    NoPort,
    #[error("transport header has no protocol")]
    NoProtocol,
    #[error("transport header field {field} is malformed")]
    BadField { field: u8 },
    #[error("reading the transport header: {0}")]
    Io(String),
}

const FIELD_PORT: u8 = 1;
const FIELD_PROTOCOL: u8 = 2;
const FIELD_AUTHORITY: u8 = 3;

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(32);
        let mut field = |t: u8, v: &[u8]| {
            body.push(t);
            body.extend_from_slice(&(v.len() as u16).to_be_bytes());
            body.extend_from_slice(v);
        };
        field(FIELD_PORT, &self.port.to_be_bytes());
        field(FIELD_PROTOCOL, &[self.protocol as u8]);
        if let Some(a) = &self.authority {
            // Authorities longer than the limit are only informational; cut them, at a
            // character boundary so that the cut one is still UTF-8 (found by fuzzing).
            let mut end = a.len().min(255);
            while !a.is_char_boundary(end) {
                end -= 1;
            }
            field(FIELD_AUTHORITY, &a.as_bytes()[..end]);
        }
        let mut out = Vec::with_capacity(6 + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes the fields (the part after magic and length).
    pub fn decode_body(mut body: &[u8]) -> Result<Header, HeaderError> {
        let (mut port, mut protocol, mut authority) = (None, None, None);
        while !body.is_empty() {
            if body.len() < 3 {
                return Err(HeaderError::Truncated);
            }
            let t = body[0];
            let len = u16::from_be_bytes([body[1], body[2]]) as usize;
            let value = body.get(3..3 + len).ok_or(HeaderError::Truncated)?;
            body = &body[3 + len..];
            match t {
                FIELD_PORT => {
                    let v: [u8; 2] = value
                        .try_into()
                        .map_err(|_| HeaderError::BadField { field: t })?;
                    let p = u16::from_be_bytes(v);
                    if p == 0 {
                        return Err(HeaderError::BadField { field: t });
                    }
                    port = Some(p);
                }
                FIELD_PROTOCOL => {
                    protocol = Some(match value {
                        [1] => Protocol::Http2,
                        [2] => Protocol::Http1,
                        [3] => Protocol::Opaque,
                        _ => return Err(HeaderError::BadField { field: t }),
                    });
                }
                FIELD_AUTHORITY => {
                    let s = std::str::from_utf8(value)
                        .map_err(|_| HeaderError::BadField { field: t })?;
                    authority = Some(s.to_string());
                }
                _ => {} // unknown fields are skipped: newer proxies may send more
            }
        }
        Ok(Header {
            port: port.ok_or(HeaderError::NoPort)?,
            protocol: protocol.ok_or(HeaderError::NoProtocol)?,
            authority,
        })
    }

    /// Reads exactly one header from `io`, nothing more.
    pub async fn read<R: AsyncRead + Unpin>(io: &mut R) -> Result<Header, HeaderError> {
        let mut prefix = [0u8; 6];
        io.read_exact(&mut prefix).await.map_err(io_err)?;
        if prefix[..4] != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let len = u16::from_be_bytes([prefix[4], prefix[5]]) as usize;
        if len > MAX_LEN {
            return Err(HeaderError::TooLong(len));
        }
        let mut body = vec![0u8; len];
        io.read_exact(&mut body).await.map_err(io_err)?;
        Header::decode_body(&body)
    }
}

fn io_err(e: std::io::Error) -> HeaderError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        HeaderError::Truncated
    } else {
        HeaderError::Io(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(port: u16, protocol: Protocol, authority: Option<&str>) -> Header {
        Header {
            port,
            protocol,
            authority: authority.map(str::to_string),
        }
    }

    #[tokio::test]
    async fn round_trip() {
        for header in [
            h(8080, Protocol::Http2, Some("api.shop:8080")),
            h(1, Protocol::Opaque, None),
            h(65535, Protocol::Http1, Some("")),
        ] {
            let bytes = header.encode();
            let mut rest = &bytes[..];
            assert_eq!(Header::read(&mut rest).await.unwrap(), header);
            assert!(rest.is_empty(), "read must not consume past the header");
        }
    }

    #[tokio::test]
    async fn a_long_authority_is_cut_on_a_character_boundary() {
        let long = format!("{}é", "a".repeat(254));
        let bytes = h(80, Protocol::Http2, Some(&long)).encode();
        let got = Header::read(&mut &bytes[..]).await.unwrap();
        assert_eq!(got.authority.as_deref(), Some("a".repeat(254).as_str()));
    }

    #[tokio::test]
    async fn leaves_following_bytes_unread() {
        let mut bytes = h(80, Protocol::Opaque, None).encode();
        bytes.extend_from_slice(b"payload");
        let mut rest = &bytes[..];
        Header::read(&mut rest).await.unwrap();
        assert_eq!(rest, b"payload");
    }

    #[test]
    fn decode_table() {
        let field = |t: u8, v: &[u8]| {
            let mut f = vec![t];
            f.extend_from_slice(&(v.len() as u16).to_be_bytes());
            f.extend_from_slice(v);
            f
        };
        let port = field(1, &8080u16.to_be_bytes());
        let proto = field(2, &[3]);
        let cases: Vec<(&str, Vec<u8>, Result<Header, HeaderError>)> = vec![
            (
                "minimal",
                [port.clone(), proto.clone()].concat(),
                Ok(h(8080, Protocol::Opaque, None)),
            ),
            (
                "unknown field skipped",
                [field(9, b"future"), port.clone(), proto.clone()].concat(),
                Ok(h(8080, Protocol::Opaque, None)),
            ),
            ("no port", proto.clone(), Err(HeaderError::NoPort)),
            ("no protocol", port.clone(), Err(HeaderError::NoProtocol)),
            (
                "port zero",
                [field(1, &[0, 0]), proto.clone()].concat(),
                Err(HeaderError::BadField { field: 1 }),
            ),
            (
                "port of 3 bytes",
                [field(1, &[0, 0, 1]), proto.clone()].concat(),
                Err(HeaderError::BadField { field: 1 }),
            ),
            (
                "unknown protocol",
                [port.clone(), field(2, &[7])].concat(),
                Err(HeaderError::BadField { field: 2 }),
            ),
            (
                "bad utf-8 authority",
                [port.clone(), proto.clone(), field(3, &[0xff])].concat(),
                Err(HeaderError::BadField { field: 3 }),
            ),
            (
                "field longer than body",
                vec![1, 0, 9, 1],
                Err(HeaderError::Truncated),
            ),
            (
                "dangling type byte",
                [port.clone(), proto.clone(), vec![1]].concat(),
                Err(HeaderError::Truncated),
            ),
        ];
        for (name, body, want) in cases {
            assert_eq!(Header::decode_body(&body), want, "{name}");
        }
    }

    #[tokio::test]
    async fn read_refusals() {
        let mut bad_magic: &[u8] = b"GET / HTTP/1.1\r\n";
        assert_eq!(
            Header::read(&mut bad_magic).await,
            Err(HeaderError::BadMagic)
        );
        let mut too_long: Vec<u8> = MAGIC.to_vec();
        too_long.extend_from_slice(&(MAX_LEN as u16 + 1).to_be_bytes());
        assert_eq!(
            Header::read(&mut &too_long[..]).await,
            Err(HeaderError::TooLong(MAX_LEN + 1))
        );
        let mut short: &[u8] = &MAGIC[..3];
        assert_eq!(Header::read(&mut short).await, Err(HeaderError::Truncated));
    }
}
