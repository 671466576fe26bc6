//! Protocol detection on the first bytes of a connection: HTTP/2 preface, an HTTP/1 request
//! line, something an HTTP server might still parse as a request, or anything else (opaque).
//! Server-speaks-first protocols send nothing, so the caller decides what a timeout means;
//! ports known to be opaque skip detection entirely.
//!
//! [`Detected::HttpLike`] is what makes the server side safe: bytes that start like an HTTP
//! request (a method token and a space, possibly after empty lines) but are not a clean
//! HTTP/1.1 request line — a bare LF, an unknown version, a line longer than we look at — may
//! still be parsed as a request by a lenient application server. The inbound proxy therefore
//! serves them as HTTP itself (where a forged `musubi-client-id` is removed) instead of passing
//! them through; the outbound side treats them as opaque, as before.

use crate::transport::{FirstBytes, read_first};
use bytes::BytesMut;
use std::time::Duration;
use tokio::io::AsyncRead;
use tokio::time::Instant;

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How much of a request line is looked at; a longer line is [`Detected::HttpLike`].
pub const MAX_PEEK: usize = 8 * 1024;
/// Longest method token considered (the longest registered method has 17 letters).
const MAX_METHOD: usize = 24;

/// Ports whose protocols make the server speak first, or are otherwise not worth detecting.
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[
    25, 587, 3306, 4444, 4567, 4568, 5432, 6379, 9300, 11211, 27017,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http2,
    Http1,
    /// Starts like an HTTP/1 request but is not a clean request line.
    HttpLike,
    Opaque,
}

impl Detected {
    pub fn as_str(self) -> &'static str {
        match self {
            Detected::Http2 => "http2",
            Detected::Http1 => "http1",
            Detected::HttpLike => "http_like",
            Detected::Opaque => "opaque",
        }
    }

    /// What the outbound side makes of it: only a clean request is handled as HTTP there.
    pub fn outbound(self) -> Detected {
        match self {
            Detected::HttpLike => Detected::Opaque,
            d => d,
        }
    }
}

/// A decision, or the need for more bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Known(Detected),
    NeedMore,
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Decides from the bytes seen so far. Only the first [`MAX_PEEK`] bytes are looked at, and a
/// decision never changes when more bytes arrive.
pub fn classify(buf: &[u8]) -> Verdict {
    let buf = &buf[..buf.len().min(MAX_PEEK)];
    let full = buf.len() == MAX_PEEK;
    let need_more = if full {
        Verdict::Known(Detected::HttpLike)
    } else {
        Verdict::NeedMore
    };
    if buf.is_empty() {
        return Verdict::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Verdict::Known(Detected::Http2)
        } else {
            Verdict::NeedMore
        };
    }
    // Servers may skip empty lines before a request line (RFC 9112, 2.2).
    let skipped = buf
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    let rest = &buf[skipped..];
    if rest.is_empty() {
        return need_more;
    }
    let method = rest.iter().take_while(|b| is_token_byte(**b)).count();
    if method == rest.len() {
        return if method <= MAX_METHOD {
            need_more
        } else {
            Verdict::Known(Detected::Opaque)
        };
    }
    if method == 0 || method > MAX_METHOD || rest[method] != b' ' {
        return Verdict::Known(Detected::Opaque);
    }
    // METHOD SP request-target SP HTTP/1.x CRLF
    let Some(lf) = rest.iter().position(|b| *b == b'\n') else {
        return need_more;
    };
    let (line, bare_lf) = match rest[..lf].strip_suffix(b"\r") {
        Some(line) => (line, false),
        None => (&rest[..lf], true),
    };
    let mut parts = line.split(|b| *b == b' ');
    let clean = matches!((parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(_), Some(t), Some(v), None)
            if !t.is_empty() && (v == b"HTTP/1.1" || v == b"HTTP/1.0"));
    Verdict::Known(if clean && !bare_lf && skipped == 0 {
        Detected::Http1
    } else {
        Detected::HttpLike
    })
}

/// How detection on a stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Known(Detected),
    /// Nothing decided within the timeout; `any` says whether some bytes came.
    Timeout {
        any: bool,
    },
    /// The peer closed before anything was decided.
    Eof,
}

/// Reads `io` into `buf` until [`classify`] decides or `deadline` passes. The bytes read stay
/// in `buf`, to be replayed with [`crate::transport::Prefixed`]. Returns how long it took.
pub async fn detect<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    deadline: Instant,
) -> std::io::Result<(Outcome, Duration)> {
    let start = Instant::now();
    let decide = |b: &[u8]| match classify(b) {
        Verdict::Known(d) => Some(d),
        Verdict::NeedMore => None,
    };
    let outcome = match read_first(io, buf, MAX_PEEK, deadline, decide).await? {
        FirstBytes::Decided(d) => Outcome::Known(d),
        FirstBytes::Full => Outcome::Known(Detected::HttpLike),
        FirstBytes::Timeout => Outcome::Timeout {
            any: !buf.is_empty(),
        },
        FirstBytes::Eof => Outcome::Eof,
    };
    Ok((outcome, start.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Detected::*;

    #[test]
    fn classify_table() {
        let long_line = [b"GET /".as_slice(), &[b'a'; MAX_PEEK]].concat();
        let cases: &[(&[u8], Verdict)] = &[
            (H2_PREFACE, Verdict::Known(Http2)),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00",
                Verdict::Known(Http2),
            ),
            (b"PRI * HTTP/2", Verdict::NeedMore),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Verdict::Known(Http1)),
            (
                b"POST /api/v1/items?x=1 HTTP/1.0\r\n",
                Verdict::Known(Http1),
            ),
            (b"CONNECT api.shop:443 HTTP/1.1\r\n", Verdict::Known(Http1)),
            (b"GET /long/path/still/com", Verdict::NeedMore),
            (b"GE", Verdict::NeedMore),
            (b"", Verdict::NeedMore),
            (b"\r\n", Verdict::NeedMore),
            // Not a clean request line, but an HTTP server may still take it for one.
            (b"GET / HTTP/2.0\r\n", Verdict::Known(HttpLike)),
            (b"GET /\r\n", Verdict::Known(HttpLike)),
            (b"GET / HTTP/1.1\nHost", Verdict::Known(HttpLike)),
            (b"\r\nGET / HTTP/1.1\r\n", Verdict::Known(HttpLike)),
            (b"GET  / HTTP/1.1\r\n", Verdict::Known(HttpLike)),
            (&long_line, Verdict::Known(HttpLike)),
            (b"SET key value\r\n", Verdict::Known(HttpLike)),
            // Not HTTP.
            (b"\x16\x03\x01\x02\x00\x01", Verdict::Known(Opaque)), // TLS ClientHello
            (b"*2\r\n$3\r\nGET\r\n", Verdict::Known(Opaque)),      // Redis
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Verdict::Known(Opaque)), // Postgres SSLRequest
            (b"SSH-2.0-OpenSSH_9.0\r\n", Verdict::Known(Opaque)),
            (b"PING\r\n", Verdict::Known(Opaque)),
            (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", Verdict::Known(Opaque)),
            (b" GET / HTTP/1.1\r\n", Verdict::Known(Opaque)),
        ];
        for (input, want) in cases {
            assert_eq!(
                classify(input),
                *want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn a_decision_never_changes_as_bytes_arrive() {
        let inputs: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"\r\n\r\nGET / HTTP/1.1\n",
            H2_PREFACE,
            b"SSH-2.0-OpenSSH_9.0\r\n",
            b"\x16\x03\x01\x02\x00\x01",
        ];
        for input in inputs {
            let mut first = None;
            for end in 0..=input.len() {
                if let Verdict::Known(d) = classify(&input[..end]) {
                    assert_eq!(*first.get_or_insert(d), d, "{input:?} at {end}");
                }
            }
        }
    }

    #[test]
    fn outbound_keeps_only_clean_requests() {
        assert_eq!(HttpLike.outbound(), Opaque);
        assert_eq!(Http1.outbound(), Http1);
        assert_eq!(Http2.outbound(), Http2);
    }

    #[tokio::test]
    async fn detects_on_a_stream_and_keeps_the_bytes() {
        use tokio::io::AsyncWriteExt;
        let (mut c, mut s) = tokio::io::duplex(1024);
        c.write_all(b"GET / HT").await.unwrap();
        let writer = tokio::spawn(async move {
            c.write_all(b"TP/1.1\r\n\r\n").await.unwrap();
            c
        });
        let mut buf = BytesMut::new();
        let soon = || Instant::now() + Duration::from_secs(5);
        let (d, _) = detect(&mut s, &mut buf, soon()).await.unwrap();
        assert_eq!(d, Outcome::Known(Http1));
        let _c = writer.await.unwrap();
        assert!(buf.starts_with(b"GET / HTTP/1.1\r\n"), "{buf:?}");
    }

    #[tokio::test]
    async fn silence_is_a_timeout_and_says_whether_bytes_came() {
        use tokio::io::AsyncWriteExt;
        let (_c, mut s) = tokio::io::duplex(1024);
        let mut buf = BytesMut::new();
        let (d, took) = detect(&mut s, &mut buf, Instant::now() + Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(d, Outcome::Timeout { any: false });
        assert!(took >= Duration::from_millis(50));
        let (mut c, mut s) = tokio::io::duplex(1024);
        c.write_all(b"GE").await.unwrap();
        let (d, _) = detect(&mut s, &mut buf, Instant::now() + Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(d, Outcome::Timeout { any: true });
        drop(c);
        let mut buf = BytesMut::new();
        let (d, _) = detect(&mut s, &mut buf, Instant::now() + Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(d, Outcome::Eof);
    }
}
