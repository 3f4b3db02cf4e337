//! Accepted TCP connections as the HTTP/2 layer reads and writes them: reads go through a
//! buffer larger than h2's, and writes are optionally not vectored, so that a small answer
//! leaves in one `writev`/`write` instead of two.
//!
//! h2 reads at most what is free in its 8 KiB read buffer, so a 13 KB request took two
//! `recvfrom` calls or more; reading through a [`READ_BUFFER_BYTES`] buffer takes a whole
//! request, or several, per call, and hands them to h2 from memory.
//!
//! h2 copies a DATA frame into its write buffer only when its payload is small: under 256
//! bytes on a socket that takes vectored writes, under 1024 bytes otherwise. A larger
//! payload is queued by reference and written with the buffered frames before it, which
//! flushes the buffer; the frames after it (a gRPC answer's trailers) go out in a second
//! system call. A `Rank` answer of a few hundred bytes took two writes on a vectored
//! socket: its headers and message, then its trailers (`strace`, see BENCHMARKS.md).
//! Reporting the socket as not vectored makes h2 copy payloads under 1 KiB, so headers,
//! message and trailers, and those of every other answer ready at the time, share one
//! write. A payload of 1 KiB or more then takes one more write (h2 writes its frame head
//! and the payload separately), which is why [`crate::config`] lets vectored writes be
//! turned back on (`server.vectored_writes`).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Size of a connection's read buffer: two 1000-candidate Rank requests and more.
pub const READ_BUFFER_BYTES: usize = 32 * 1024;

/// An accepted connection; `vectored` says whether it reports vectored writes.
#[derive(Debug)]
pub struct Connection {
    stream: BufReader<TcpStream>,
    vectored: bool,
    /// Counts the connection among its thread's open ones (pinned connections only).
    _open: Option<OpenCount>,
}

impl Connection {
    /// Wraps an accepted `stream`.
    pub fn new(stream: TcpStream, vectored: bool) -> Connection {
        Connection {
            stream: BufReader::with_capacity(READ_BUFFER_BYTES, stream),
            vectored,
            _open: None,
        }
    }

    /// Wraps an accepted `stream` that `open` counts until the connection is dropped.
    pub fn counted(stream: TcpStream, vectored: bool, open: OpenCount) -> Connection {
        Connection {
            _open: Some(open),
            ..Connection::new(stream, vectored)
        }
    }
}

/// One open connection in a shared count: adds one when made, takes it back when dropped.
#[derive(Debug)]
pub struct OpenCount(Arc<AtomicUsize>);

impl OpenCount {
    /// Counts one more connection in `count`.
    pub fn new(count: Arc<AtomicUsize>) -> OpenCount {
        count.fetch_add(1, Ordering::Relaxed);
        OpenCount(count)
    }
}

impl Drop for OpenCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connected for Connection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.get_ref().connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.vectored && self.stream.get_ref().is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Both ends of a loopback connection, the accepted end wrapped.
    async fn pair(vectored: bool) -> (Connection, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (Connection::new(accepted, vectored), client)
    }

    #[tokio::test]
    async fn writes_are_vectored_only_when_asked_and_bytes_pass_unchanged() {
        for vectored in [false, true] {
            let (mut server, mut client) = pair(vectored).await;
            assert_eq!(server.is_write_vectored(), vectored);
            assert_eq!(
                server.connect_info().remote_addr(),
                client.local_addr().ok()
            );
            let parts = [IoSlice::new(b"head"), IoSlice::new(b"-payload")];
            // A vectored write may be short: the rest goes as a plain write.
            let written = server.write_vectored(&parts).await.unwrap();
            server.write_all(&b"head-payload"[written..]).await.unwrap();
            server.flush().await.unwrap();
            let mut received = [0_u8; 12];
            client.read_exact(&mut received).await.unwrap();
            assert_eq!(&received, b"head-payload");
            client.write_all(b"back").await.unwrap();
            let mut back = [0_u8; 4];
            server.read_exact(&mut back).await.unwrap();
            assert_eq!(&back, b"back");
            // More than the read buffer, read in pieces smaller than it: every byte arrives
            // once and in order.
            let sent: Vec<u8> = (0..3 * READ_BUFFER_BYTES + 17)
                .map(|index| (index % 251) as u8)
                .collect();
            let writer = {
                let sent = sent.clone();
                tokio::spawn(async move {
                    client.write_all(&sent).await.unwrap();
                    client
                })
            };
            let mut received = vec![0_u8; sent.len()];
            for piece in received.chunks_mut(5000) {
                server.read_exact(piece).await.unwrap();
            }
            assert_eq!(received, sent);
            let mut client = writer.await.unwrap();
            server.shutdown().await.unwrap();
            assert_eq!(client.read(&mut back).await.unwrap(), 0);
        }
    }
}
