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
//!
//! A connection on which the client has begun no request ends when the graceful shutdown
//! starts. hyper's graceful shutdown waits for the HTTP/2 handshake to finish (for the
//! client's preface) and then for the answer to a PING it sends with its GOAWAY before it
//! closes a connection, so a client that opened a connection and sent nothing, only the
//! preface, or the preface and its SETTINGS, held the drain up for the whole
//! `server.shutdown_grace_ms`. Until the client's first HEADERS frame (its first request)
//! the connection follows the client's bytes frame header by frame header
//! ([`FirstRequest`]); once the shutdown has started, a read that finds nothing to read
//! there is the end of the stream, which ends the HTTP/2 connection at once, and its close
//! does not linger (nothing was asked, so no answer can be lost). A connection that has
//! carried a request is left to HTTP/2's graceful shutdown, which lets its calls finish
//! and closes it once its client answers the PING.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
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

/// Length of the HTTP/2 connection preface, the client's first bytes (RFC 9113, 3.4).
const PREFACE_BYTES: usize = 24;

/// Length of an HTTP/2 frame header: payload length (3 bytes), type, flags, stream id.
const FRAME_HEADER_BYTES: usize = 9;

/// The type of a HEADERS frame, which opens a stream: a request (RFC 9113, 6.2).
const HEADERS_FRAME: u8 = 0x1;

/// Follows the bytes a client sends, from the connection preface on, frame header by
/// frame header (payloads are passed over), until the header of its first HEADERS frame:
/// the start of its first request.
#[derive(Debug, Clone)]
struct FirstRequest {
    /// Bytes to pass over before the next frame header: the rest of the preface or of a
    /// frame's payload.
    skip: usize,
    /// The frame header being read.
    header: [u8; FRAME_HEADER_BYTES],
    /// How many of its bytes have come.
    filled: usize,
}

impl FirstRequest {
    fn new() -> FirstRequest {
        FirstRequest {
            skip: PREFACE_BYTES,
            header: [0; FRAME_HEADER_BYTES],
            filled: 0,
        }
    }

    /// Follows `bytes`, the next ones the client sent: whether a request has begun by
    /// their end (after a `true`, the rest of `bytes` is not followed).
    fn begun_in(&mut self, mut bytes: &[u8]) -> bool {
        loop {
            let passed = self.skip.min(bytes.len());
            self.skip -= passed;
            bytes = &bytes[passed..];
            if bytes.is_empty() {
                return false;
            }
            let taken = (FRAME_HEADER_BYTES - self.filled).min(bytes.len());
            self.header[self.filled..self.filled + taken].copy_from_slice(&bytes[..taken]);
            self.filled += taken;
            bytes = &bytes[taken..];
            if self.filled < FRAME_HEADER_BYTES {
                return false;
            }
            if self.header[3] == HEADERS_FRAME {
                return true;
            }
            self.filled = 0;
            self.skip = (usize::from(self.header[0]) << 16)
                | (usize::from(self.header[1]) << 8)
                | usize::from(self.header[2]);
        }
    }
}

/// Where a connection is in its life, as its reads see it.
enum Phase {
    /// No request has begun: the client's bytes are followed, and the start of the graceful
    /// shutdown ends the connection.
    Unused {
        first_request: FirstRequest,
        /// Resolves when the graceful shutdown starts.
        shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    },
    /// A request has begun: reads pass straight through.
    Used,
    /// Ended at the shutdown before any request: reads find the end of the stream, and the
    /// close does not linger.
    Dismissed,
}

impl std::fmt::Debug for Phase {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Phase::Unused { first_request, .. } => formatter
                .debug_struct("Unused")
                .field("first_request", first_request)
                .finish_non_exhaustive(),
            Phase::Used => formatter.write_str("Used"),
            Phase::Dismissed => formatter.write_str("Dismissed"),
        }
    }
}

/// An accepted connection; `vectored` says whether it reports vectored writes.
#[derive(Debug)]
pub struct Connection {
    stream: BufReader<TcpStream>,
    vectored: bool,
    /// Whether a request has begun, or the connection was dismissed before one.
    phase: Phase,
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
    /// Wraps an accepted `stream`; `stop` is raised when the graceful shutdown starts (and
    /// ends the connection if no request has begun on it by then).
    pub fn new(stream: TcpStream, vectored: bool, stop: &watch::Receiver<bool>) -> Connection {
        Connection {
            stream: BufReader::with_capacity(READ_BUFFER_BYTES, stream),
            vectored,
            phase: Phase::Unused {
                first_request: FirstRequest::new(),
                shutdown: Box::pin(super::raised(stop.clone())),
            },
            linger_limit: LINGER_LIMIT,
            lingering: None,
            lingered_bytes: 0,
            _open: None,
        }
    }

    /// Wraps an accepted `stream` that `open` counts until the connection is dropped.
    pub fn counted(
        stream: TcpStream,
        vectored: bool,
        stop: &watch::Receiver<bool>,
        open: OpenCount,
    ) -> Connection {
        Connection {
            _open: Some(open),
            ..Connection::new(stream, vectored, stop)
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
    /// Reads through the buffer; until the client's first request, follows its bytes, and
    /// once the shutdown has started finds the end of the stream when nothing is left to
    /// read (see the module's documentation).
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let (first_request, shutdown) = match &mut this.phase {
            Phase::Used => return Pin::new(&mut this.stream).poll_read(cx, buf),
            Phase::Unused {
                first_request,
                shutdown,
            } => (first_request, shutdown),
            Phase::Dismissed => return Poll::Ready(Ok(())),
        };
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if first_request.begun_in(&buf.filled()[before..]) {
                    this.phase = Phase::Used;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                if shutdown.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // Nothing to read, no request begun, and the shutdown has started.
                this.phase = Phase::Dismissed;
                Poll::Ready(Ok(()))
            }
            failed => failed,
        }
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
    /// [`LINGER_MAX_BYTES`] were dropped. A connection dismissed at the shutdown before any
    /// request does not linger.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if matches!(this.phase, Phase::Dismissed) {
            return Pin::new(&mut this.stream).poll_shutdown(cx);
        }
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

    /// Both ends of a loopback connection, the accepted end wrapped, and the sender of its
    /// shutdown signal (dropping it counts as raising it).
    async fn pair(vectored: bool) -> (Connection, TcpStream, watch::Sender<bool>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let (stop_sender, stop) = watch::channel(false);
        (
            Connection::new(accepted, vectored, &stop),
            client,
            stop_sender,
        )
    }

    #[tokio::test]
    async fn writes_are_vectored_only_when_asked_and_bytes_pass_unchanged() {
        for vectored in [false, true] {
            let (mut server, mut client, _stop) = pair(vectored).await;
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
        let (mut server, mut client, _stop) = pair(false).await;
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

    /// The HTTP/2 preface, then frames: SETTINGS (INITIAL_WINDOW_SIZE 65536), WINDOW_UPDATE,
    /// PING, then HEADERS; and where the HEADERS frame's header ends. The SETTINGS and PING
    /// payloads read as frame headers would be HEADERS frames (type 1 in their fourth byte).
    fn opening() -> (Vec<u8>, usize) {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend_from_slice(&[0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 0x4, 0, 0x1, 0, 0]);
        bytes.extend_from_slice(&[0, 0, 4, 0x8, 0, 0, 0, 0, 0, 0, 0x0f, 0, 0x01]);
        bytes.extend_from_slice(&[0, 0, 8, 0x6, 0, 0, 0, 0, 0, 0, 0, 1, 0x1, 0x4, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 0, 3, 0x1, 0x4, 0, 0, 0, 1]);
        let headers_end = bytes.len();
        bytes.extend_from_slice(&[0x83, 0x86, 0x84]);
        (bytes, headers_end)
    }

    #[test]
    fn the_first_request_is_found_whatever_the_reads() {
        let (bytes, headers_end) = opening();
        for piece in 1..=bytes.len() {
            let mut first = FirstRequest::new();
            let mut followed = 0;
            let found = bytes.chunks(piece).find_map(|chunk| {
                followed += chunk.len();
                first
                    .begun_in(chunk)
                    .then_some(followed - chunk.len()..followed)
            });
            // Found in the read that brought the header's last byte, not before.
            let read = found.unwrap_or_else(|| panic!("pieces of {piece}: not found"));
            assert!(
                read.contains(&(headers_end - 1)),
                "pieces of {piece}: found in {read:?}"
            );
        }
        let mut first = FirstRequest::new();
        assert!(!first.begun_in(&bytes[..headers_end - 1]));
        assert!(first.begun_in(&bytes[headers_end - 1..]));
    }

    /// Once the shutdown has started, a connection on which no request has begun finds the
    /// end of the stream when nothing is left to read (after what the client had sent) and
    /// closes without lingering; a connection whose client has begun a request reads on.
    #[tokio::test]
    async fn the_shutdown_ends_connections_without_a_request_only() {
        let (bytes, headers_end) = opening();
        let before_headers = &bytes[..headers_end - 9];

        let (mut server, mut client, stop) = pair(false).await;
        server.linger_limit = Duration::from_secs(3600);
        client.write_all(before_headers).await.unwrap();
        let mut received = vec![0_u8; before_headers.len()];
        server.read_exact(&mut received).await.unwrap();
        // Nothing to read, no shutdown: the read waits.
        let mut more = [0_u8; 64];
        let waiting = tokio::time::timeout(Duration::from_millis(50), server.read(&mut more)).await;
        assert!(waiting.is_err(), "{waiting:?}");
        // Bytes sent before the shutdown are still read, then the stream ends.
        client.write_all(b"more").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        stop.send(true).unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), server.read_to_end(&mut rest))
            .await
            .expect("the end of the stream at once")
            .unwrap();
        assert_eq!(rest, b"more");
        assert_eq!(
            server.read(&mut more).await.unwrap(),
            0,
            "and it stays ended"
        );
        // The close does not linger (the client keeps its side open).
        tokio::time::timeout(Duration::from_secs(5), server.shutdown())
            .await
            .expect("no lingering")
            .unwrap();
        assert_eq!(client.read(&mut more).await.unwrap(), 0);

        let (mut server, mut client, stop) = pair(false).await;
        client.write_all(&bytes).await.unwrap();
        let mut received = vec![0_u8; bytes.len()];
        server.read_exact(&mut received).await.unwrap();
        // (The connection no longer watches the signal.)
        stop.send_replace(true);
        let waiting =
            tokio::time::timeout(Duration::from_millis(100), server.read(&mut more)).await;
        assert!(waiting.is_err(), "a used connection reads on: {waiting:?}");
        client.write_all(b"data").await.unwrap();
        server.read_exact(&mut more[..4]).await.unwrap();
        assert_eq!(&more[..4], b"data");
    }

    /// A client that never closes holds a closing connection for the limit at most, and one
    /// that floods it for the byte limit at most.
    #[tokio::test]
    async fn lingering_ends_at_its_limits() {
        let limit = Duration::from_millis(100);
        let (mut server, _client, _stop) = pair(false).await;
        server.linger_limit = limit;
        let started = tokio::time::Instant::now();
        server.shutdown().await.unwrap();
        assert!(started.elapsed() >= limit);

        let (mut server, mut client, _stop) = pair(false).await;
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
