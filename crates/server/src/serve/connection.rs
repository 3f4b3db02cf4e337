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
//!
//! Closing is lingering: when h2 shuts the connection down (after a graceful shutdown's
//! last answer, for one), the socket's write side is closed first and what the client
//! still sends (window updates, pings) is read and dropped until the client closes its
//! side or [`LINGER_LIMIT`] passes; only then is the socket closed. Closing a socket
//! whose receive queue holds unread bytes, or receiving bytes after the close, makes the
//! kernel answer with a reset, which throws away the answer bytes not yet delivered: a
//! large answer sent just before a graceful shutdown was lost that way (a 1.5 MB
//! `RankBatch` answer, in 3 of 5 tries).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Size of a connection's read buffer: two 1000-candidate Rank requests and more.
pub const READ_BUFFER_BYTES: usize = 32 * 1024;

/// The longest a closing connection waits for its client to close after its own write
/// side is closed (see the module's documentation). Clients close within a round trip
/// of reading the end of the stream; the limit only bounds one that does not.
pub const LINGER_LIMIT: Duration = Duration::from_secs(2);

/// The most a closing connection reads and drops before it closes all the same.
const LINGER_MAX_BYTES: usize = 1 << 20;

/// An accepted connection; `vectored` says whether it reports vectored writes.
#[derive(Debug)]
pub struct Connection {
    stream: BufReader<TcpStream>,
    vectored: bool,
    /// The longest to linger ([`LINGER_LIMIT`]).
    linger_limit: Duration,
    /// Set once the write side is closed: until when to wait for the client's close.
    lingering: Option<Pin<Box<Sleep>>>,
    /// Bytes read and dropped while lingering.
    lingered_bytes: usize,
    /// Counts the connection among its thread's open ones (pinned connections only).
    _open: Option<OpenCount>,
}

impl Connection {
    /// Wraps an accepted `stream`.
    pub fn new(stream: TcpStream, vectored: bool) -> Connection {
        Connection {
            stream: BufReader::with_capacity(READ_BUFFER_BYTES, stream),
            vectored,
            linger_limit: LINGER_LIMIT,
            lingering: None,
            lingered_bytes: 0,
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

    /// Closes the write side, then lingers (see the module's documentation): ends when the
    /// client has closed its side, the connection failed, [`LINGER_LIMIT`] passed or
    /// [`LINGER_MAX_BYTES`] were dropped.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let limit = match &mut this.lingering {
            Some(limit) => limit,
            None => {
                ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
                this.lingering
                    .insert(Box::pin(tokio::time::sleep(this.linger_limit)))
            }
        };
        let mut discard = [0_u8; 4096];
        loop {
            if limit.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut discard);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                // More from the client: dropped, and read on.
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    this.lingered_bytes += buf.filled().len();
                    if this.lingered_bytes > LINGER_MAX_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                }
                // The client closed its side, or the connection failed: nothing to protect.
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
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
            let closing = tokio::spawn(async move { server.shutdown().await });
            assert_eq!(client.read(&mut back).await.unwrap(), 0);
            drop(client);
            closing.await.unwrap().unwrap();
        }
    }

    /// A large answer written just before the close reaches a slow client whole, though the
    /// client sent more bytes the server never asked for (as h2 clients send window
    /// updates while they read). A close without lingering resets the connection and loses
    /// the answer's tail.
    #[tokio::test]
    async fn closing_lingers_until_the_client_has_read_everything() {
        let (mut server, mut client) = pair(false).await;
        let answer: Vec<u8> = (0..8 << 20).map(|index| (index % 253) as u8).collect();
        let expected = answer.clone();
        let serving = tokio::spawn(async move {
            server.write_all(&answer).await.unwrap();
            let started = tokio::time::Instant::now();
            server.shutdown().await.unwrap();
            drop(server);
            started.elapsed()
        });
        client.write_all(b"window update").await.unwrap();
        let mut received = Vec::with_capacity(expected.len());
        let mut chunk = vec![0_u8; 64 * 1024];
        loop {
            let read = client.read(&mut chunk).await.expect("no reset");
            if read == 0 {
                break;
            }
            received.extend_from_slice(&chunk[..read]);
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        assert_eq!(received.len(), expected.len());
        assert!(received == expected);
        drop(client);
        // The close waited for the client's, not for the limit.
        assert!(serving.await.unwrap() < LINGER_LIMIT);
    }

    /// A client that never closes holds a closing connection for the limit at most, and one
    /// that floods it for the byte limit at most.
    #[tokio::test]
    async fn lingering_ends_at_its_limits() {
        let limit = Duration::from_millis(100);
        let (mut server, _client) = pair(false).await;
        server.linger_limit = limit;
        let started = tokio::time::Instant::now();
        server.shutdown().await.unwrap();
        assert!(started.elapsed() >= limit);

        let (mut server, mut client) = pair(false).await;
        server.linger_limit = Duration::from_secs(3600);
        let flood = tokio::spawn(async move {
            let block = vec![7_u8; 64 * 1024];
            while client.write_all(&block).await.is_ok() {}
        });
        server.shutdown().await.unwrap();
        assert!(server.lingered_bytes > LINGER_MAX_BYTES);
        drop(server);
        flood.await.unwrap();
    }
}
