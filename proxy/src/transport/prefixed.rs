//! Reading a connection's first bytes to decide what it is, then handing the connection on
//! with those bytes still to come.
//!
//! Detection reads (it does not peek): peeking leaves the bytes in the socket, so the socket
//! stays readable and a detector waiting for *more* bytes can only spin. Reading into a buffer
//! that grows only as bytes arrive costs nothing per idle connection and never spins; the
//! bytes read are replayed by [`Prefixed`] to whoever reads the stream next (TLS, hyper, the
//! opaque copy).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// A stream whose first bytes were already read: they come first, then the stream itself.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    io: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: impl Into<Bytes>, io: S) -> Self {
        Prefixed {
            prefix: prefix.into(),
            io,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Bytes read ahead that nobody has consumed yet.
    pub fn pending(&self) -> &[u8] {
        &self.prefix
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// How reading the first bytes ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstBytes<T> {
    /// `decide` answered.
    Decided(T),
    /// The peer closed its side before `decide` answered.
    Eof,
    /// The deadline passed first (possibly with some bytes read).
    Timeout,
    /// `max` bytes were read and `decide` still wanted more.
    Full,
}

/// The first allocation for read-ahead bytes; it grows (doubling) only as bytes arrive.
const FIRST_READ: usize = 512;

/// Reads from `io` into `buf` until `decide(buf)` answers, the peer closes, `deadline` passes
/// or `buf` holds `max` bytes. `buf` may already hold bytes (from an earlier decision).
pub async fn read_first<S, T, F>(
    io: &mut S,
    buf: &mut BytesMut,
    max: usize,
    deadline: Instant,
    mut decide: F,
) -> io::Result<FirstBytes<T>>
where
    S: AsyncRead + Unpin,
    F: FnMut(&[u8]) -> Option<T>,
{
    loop {
        if !buf.is_empty()
            && let Some(answer) = decide(buf)
        {
            return Ok(FirstBytes::Decided(answer));
        }
        if buf.len() >= max {
            return Ok(FirstBytes::Full);
        }
        let want = (max - buf.len()).min(buf.len().max(FIRST_READ));
        buf.reserve(want);
        let mut limited = (&mut *buf).limit(want);
        let read = tokio::time::timeout_at(deadline, io.read_buf(&mut limited)).await;
        match read {
            Err(_) => return Ok(FirstBytes::Timeout),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(0)) => return Ok(FirstBytes::Eof),
            Ok(Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    fn first_line(b: &[u8]) -> Option<usize> {
        b.iter().position(|c| *c == b'\n')
    }

    #[tokio::test]
    async fn reads_until_decided_and_replays_what_it_read() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HT").await.unwrap();
        let writer = tokio::spawn(async move {
            client.write_all(b"TP/1.1\nrest").await.unwrap();
            client
        });
        let mut buf = BytesMut::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = read_first(&mut server, &mut buf, 1024, deadline, first_line)
            .await
            .unwrap();
        assert_eq!(got, FirstBytes::Decided(14));
        let _client = writer.await.unwrap();
        let mut replay = Prefixed::new(buf.freeze(), server);
        let mut out = vec![0u8; 19];
        replay.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"GET / HTTP/1.1\nrest");
    }

    #[tokio::test]
    async fn ends_on_eof_full_and_timeout() {
        let deadline = || Instant::now() + Duration::from_millis(50);
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        let mut buf = BytesMut::new();
        let got = read_first(&mut server, &mut buf, 16, deadline(), first_line).await;
        assert_eq!(got.unwrap(), FirstBytes::Eof);

        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&[b'x'; 40]).await.unwrap();
        let mut buf = BytesMut::new();
        let got = read_first(&mut server, &mut buf, 16, deadline(), first_line).await;
        assert_eq!(got.unwrap(), FirstBytes::Full);
        assert_eq!(buf.len(), 16, "never reads past the limit");

        let (_client, mut server) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let got = read_first(&mut server, &mut buf, 16, deadline(), first_line).await;
        assert_eq!(got.unwrap(), FirstBytes::Timeout);
        assert!(
            buf.capacity() <= FIRST_READ,
            "a silent peer costs one small buffer"
        );
    }
}
