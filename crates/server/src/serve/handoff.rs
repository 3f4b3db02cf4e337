//! Work sharing between the pinned connection threads: while a thread is idle, the
//! rankings another thread has waiting can run on it, so one busy connection does not leave
//! a core idle.
//!
//! A pinned connection's calls all run on its thread ([`super::pinned`]), which is cheapest
//! while every thread has calls to run. When a client has fewer busy connections than the
//! server has threads (one HTTP/2 channel is the common case), or shares the cores and the
//! scheduler leaves one thread's core to the client, one thread has calls waiting while
//! another sleeps. So a Rank call on a connection thread ranks at once only while no
//! sibling thread is idle; otherwise it queues its ranking on its thread and goes to the
//! back of the thread's run queue, letting the thread's other ready calls queue theirs, then
//! runs one queued ranking (its own or an earlier one) and waits for its own answer. A
//! second ranking queued while a sibling is idle wakes that sibling (claimed: one wake per
//! idle spell) to take one, and a thread that runs out of tasks takes a queued ranking, its
//! own first, then a sibling's, before it parks. A ranking run elsewhere answers its call
//! through the engine's completion, as from the rayon pool.
//!
//! Every queued ranking runs exactly once and soon: each queuing call takes one after it
//! yields, or when it is dropped before (cancelled), so there are as many takers as
//! rankings, and a thread about to park takes one too.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use prometheus_client::metrics::counter::Counter;
use tokio::runtime::{Handle, Runtime};

/// A ranking: the engine's work for one call, answering through its completion.
type Ranking = Box<dyn FnOnce() + Send>;

/// One connection thread as its siblings see it.
struct Lane {
    /// Its runtime, where a sibling spawns the task that wakes it to take a ranking.
    handle: Handle,
    /// True from just before it parks with nothing to take until it wakes (or a sibling
    /// claims it, to wake it).
    idle: AtomicBool,
    /// Rankings queued by its calls, oldest first.
    queue: Mutex<VecDeque<Ranking>>,
    /// The queue's length, read without the lock.
    queued: AtomicUsize,
}

impl Lane {
    /// Queues `ranking` last; the queue's new length.
    fn push(&self, ranking: Ranking) -> usize {
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.push_back(ranking);
        let queued = queue.len();
        self.queued.store(queued, Ordering::Relaxed);
        queued
    }

    /// The oldest queued ranking (none without taking the lock when the queue looks empty).
    fn pop(&self) -> Option<Ranking> {
        if self.queued.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let ranking = queue.pop_front();
        self.queued.store(queue.len(), Ordering::Relaxed);
        ranking
    }
}

/// The connection threads of one server.
pub struct Siblings {
    lanes: Box<[Lane]>,
    /// Rankings run by a thread other than the one that queued them.
    shared: Counter,
}

impl std::fmt::Debug for Siblings {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut list = formatter.debug_list();
        for lane in &self.lanes {
            list.entry(&(
                lane.idle.load(Ordering::Relaxed),
                lane.queued.load(Ordering::Relaxed),
            ));
        }
        list.finish()
    }
}

impl Siblings {
    /// The siblings of the runtimes behind `handles`, in thread order, counting the
    /// rankings one runs for another in `shared`.
    pub fn new(handles: impl IntoIterator<Item = Handle>, shared: Counter) -> Arc<Siblings> {
        let lanes = handles
            .into_iter()
            .map(|handle| Lane {
                handle,
                idle: AtomicBool::new(false),
                queue: Mutex::new(VecDeque::new()),
                queued: AtomicUsize::new(0),
            })
            .collect();
        Arc::new(Siblings { lanes, shared })
    }

    /// Thread `index`'s runtime is about to park (called on that thread, inside its
    /// runtime): a queued ranking, its own first, is taken by a task spawned here instead,
    /// or the thread is marked idle.
    pub fn parking(self: &Arc<Self>, index: usize) {
        let Some(lane) = self.lanes.get(index) else {
            return;
        };
        if self.has_queued() {
            let siblings = Arc::clone(self);
            drop(lane.handle.spawn(async move { siblings.run_one(index) }));
        } else {
            lane.idle.store(true, Ordering::Release);
        }
    }

    /// Thread `index`'s runtime woke.
    pub fn unparked(&self, index: usize) {
        if let Some(lane) = self.lanes.get(index) {
            lane.idle.store(false, Ordering::Relaxed);
        }
    }

    /// Thread `index` has stopped serving (its runtime will not run again): not idle, so
    /// no call queues a ranking for it.
    pub fn retired(&self, index: usize) {
        self.unparked(index);
    }

    /// Whether a thread other than `index` is idle.
    fn any_idle(&self, index: usize) -> bool {
        self.others(index)
            .any(|sibling| sibling.idle.load(Ordering::Relaxed))
    }

    /// Whether any thread has a ranking queued.
    fn has_queued(&self) -> bool {
        self.lanes
            .iter()
            .any(|lane| lane.queued.load(Ordering::Relaxed) > 0)
    }

    /// The lanes other than `index`, from the next one on.
    fn others(&self, index: usize) -> impl Iterator<Item = &Lane> {
        let count = self.lanes.len();
        (1..count).map(move |offset| &self.lanes[(index + offset) % count])
    }

    /// Runs one queued ranking, thread `index`'s own first, then a sibling's; false if
    /// none was queued.
    fn run_one(&self, index: usize) -> bool {
        let ranking = self.lanes.get(index).and_then(Lane::pop).or_else(|| {
            let ranking = self.others(index).find_map(Lane::pop);
            if ranking.is_some() {
                self.shared.inc();
            }
            ranking
        });
        match ranking {
            Some(ranking) => {
                ranking();
                true
            }
            None => false,
        }
    }

    /// Queues `ranking` on thread `index`; with more than one queued there, wakes an idle
    /// sibling (claimed, so it is woken once) to take one.
    fn queue(self: &Arc<Self>, index: usize, ranking: Ranking) {
        let Some(lane) = self.lanes.get(index) else {
            return ranking();
        };
        if lane.push(ranking) < 2 {
            return;
        }
        let idle = self.others(index).position(|sibling| {
            sibling.idle.load(Ordering::Relaxed)
                && sibling
                    .idle
                    .compare_exchange(true, false, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
        });
        if let Some(offset) = idle {
            let sibling = (index + 1 + offset) % self.lanes.len();
            let siblings = Arc::clone(self);
            drop(self.lanes[sibling].handle.spawn(async move {
                siblings.run_one(sibling);
            }));
        }
    }
}

/// The runtime of connection thread `index`: single-threaded, its park hooks telling the
/// siblings (once `known` holds them) when the thread goes idle ([`Siblings::parking`]) and
/// wakes ([`Siblings::unparked`]). The runtimes are built before the siblings, which need
/// their handles.
pub fn connection_runtime(
    known: &Arc<OnceLock<Arc<Siblings>>>,
    index: usize,
) -> std::io::Result<Runtime> {
    let (parking, unparked) = (Arc::clone(known), Arc::clone(known));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(move || {
            if let Some(siblings) = parking.get() {
                siblings.parking(index);
            }
        })
        .on_thread_unpark(move || {
            if let Some(siblings) = unparked.get() {
                siblings.unparked(index);
            }
        })
        .build()
}

thread_local! {
    /// The connection thread this thread is, if it is one.
    static CURRENT: std::cell::RefCell<Option<(Arc<Siblings>, usize)>> =
        const { std::cell::RefCell::new(None) };
}

/// Makes this thread connection thread `index` of `siblings` (for the thread's lifetime).
pub fn enter(siblings: Arc<Siblings>, index: usize) {
    CURRENT.with(|current| *current.borrow_mut() = Some((siblings, index)));
}

/// Runs `ranking`: at once on a thread that is not a connection thread; on a connection
/// thread, queued as the module docs say (it may run on a sibling thread). The caller waits
/// for the answer through the ranking's completion.
pub async fn rank(ranking: impl FnOnce() + Send + 'static) {
    // The siblings are cloned (a shared count both threads would bounce) only to queue.
    let queuing = CURRENT.with(|current| {
        let current = current.borrow();
        let (siblings, index) = current.as_ref()?;
        siblings
            .any_idle(*index)
            .then(|| (Arc::clone(siblings), *index))
    });
    let Some((siblings, index)) = queuing else {
        // Not a connection thread, or every thread is busy: nobody would take it sooner.
        return ranking();
    };
    siblings.queue(index, Box::new(ranking));
    let owed = OwedTake { siblings, index };
    requeue_once().await;
    drop(owed);
}

/// The take a queuing call owes: one queued ranking, run when the call goes on after its
/// requeue, or when the call is dropped before (cancelled), so there are always as many
/// takers as queued rankings.
struct OwedTake {
    siblings: Arc<Siblings>,
    index: usize,
}

impl Drop for OwedTake {
    fn drop(&mut self) {
        self.siblings.run_one(self.index);
    }
}

/// Pending once, woken at once: the task goes to the back of its thread's run queue, behind
/// the calls already ready there (unlike `tokio::task::yield_now`, which waits for the
/// thread's next poll of its sockets, a system call).
async fn requeue_once() {
    let mut requeued = false;
    std::future::poll_fn(|context| {
        if requeued {
            return std::task::Poll::Ready(());
        }
        requeued = true;
        context.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::mpsc;
    use std::time::Duration;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Two connection threads' runtimes (neither running) and their siblings.
    fn two_threads(shared: Counter) -> ([tokio::runtime::Runtime; 2], Arc<Siblings>) {
        let runtimes = [runtime(), runtime()];
        let siblings = Siblings::new(
            runtimes.iter().map(|runtime| runtime.handle().clone()),
            shared,
        );
        (runtimes, siblings)
    }

    /// A ranking that reports the thread it ran on.
    fn reporting(sender: &mpsc::Sender<std::thread::ThreadId>) -> impl FnOnce() + Send + 'static {
        let sender = sender.clone();
        move || sender.send(std::thread::current().id()).unwrap()
    }

    #[test]
    fn off_a_connection_thread_the_ranking_runs_at_once() {
        let (sender, receiver) = mpsc::channel();
        runtime().block_on(rank(reporting(&sender)));
        assert_eq!(receiver.try_recv().unwrap(), std::thread::current().id());
    }

    #[test]
    fn with_no_sibling_idle_a_ranking_runs_at_once_without_queuing() {
        let (_runtimes, siblings) = two_threads(Counter::default());
        let (sender, receiver) = mpsc::channel();
        enter(Arc::clone(&siblings), 0);
        for _ in 0..3 {
            // Ran before `rank` returned its first poll's answer: nothing was queued.
            let mut call = Box::pin(rank(reporting(&sender)));
            assert!(poll_once(call.as_mut()).is_ready());
            assert_eq!(siblings.lanes[0].queued.load(Ordering::Relaxed), 0);
        }
        let ran: Vec<_> = receiver.try_iter().collect();
        assert_eq!(ran, vec![std::thread::current().id(); 3]);
        CURRENT.with(|current| current.borrow_mut().take());
    }

    #[test]
    fn a_retired_sibling_is_not_counted_idle() {
        let (_runtimes, siblings) = two_threads(Counter::default());
        let (sender, receiver) = mpsc::channel();
        enter(Arc::clone(&siblings), 0);
        siblings.parking(1);
        siblings.retired(1);
        let mut call = Box::pin(rank(reporting(&sender)));
        assert!(poll_once(call.as_mut()).is_ready(), "ranked at once");
        assert_eq!(receiver.try_recv().unwrap(), std::thread::current().id());
        assert!(!siblings.any_idle(0));
        CURRENT.with(|current| current.borrow_mut().take());
    }

    #[test]
    fn a_call_dropped_after_queuing_still_takes_a_ranking() {
        let (_runtimes, siblings) = two_threads(Counter::default());
        let (sender, receiver) = mpsc::channel();
        enter(Arc::clone(&siblings), 0);
        // Thread 1 idle (its runtime never runs): the call queues, goes to the back of the
        // run queue, and is dropped there, as a cancelled call is.
        siblings.parking(1);
        let mut call = Box::pin(rank(reporting(&sender)));
        assert!(poll_once(call.as_mut()).is_pending());
        assert_eq!(siblings.lanes[0].queued.load(Ordering::Relaxed), 1);
        assert!(receiver.try_recv().is_err(), "queued, not run");
        drop(call);
        assert_eq!(receiver.try_recv().unwrap(), std::thread::current().id());
        assert_eq!(siblings.lanes[0].queued.load(Ordering::Relaxed), 0);
        CURRENT.with(|current| current.borrow_mut().take());
    }

    #[test]
    fn with_a_sibling_idle_every_ranking_runs_exactly_once() {
        // Thread 1: a runtime with the park hooks, built as the server builds it.
        let (handle_sender, handle_receiver) = mpsc::channel();
        let (siblings_sender, siblings_receiver) = mpsc::channel::<Arc<Siblings>>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let sibling_thread = std::thread::spawn(move || {
            let known = Arc::new(OnceLock::<Arc<Siblings>>::new());
            let runtime = connection_runtime(&known, 1).unwrap();
            handle_sender.send(runtime.handle().clone()).unwrap();
            let siblings = siblings_receiver.recv().unwrap();
            let _ = known.set(Arc::clone(&siblings));
            enter(siblings, 1);
            runtime.block_on(async move {
                let _ = stopped.await;
            });
        });
        let own = runtime();
        let siblings = Siblings::new(
            [own.handle().clone(), handle_receiver.recv().unwrap()],
            Counter::default(),
        );
        siblings_sender.send(Arc::clone(&siblings)).unwrap();
        enter(Arc::clone(&siblings), 0);
        let runs = Arc::new((0..200).map(|_| AtomicUsize::new(0)).collect::<Vec<_>>());
        for round in 0..20 {
            // Let the sibling park (idle) between rounds.
            std::thread::sleep(Duration::from_millis(2));
            own.block_on(async {
                let calls: Vec<_> = (0..10)
                    .map(|call| {
                        let runs = Arc::clone(&runs);
                        tokio::spawn(rank(move || {
                            runs[round * 10 + call].fetch_add(1, Ordering::Relaxed);
                        }))
                    })
                    .collect();
                for call in calls {
                    call.await.unwrap();
                }
            });
        }
        // A ranking taken by the sibling may still be running when its call's task ends
        // (the task waits for the answer, not for the ranking); wait for the counts.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while runs.iter().any(|count| count.load(Ordering::Relaxed) == 0)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let counts: Vec<usize> = runs
            .iter()
            .map(|count| count.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts, vec![1; 200]);
        assert_eq!(siblings.lanes[0].queued.load(Ordering::Relaxed), 0);
        stop.send(()).unwrap();
        sibling_thread.join().unwrap();
        CURRENT.with(|current| current.borrow_mut().take());
    }

    /// Polls `future` once with a waker that does nothing.
    fn poll_once<F: Future>(future: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        future.poll(&mut context)
    }

    #[test]
    fn a_second_queued_ranking_wakes_an_idle_sibling_which_takes_one() {
        let (handle_sender, handle_receiver) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let sibling_thread = std::thread::spawn(move || {
            let runtime = runtime();
            handle_sender
                .send((runtime.handle().clone(), std::thread::current().id()))
                .unwrap();
            runtime.block_on(async move {
                let _ = stopped.await;
            });
        });
        let (handle, sibling_id) = handle_receiver.recv().unwrap();
        let own = runtime();
        let siblings = Siblings::new([own.handle().clone(), handle], Counter::default());
        siblings.lanes[1].idle.store(true, Ordering::Relaxed);
        let (sender, receiver) = mpsc::channel();
        // Two rankings queued on thread 0 without taking any: the sibling is woken once
        // (claimed) and takes the oldest.
        siblings.queue(0, Box::new(reporting(&sender)));
        assert!(
            siblings.lanes[1].idle.load(Ordering::Relaxed),
            "one queued: not woken"
        );
        siblings.queue(0, Box::new(reporting(&sender)));
        assert!(!siblings.lanes[1].idle.load(Ordering::Relaxed), "claimed");
        assert_eq!(
            receiver.recv_timeout(Duration::from_secs(10)).unwrap(),
            sibling_id
        );
        // The other is still queued on thread 0 for a taker there.
        assert_eq!(siblings.lanes[0].queued.load(Ordering::Relaxed), 1);
        assert!(siblings.run_one(0));
        assert_eq!(receiver.try_recv().unwrap(), std::thread::current().id());
        assert!(!siblings.run_one(0), "nothing left");
        stop.send(()).unwrap();
        sibling_thread.join().unwrap();
    }

    #[test]
    fn a_parking_thread_takes_its_own_ranking_first_then_a_siblings() {
        let shared = Counter::default();
        let (runtimes, siblings) = two_threads(shared.clone());
        let (sender, receiver) = mpsc::channel();
        let labelled = |label: &'static str| {
            let sender = sender.clone();
            Box::new(move || sender.send(label).unwrap()) as Ranking
        };
        // Rankings left on both threads (their calls were cancelled): thread 0, about to
        // park, takes one per park instead of going idle, its own first.
        siblings.lanes[1].push(labelled("thread 1's"));
        siblings.lanes[0].push(labelled("thread 0's"));
        for expected in ["thread 0's", "thread 1's"] {
            runtimes[0].block_on(async {
                siblings.parking(0);
                assert!(!siblings.lanes[0].idle.load(Ordering::Relaxed));
                tokio::task::yield_now().await;
            });
            assert_eq!(receiver.try_recv().unwrap(), expected);
            assert!(receiver.try_recv().is_err(), "one per park");
        }
        assert_eq!(shared.get(), 1, "only thread 1's was shared");
        // Nothing queued anywhere: parking marks the thread idle.
        runtimes[0].block_on(async { siblings.parking(0) });
        assert!(siblings.lanes[0].idle.load(Ordering::Relaxed));
        siblings.unparked(0);
        assert!(!siblings.lanes[0].idle.load(Ordering::Relaxed));
    }
}
