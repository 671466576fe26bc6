//! Listening sockets: dual-stack where the address is the IPv6 wildcard, a cap on the
//! connections each listener holds at once, and an accept loop that backs off when the process
//! runs out of file descriptors instead of spinning on the error.

use crate::metrics::Metrics;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Binds `addr`. The IPv6 wildcard (`[::]`) accepts IPv4 too (dual-stack); on a host without
/// IPv6 it falls back to `0.0.0.0` on the same port.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    match bind_exact(addr) {
        Err(e) if addr.is_ipv6() && addr.ip().is_unspecified() && no_ipv6(&e) => {
            bind_exact(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port()))
        }
        r => r,
    }
}

fn no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_eafnosupport) if libc_eafnosupport == nix::libc::EAFNOSUPPORT
            || libc_eafnosupport == nix::libc::EADDRNOTAVAIL
    )
}

fn bind_exact(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &false)
            .map_err(io::Error::from)?;
    }
    socket.bind(addr)?;
    socket.listen(1024)
}

/// A listener with a cap on open connections.
pub struct Listener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    direction: &'static str,
}

/// Held by a connection (and whatever outlives its first task, such as an upgraded tunnel)
/// for as long as it is open.
pub type Slot = Arc<OwnedSemaphorePermit>;

/// What an accept error means for the loop: how long to pause, and the counter's reason.
pub fn accept_error(e: &io::Error, failures: u32) -> (&'static str, Duration) {
    let exhausted = matches!(
        e.raw_os_error(),
        Some(n) if n == nix::libc::EMFILE || n == nix::libc::ENFILE
            || n == nix::libc::ENOBUFS || n == nix::libc::ENOMEM
    );
    if exhausted {
        // Doubling from 5 ms to 1 s: connections close meanwhile and free descriptors.
        let pause = Duration::from_millis(5).saturating_mul(1 << failures.min(8));
        ("resources_exhausted", pause.min(Duration::from_secs(1)))
    } else {
        // A connection that was reset before we accepted it, and the like.
        ("other", Duration::from_millis(1))
    }
}

impl Listener {
    pub fn new(inner: TcpListener, max_connections: usize, direction: &'static str) -> Self {
        Listener {
            inner,
            slots: Arc::new(Semaphore::new(max_connections)),
            direction,
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// The next connection that fits under the cap. Connections over it are accepted and
    /// closed at once (the client sees the close instead of waiting in the backlog), counted
    /// as `connection_limit`.
    pub async fn accept(&self, metrics: &Metrics) -> (TcpStream, SocketAddr, Slot) {
        let mut failures = 0u32;
        loop {
            match self.inner.accept().await {
                Ok((tcp, peer)) => {
                    failures = 0;
                    match self.slots.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let _ = tcp.set_nodelay(true);
                            return (tcp, peer, Arc::new(permit));
                        }
                        Err(_) => {
                            metrics.refused(self.direction, "connection_limit");
                            tracing::debug!(%peer, direction = self.direction, "connection limit reached; closed");
                        }
                    }
                }
                Err(e) => {
                    let (reason, pause) = accept_error(&e, failures);
                    failures = failures.saturating_add(1);
                    metrics.accept_error(self.direction, reason);
                    tracing::warn!(error = %e, direction = self.direction, ?pause, "accept failed");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_errors_back_off_only_when_resources_run_out() {
        let emfile = io::Error::from_raw_os_error(nix::libc::EMFILE);
        let aborted = io::Error::from_raw_os_error(nix::libc::ECONNABORTED);
        let cases = [
            (&emfile, 0, "resources_exhausted", 5),
            (&emfile, 3, "resources_exhausted", 40),
            (&emfile, 30, "resources_exhausted", 1000),
            (&aborted, 5, "other", 1),
        ];
        for (e, failures, reason, ms) in cases {
            assert_eq!(
                accept_error(e, failures),
                (reason, Duration::from_millis(ms)),
                "{e} after {failures}"
            );
        }
    }

    #[tokio::test]
    async fn the_ipv6_wildcard_accepts_ipv4_too() {
        let l = bind("[::]:0".parse().unwrap()).unwrap();
        let port = l.local_addr().unwrap().port();
        let _c = TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .unwrap();
        let (_s, peer) = l.accept().await.unwrap();
        assert!(
            peer.ip().is_loopback() || peer.to_string().contains("127.0.0.1"),
            "{peer}"
        );
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_and_counted() {
        use tokio::io::AsyncReadExt;
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let l = Listener::new(bind("127.0.0.1:0".parse().unwrap()).unwrap(), 1, "inbound");
        let addr = l.local_addr().unwrap();
        let (tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        let m = metrics.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _, slot) = l.accept(&m).await;
                let _ = tx.send((tcp, slot));
            }
        });
        let _first = TcpStream::connect(addr).await.unwrap();
        let (_held, slot) = accepted.recv().await.unwrap();
        // The only slot is taken: the second connection is accepted and closed at once.
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1];
        assert_eq!(second.read(&mut b).await.unwrap_or(0), 0, "closed");
        let text = musubi_identity::metrics::render(&registry);
        assert!(
            text.contains(
                "musubi_proxy_refused_total{direction=\"inbound\",reason=\"connection_limit\"} 1"
            ),
            "{text}"
        );
        // Once the first connection is done, the next one fits again.
        drop(slot);
        let _third = TcpStream::connect(addr).await.unwrap();
        let (_t, _slot) = accepted.recv().await.unwrap();
    }
}
