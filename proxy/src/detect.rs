//! Protocol detection on the first bytes of a plaintext connection: HTTP/2 preface, an HTTP/1
//! request line, or anything else (opaque). Server-speaks-first protocols send nothing, so a
//! timeout means opaque; ports known to be opaque skip detection entirely.

use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How much of a request line is needed to decide (a long URI only delays the decision).
const MAX_PEEK: usize = 8 * 1024;

/// Ports whose protocols make the server speak first, or are otherwise not worth detecting.
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[
    25, 587, 3306, 4444, 4567, 4568, 5432, 6379, 9300, 11211, 27017,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http2,
    Http1,
    Opaque,
}

impl Detected {
    pub fn as_str(self) -> &'static str {
        match self {
            Detected::Http2 => "http2",
            Detected::Http1 => "http1",
            Detected::Opaque => "opaque",
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

/// Decides from the bytes seen so far.
pub fn classify(buf: &[u8]) -> Verdict {
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
    // HTTP/1: METHOD SP request-target SP HTTP/1.x CRLF
    let Some(line_end) = buf.windows(2).position(|w| w == b"\r\n") else {
        // Still a plausible request line? Keep reading; otherwise it is not HTTP.
        let plausible = buf.iter().take_while(|b| is_token_byte(**b)).count();
        let method_done = buf.get(plausible) == Some(&b' ');
        let ok = if method_done {
            plausible > 0 && !buf.contains(&b'\n') && buf.len() < MAX_PEEK
        } else {
            plausible == buf.len() && plausible <= 16
        };
        return if ok {
            Verdict::NeedMore
        } else {
            Verdict::Known(Detected::Opaque)
        };
    };
    let line = &buf[..line_end];
    let mut parts = line.split(|b| *b == b' ');
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let http1 = matches!((method, target, version, parts.next()),
        (Some(m), Some(t), Some(v), None)
            if !m.is_empty() && m.iter().all(|b| is_token_byte(*b))
            && !t.is_empty()
            && (v == b"HTTP/1.1" || v == b"HTTP/1.0"));
    Verdict::Known(if http1 {
        Detected::Http1
    } else {
        Detected::Opaque
    })
}

/// Peeks at `stream` (without consuming) until [`classify`] decides or `timeout` passes.
/// Returns the verdict and how long it took.
pub async fn detect(
    stream: &TcpStream,
    timeout: Duration,
) -> std::io::Result<(Detected, Duration)> {
    let start = Instant::now();
    let mut buf = vec![0u8; MAX_PEEK];
    let mut seen = 0;
    loop {
        let remaining = timeout.saturating_sub(start.elapsed());
        let n = match tokio::time::timeout(remaining, stream.peek(&mut buf)).await {
            Err(_) => return Ok((Detected::Opaque, start.elapsed())),
            Ok(r) => r?,
        };
        if n == 0 {
            return Ok((Detected::Opaque, start.elapsed()));
        }
        if let Verdict::Known(d) = classify(&buf[..n]) {
            return Ok((d, start.elapsed()));
        }
        if n == seen {
            // Nothing new since the last peek: wait for more data to arrive.
            if tokio::time::timeout(remaining, stream.readable())
                .await
                .is_err()
            {
                return Ok((Detected::Opaque, start.elapsed()));
            }
            // `readable` fires for data we have already peeked; yield briefly to avoid spinning.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Detected::*;

    #[test]
    fn classify_table() {
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
            (b"GET / HTTP/2.0\r\n", Verdict::Known(Opaque)),
            (b"GET /\r\n", Verdict::Known(Opaque)),
            (b"\x16\x03\x01\x02\x00\x01", Verdict::Known(Opaque)), // TLS ClientHello
            (b"*2\r\n$3\r\nGET\r\n", Verdict::Known(Opaque)),      // Redis
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Verdict::Known(Opaque)), // Postgres SSLRequest
            (b"SSH-2.0-OpenSSH_9.0\r\n", Verdict::Known(Opaque)),
            (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", Verdict::Known(Opaque)),
            (b"GET / HTTP/1.1\nHost", Verdict::Known(Opaque)),
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

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn detects_on_a_real_socket_without_consuming() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut c, mut s) = pair().await;
        c.write_all(b"GET / HT").await.unwrap();
        let writer = tokio::spawn(async move {
            c.write_all(b"TP/1.1\r\n\r\n").await.unwrap();
            c
        });
        let (d, _) = detect(&s, Duration::from_secs(5)).await.unwrap();
        assert_eq!(d, Http1);
        let _c = writer.await.unwrap();
        let mut buf = [0u8; 8];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"GET / HT", "detection must not consume bytes");
    }

    #[tokio::test]
    async fn silence_is_opaque_after_the_timeout() {
        let (_c, s) = pair().await;
        let (d, took) = detect(&s, Duration::from_millis(50)).await.unwrap();
        assert_eq!(d, Opaque);
        assert!(took >= Duration::from_millis(50));
    }
}
