//! Copying an opaque stream both ways with buffers that are allocated on the first byte and
//! grow only while reads keep filling them: an idle or chatty connection holds a few KiB, a
//! bulk transfer reaches [`MAX_BUF`] (several TLS records per read) after a handful of reads.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// First buffer, allocated when a direction is first polled.
const FIRST_BUF: usize = 4 * 1024;
/// Largest buffer per direction.
pub const MAX_BUF: usize = 64 * 1024;

/// One direction of the copy.
#[derive(Debug, Default)]
struct Pipe {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The last read filled the whole buffer: the next one gets a bigger one.
    grow: bool,
    eof: bool,
    flush: bool,
    done: bool,
    copied: u64,
}

impl Pipe {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            return Poll::Ready(Ok(self.copied));
        }
        loop {
            if self.start == self.end && !self.eof {
                if self.buf.is_empty() {
                    self.buf = vec![0; FIRST_BUF];
                } else if self.grow && self.buf.len() < MAX_BUF {
                    self.buf = vec![0; (self.buf.len() * 2).min(MAX_BUF)];
                }
                self.grow = false;
                let mut rb = ReadBuf::new(&mut self.buf);
                match reader.as_mut().poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        // Nothing more to read now: push out what was written.
                        if self.flush {
                            ready!(writer.as_mut().poll_flush(cx))?;
                            self.flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        self.start = 0;
                        self.end = n;
                        self.eof = n == 0;
                        self.grow = n == self.buf.len();
                    }
                }
            }
            while self.start < self.end {
                let n = match writer
                    .as_mut()
                    .poll_write(cx, &self.buf[self.start..self.end])
                {
                    Poll::Ready(r) => r?,
                    Poll::Pending => {
                        // The writer is full: meanwhile read more into the rest of the
                        // buffer, so both sides keep moving.
                        if !self.eof && self.end < self.buf.len() {
                            let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
                            if let Poll::Ready(r) = reader.as_mut().poll_read(cx, &mut rb) {
                                r?;
                                let n = rb.filled().len();
                                self.eof = n == 0;
                                self.end += n;
                                self.grow = self.end == self.buf.len();
                            }
                        }
                        return Poll::Pending;
                    }
                };
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.copied += n as u64;
                self.flush = true;
            }
            if self.eof {
                ready!(writer.as_mut().poll_flush(cx))?;
                ready!(writer.as_mut().poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(self.copied));
            }
        }
    }
}

/// Copies `a` → `b` and `b` → `a` until both directions reach end of stream, shutting down
/// each writer after its reader ends. Returns the bytes copied from `a` and from `b`.
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Pipe::default();
    let mut b_to_a = Pipe::default();
    poll_fn(|cx| {
        let ab = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let ba = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (ab, ba) {
            (Poll::Ready(x), Poll::Ready(y)) => Poll::Ready(Ok((x, y))),
            _ => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_shuts_down_each_side() {
        let (mut app, mut a) = tokio::io::duplex(1024);
        let (mut b, mut peer) = tokio::io::duplex(1024);
        let copy = tokio::spawn(async move { bidirectional(&mut a, &mut b).await });
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            app.write_all(&sent).await.unwrap();
            app.shutdown().await.unwrap();
            let mut back = Vec::new();
            app.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        let mut chunk = [0u8; 7000];
        while got.len() < big.len() {
            let n = peer.read(&mut chunk).await.unwrap();
            assert!(n > 0, "stream ended early at {}", got.len());
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, big);
        assert_eq!(peer.read(&mut chunk).await.unwrap(), 0, "EOF passed on");
        peer.write_all(b"reply").await.unwrap();
        drop(peer);
        assert_eq!(writer.await.unwrap(), b"reply");
        assert_eq!(copy.await.unwrap().unwrap(), (300_000, 5));
    }

    #[test]
    fn buffers_start_small_and_grow_only_while_reads_fill_them() {
        use std::task::Waker;
        let mut cx = Context::from_waker(Waker::noop());
        let mut bulk = Pipe::default();
        assert!(
            bulk.buf.is_empty(),
            "nothing allocated before the first poll"
        );
        let mut src: &[u8] = &[1u8; 200_000];
        let mut sink: Vec<u8> = Vec::new();
        let done = bulk.poll_copy(&mut cx, Pin::new(&mut src), Pin::new(&mut sink));
        assert!(matches!(done, Poll::Ready(Ok(200_000))));
        assert_eq!(sink.len(), 200_000);
        assert_eq!(
            bulk.buf.len(),
            MAX_BUF,
            "full reads grow the buffer to the cap"
        );
        let mut quiet = Pipe::default();
        let mut small: &[u8] = b"ping";
        let done = quiet.poll_copy(&mut cx, Pin::new(&mut small), Pin::new(&mut Vec::new()));
        assert!(matches!(done, Poll::Ready(Ok(4))));
        assert_eq!(
            quiet.buf.len(),
            FIRST_BUF,
            "a small read does not grow the buffer"
        );
    }
}
