//! Pinned connections: every accepted connection is served, from its first frame to its
//! close, by one of several single-threaded runtimes (the one with the fewest open
//! connections), so while every thread is busy a call never crosses threads between its
//! bytes arriving and its answer leaving.
//!
//! With one multi-threaded runtime for every connection (`server.pin_connections = false`)
//! tokio moves a connection's tasks between its workers: a stream task woken by the
//! connection task lands on whichever worker is free, an idle worker is woken (a futex and,
//! across cores, an inter-processor interrupt) to steal it, and the request's bytes and the
//! engine's scratch move between the cores' caches. On a 2-core machine shared with the
//! load generator those hand-offs cost more server CPU per 1000-candidate Rank call than
//! the HTTP/2 framing does (see BENCHMARKS.md, "pin"). A pinned connection's calls run
//! where its bytes were read, except that while a sibling thread is idle, Rank rankings
//! are queued and the idle thread takes some ([`super::handoff`]), so a client with fewer
//! busy connections than threads, or one that shares a core with a thread, does not leave a
//! core idle.
//!
//! The listener is read on the main runtime, which hands each accepted socket to a thread;
//! each thread runs tonic's server over the sockets it is given, with the same shutdown
//! signal, so a graceful shutdown stops accepting at once and drains every thread's calls
//! (a connection on which no request has begun ends at once: [`super::connection`]).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::transport::Server;

use super::connection::{Connection, OpenCount};
use super::handoff::{self, Siblings};
use super::raised;

/// A socket handed to a connection thread, counted as open on that thread until dropped.
struct Handed {
    stream: std::net::TcpStream,
    open: OpenCount,
}

/// One connection thread as the acceptor sees it.
struct Lane {
    sockets: mpsc::UnboundedSender<Handed>,
    open: Arc<AtomicUsize>,
}

/// Starts `threads` connection threads serving `service` and the acceptor of `listener`;
/// the returned future ends when every thread's server has ended (after `stop` is raised
/// and their calls have drained) and fails if one failed. `rankings_shared` counts the
/// rankings one thread runs for another ([`super::handoff`]).
pub fn serve<S>(
    listener: TcpListener,
    threads: usize,
    vectored: bool,
    service: S,
    stop: &watch::Receiver<bool>,
    rankings_shared: Counter,
) -> anyhow::Result<impl Future<Output = anyhow::Result<()>>>
where
    S: Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let threads = threads.max(1);
    let mut lanes = Vec::with_capacity(threads);
    let mut finished = Vec::with_capacity(threads);
    // The runtimes first: each thread's park hooks and hand-offs need every sibling.
    let parked = Arc::new(OnceLock::<Arc<Siblings>>::new());
    let runtimes = (0..threads)
        .map(|index| {
            handoff::connection_runtime(&parked, index)
                .context("cannot start a connection thread's runtime")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let siblings = Siblings::new(
        runtimes.iter().map(|runtime| runtime.handle().clone()),
        rankings_shared,
    );
    let _ = parked.set(Arc::clone(&siblings));
    for (index, runtime) in runtimes.into_iter().enumerate() {
        let (sockets, handed) = mpsc::unbounded_channel::<Handed>();
        let (done, finish) = oneshot::channel();
        let service = service.clone();
        let stop = stop.clone();
        let siblings = Arc::clone(&siblings);
        std::thread::Builder::new()
            .name(format!("fairrank-conn-{index}"))
            .spawn(move || {
                handoff::enter(Arc::clone(&siblings), index);
                let served = runtime.block_on(async move {
                    // Registered with this thread's reactor: the socket's readiness wakes
                    // this thread and no other.
                    let connection_stop = stop.clone();
                    let incoming =
                        UnboundedReceiverStream::new(handed).map(move |handed: Handed| {
                            TcpStream::from_std(handed.stream).map(|stream| {
                                Connection::counted(stream, vectored, &connection_stop, handed.open)
                            })
                        });
                    Server::builder()
                        .serve_with_incoming_shutdown(service, incoming, raised(stop))
                        .await
                });
                // Its runtime will not run again: the threads still draining must not queue
                // rankings for it (they would take them back themselves, later).
                siblings.retired(index);
                // Nobody may wait any more (the shutdown grace elapsed first).
                let _ = done.send(served);
            })
            .context("cannot start a connection thread")?;
        lanes.push(Lane {
            sockets,
            open: Arc::new(AtomicUsize::new(0)),
        });
        finished.push(finish);
    }
    tokio::spawn(accept(listener, lanes, stop.clone()));
    Ok(async move {
        for (index, finish) in finished.into_iter().enumerate() {
            match finish.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    return Err(error).context(format!("connection thread {index} failed"));
                }
                Err(_) => anyhow::bail!("connection thread {index} stopped unexpectedly"),
            }
        }
        Ok(())
    })
}

/// Accepts connections until `stop` is raised, handing each to the lane with the fewest
/// open connections; then drops the listener (new connections are refused at once) and
/// the lanes' senders (each thread's server sees its incoming sockets end).
async fn accept(listener: TcpListener, lanes: Vec<Lane>, stop: watch::Receiver<bool>) {
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            () = raised(stop.clone()) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                if let Err(error) = hand_over(stream, &lanes, next) {
                    tracing::warn!(%error, "dropped an accepted connection");
                }
                next = (next + 1) % lanes.len();
            }
            // The peer gave up between SYN and accept: nothing to wait for.
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) => {}
            // Out of file descriptors or memory: back off instead of spinning on accept.
            Err(error) => {
                tracing::warn!(%error, "accepting a connection failed; retrying in 50 ms");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Gives `stream` to the lane with the fewest open connections (ties go to the first lane
/// from `start` on, so equal lanes take turns).
fn hand_over(stream: TcpStream, lanes: &[Lane], start: usize) -> anyhow::Result<()> {
    stream.set_nodelay(true).context("cannot set TCP_NODELAY")?;
    // Deregistered from this runtime's reactor; the thread registers it with its own.
    let stream = stream.into_std().context("cannot detach the socket")?;
    let lane = least_loaded(lanes, start);
    let open = OpenCount::new(Arc::clone(&lane.open));
    lane.sockets
        .send(Handed { stream, open })
        .map_err(|_| anyhow::anyhow!("its connection thread has stopped"))
}

/// The lane with the fewest open connections, the first such from `start` on.
fn least_loaded(lanes: &[Lane], start: usize) -> &Lane {
    (0..lanes.len())
        .map(|offset| &lanes[(start + offset) % lanes.len()])
        .min_by_key(|lane| lane.open.load(Ordering::Relaxed))
        .expect("at least one lane")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(open: &[usize]) -> (Vec<Lane>, Vec<mpsc::UnboundedReceiver<Handed>>) {
        open.iter()
            .map(|&count| {
                let (sockets, receiver) = mpsc::unbounded_channel();
                let lane = Lane {
                    sockets,
                    open: Arc::new(AtomicUsize::new(count)),
                };
                (lane, receiver)
            })
            .unzip()
    }

    fn open_counts(lanes: &[Lane]) -> Vec<usize> {
        lanes
            .iter()
            .map(|lane| lane.open.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn the_least_loaded_lane_wins_and_ties_take_turns() {
        let (lanes, _receivers) = lanes(&[2, 1, 1, 3]);
        let pick = |start| {
            let chosen = least_loaded(&lanes, start);
            lanes
                .iter()
                .position(|lane| std::ptr::eq(lane, chosen))
                .unwrap()
        };
        assert_eq!(pick(0), 1);
        assert_eq!(pick(1), 1);
        assert_eq!(pick(2), 2);
        assert_eq!(pick(3), 1);
    }

    #[tokio::test]
    async fn handed_connections_are_counted_open_until_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (lanes, mut receivers) = lanes(&[0, 0]);
        let mut clients = Vec::new();
        for turn in 0..4 {
            clients.push(TcpStream::connect(address).await.unwrap());
            let (stream, _) = listener.accept().await.unwrap();
            hand_over(stream, &lanes, turn % 2).unwrap();
        }
        // Two each, alternating.
        assert_eq!(open_counts(&lanes), [2, 2]);
        let first = receivers[0].recv().await.unwrap();
        let second = receivers[1].recv().await.unwrap();
        assert!(first.stream.peer_addr().is_ok());
        drop(first);
        assert_eq!(open_counts(&lanes), [1, 2]);
        // The next connection goes to the emptier lane even when the turn is the other's.
        clients.push(TcpStream::connect(address).await.unwrap());
        let (stream, _) = listener.accept().await.unwrap();
        hand_over(stream, &lanes, 1).unwrap();
        assert_eq!(open_counts(&lanes), [2, 2]);
        drop(second);
        assert_eq!(open_counts(&lanes), [2, 1]);
        // A lane whose thread is gone: the sockets it had queued are closed and uncounted,
        // and it refuses new ones without counting them.
        drop(receivers.remove(1));
        assert_eq!(open_counts(&lanes), [2, 0]);
        clients.push(TcpStream::connect(address).await.unwrap());
        let (stream, _) = listener.accept().await.unwrap();
        let refused = hand_over(stream, &lanes, 1);
        assert!(refused.is_err());
        assert_eq!(open_counts(&lanes), [2, 0]);
    }
}
