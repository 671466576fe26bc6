//! A TLS connection that tells tonic who the verified peer is.

use musubi_identity::SpiffeId;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

/// The peer's verified SPIFFE ID and address, available to handlers as a request extension.
#[derive(Clone, Debug)]
pub struct PeerId {
    pub id: Option<SpiffeId>,
    pub addr: Option<std::net::SocketAddr>,
}

pub struct MeshConn(pub TlsStream<TcpStream>);

impl Connected for MeshConn {
    type ConnectInfo = PeerId;
    fn connect_info(&self) -> PeerId {
        let (tcp, tls) = self.0.get_ref();
        PeerId {
            id: musubi_identity::tls::peer_identity(tls.peer_certificates()),
            addr: tcp.peer_addr().ok(),
        }
    }
}

impl AsyncRead for MeshConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}
