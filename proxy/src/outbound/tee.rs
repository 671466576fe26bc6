//! Bodies the routed path wraps around a request or response: a tee that copies a request
//! body to mirrors without ever holding the primary back, and a deadline that ends a response
//! body when a route's timeout fires.

use crate::http::{Body, BoxError};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use tokio::sync::mpsc;

/// Most body bytes one mirror may have waiting: a mirror slower than this falls behind and is
/// cut (its request ends with an error); the primary never waits for it.
pub const MIRROR_BUFFER_BYTES: usize = 256 * 1024;
/// Most frames waiting per mirror (a bound when frames are tiny).
const MIRROR_BUFFER_FRAMES: usize = 64;

/// What a mirror's body shares with the tee feeding it.
struct Shared {
    queued: AtomicUsize,
    cut: AtomicBool,
}

struct Copy {
    tx: mpsc::Sender<Frame<Bytes>>,
    shared: Arc<Shared>,
}

/// The primary request's body, copying every frame to each mirror that keeps up.
pub struct Tee {
    inner: Body,
    copies: Vec<Copy>,
}

/// The body of one mirrored request: the frames the tee copied, then the end; an error when
/// the mirror fell behind or the primary's body failed, so it is never a truncated request
/// that looks whole.
pub struct MirrorBody {
    rx: mpsc::Receiver<Frame<Bytes>>,
    shared: Arc<Shared>,
}

/// Wraps `body` so each of `n` mirrors receives a copy; returns the wrapped body and the
/// mirrors' bodies.
pub fn tee(body: Body, n: usize) -> (Body, Vec<(Body, Arc<dyn Fn() -> bool + Send + Sync>)>) {
    let mut copies = Vec::with_capacity(n);
    let mut mirrors = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, rx) = mpsc::channel(MIRROR_BUFFER_FRAMES);
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            cut: AtomicBool::new(false),
        });
        let probe = shared.clone();
        let was_cut: Arc<dyn Fn() -> bool + Send + Sync> =
            Arc::new(move || probe.cut.load(Ordering::Relaxed));
        mirrors.push((
            MirrorBody {
                rx,
                shared: shared.clone(),
            }
            .boxed(),
            was_cut,
        ));
        copies.push(Copy { tx, shared });
    }
    (
        Tee {
            inner: body,
            copies,
        }
        .boxed(),
        mirrors,
    )
}

fn frame_len(f: &Frame<Bytes>) -> usize {
    f.data_ref().map(Bytes::len).unwrap_or(0)
}

impl Tee {
    fn copy(&mut self, frame: &Frame<Bytes>) {
        let len = frame_len(frame);
        self.copies.retain(|c| {
            let copy = match frame.data_ref() {
                Some(d) => Frame::data(d.clone()),
                None => match frame.trailers_ref() {
                    Some(t) => Frame::trailers(t.clone()),
                    None => return true,
                },
            };
            let queued = c.shared.queued.fetch_add(len, Ordering::Relaxed) + len;
            if queued > MIRROR_BUFFER_BYTES || c.tx.try_send(copy).is_err() {
                c.shared.cut.store(true, Ordering::Relaxed);
                return false;
            }
            true
        });
    }

    fn fail_all(&mut self) {
        for c in self.copies.drain(..) {
            c.shared.cut.store(true, Ordering::Relaxed);
        }
    }
}

impl hyper::body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => self.copy(frame),
            Poll::Ready(Some(Err(_))) => self.fail_all(),
            // The end: dropping the senders ends each mirror's body cleanly.
            Poll::Ready(None) => self.copies.clear(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // Dropped before its end (the primary gave up): the mirrors' bodies are incomplete.
        if !hyper::body::Body::is_end_stream(&self.inner) {
            self.fail_all();
        }
    }
}

impl hyper::body::Body for MirrorBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(frame)) => {
                self.shared
                    .queued
                    .fetch_sub(frame_len(&frame), Ordering::Relaxed);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) if self.shared.cut.load(Ordering::Relaxed) => Poll::Ready(Some(Err(
                "the mirrored request fell behind its primary and was cut".into(),
            ))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A response body that ends with an error once `deadline` passes (a route's timeout fired
/// while the response was streaming); `fired` hears of it once.
pub struct Deadline {
    inner: Body,
    sleep: Pin<Box<tokio::time::Sleep>>,
    reason: String,
    fired: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl Deadline {
    pub fn wrap(
        inner: Body,
        deadline: tokio::time::Instant,
        reason: String,
        fired: Box<dyn FnOnce() + Send + Sync>,
    ) -> Body {
        Deadline {
            inner,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            reason,
            fired: Some(fired),
        }
        .boxed()
    }
}

impl hyper::body::Body for Deadline {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.sleep.as_mut().poll(cx).is_ready() {
            if let Some(f) = self.fired.take() {
                f();
            }
            return Poll::Ready(Some(Err(self.reason.clone().into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    fn chunks(n: usize, size: usize) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = (0..n)
            .map(|i| Ok(Frame::data(Bytes::from(vec![i as u8; size]))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    #[tokio::test]
    async fn mirrors_get_the_whole_body_when_they_keep_up() {
        let (primary, mut mirrors) = tee(chunks(3, 10), 2);
        // Read the mirrors as the primary goes, as a live mirror would.
        let (m1, cut1) = mirrors.remove(0);
        let (m2, _) = mirrors.remove(0);
        let primary = primary.collect().await.unwrap().to_bytes();
        assert_eq!(primary.len(), 30);
        assert_eq!(m1.collect().await.unwrap().to_bytes(), primary);
        assert_eq!(m2.collect().await.unwrap().to_bytes(), primary);
        assert!(!cut1());
    }

    #[tokio::test]
    async fn a_mirror_that_falls_behind_is_cut_and_the_primary_is_whole() {
        // 40 frames of 16 KiB: 640 KiB, past the mirror's bound, and nobody reads the mirror.
        let (primary, mut mirrors) = tee(chunks(40, 16 * 1024), 1);
        let (mirror, cut) = mirrors.remove(0);
        let primary = primary.collect().await.unwrap().to_bytes();
        assert_eq!(primary.len(), 40 * 16 * 1024, "the primary lost nothing");
        assert!(cut());
        let err = mirror.collect().await.unwrap_err();
        assert!(err.to_string().contains("fell behind"), "{err}");
    }

    #[tokio::test]
    async fn a_primary_that_fails_or_is_dropped_fails_its_mirrors() {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"a"))),
            Err("reset".into()),
        ];
        let (primary, mut mirrors) = tee(
            StreamBody::new(futures_util::stream::iter(frames)).boxed(),
            1,
        );
        assert!(primary.collect().await.is_err());
        assert!(mirrors.remove(0).0.collect().await.is_err());

        let (primary, mut mirrors) = tee(chunks(3, 10), 1);
        drop(primary);
        assert!(
            mirrors.remove(0).0.collect().await.is_err(),
            "never a truncated body that looks whole"
        );
    }

    #[tokio::test]
    async fn a_deadline_ends_a_stalled_body_with_its_reason() {
        let stalled = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, BoxError>,
        >())
        .boxed();
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let body = Deadline::wrap(
            stalled,
            tokio::time::Instant::now() + std::time::Duration::from_millis(20),
            "request timeout fired".into(),
            Box::new(move || f.store(true, Ordering::Relaxed)),
        );
        let err = body.collect().await.unwrap_err();
        assert!(err.to_string().contains("request timeout"), "{err}");
        assert!(fired.load(Ordering::Relaxed));
        // A body that ends in time is untouched.
        let body = Deadline::wrap(
            chunks(2, 3),
            tokio::time::Instant::now() + std::time::Duration::from_secs(60),
            "x".into(),
            Box::new(|| panic!("must not fire")),
        );
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 6);
    }
}
