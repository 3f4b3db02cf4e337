//! The in-process `fairrank.bench.v1.Echo` server: the transport-floor baseline the load
//! generator compares Rank against when no `--echo-addr` is given.
//!
//! It runs on its own tokio runtime (its own worker threads, like a separate server
//! process), bound to an ephemeral loopback port, and does no work beyond handing back a
//! slice of the request or of a shared zero buffer (no allocation per call).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use api::fairrank::bench::v1::echo_server::{Echo, EchoServer};
use api::fairrank::bench::v1::{EchoRequest, EchoResponse};
use prost::bytes::Bytes;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::error::LoadgenError;
use crate::loadgen::requests::MAX_ECHO_RESPONSE_BYTES;

/// The Echo service: returns the payload, or `response_bytes` zero bytes.
#[derive(Debug, Clone)]
pub struct EchoService {
    zeros: Bytes,
}

impl EchoService {
    /// A service with its zero buffer of [`MAX_ECHO_RESPONSE_BYTES`] (allocated zeroed, so
    /// only the pages actually sent are ever touched).
    pub fn new() -> Self {
        Self {
            zeros: Bytes::from(vec![0_u8; MAX_ECHO_RESPONSE_BYTES]),
        }
    }
}

impl Default for EchoService {
    fn default() -> Self {
        Self::new()
    }
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let request = request.into_inner();
        let payload = match request.response_bytes {
            None => request.payload,
            Some(bytes) => {
                let bytes = bytes as usize;
                if bytes > MAX_ECHO_RESPONSE_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "response_bytes {bytes} exceeds {MAX_ECHO_RESPONSE_BYTES}"
                    )));
                }
                self.zeros.slice(..bytes)
            }
        };
        Ok(Response::new(EchoResponse { payload }))
    }
}

/// A running in-process Echo server; dropping it stops the server and its threads.
#[derive(Debug)]
pub struct EchoServerHandle {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl EchoServerHandle {
    /// Starts the server on `127.0.0.1:0` on a new runtime of `threads` worker threads.
    /// Safe to call from inside another runtime (it never blocks on one).
    pub fn start(threads: usize) -> Result<Self, LoadgenError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("echo-server")
            .enable_all()
            .build()
            .map_err(LoadgenError::EchoServer)?;
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(LoadgenError::EchoServer)?;
        listener
            .set_nonblocking(true)
            .map_err(LoadgenError::EchoServer)?;
        let addr = listener.local_addr().map_err(LoadgenError::EchoServer)?;
        let (shutdown, shutdown_signal) = oneshot::channel::<()>();
        let _server = runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            // `serve_with_incoming` ignores the builder's TCP settings: set no-delay here,
            // or small answers wait for delayed ACKs (about 40 ms per call).
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tonic::transport::Server::builder()
                .add_service(EchoServer::new(EchoService::new()))
                .serve_with_incoming_shutdown(incoming, async {
                    // A dropped sender also means: stop.
                    let _ = shutdown_signal.await;
                })
                .await
                .map_err(std::io::Error::other)
        });
        Ok(Self {
            addr,
            shutdown: Some(shutdown),
            runtime: Some(runtime),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address as a URI for clients: `http://127.0.0.1:<port>`.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for EchoServerHandle {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(runtime) = self.runtime.take() {
            // Does not block, so the handle may be dropped inside an async context.
            runtime.shutdown_background();
        }
    }
}
