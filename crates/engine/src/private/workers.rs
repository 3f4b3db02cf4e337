//! The DP worker threads: they run differentially private requests end to end (scoring,
//! private selection, the blocking ledger charge), so durable ledger commits never block
//! the shared rayon pool, and refill their pre-generated noise between requests.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::error::EngineError;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of threads taking jobs from one queue.
#[derive(Debug)]
pub(crate) struct PrivateWorkers {
    sender: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl PrivateWorkers {
    /// Starts `count` threads.
    pub fn start(count: usize) -> Result<PrivateWorkers, EngineError> {
        let (sender, receiver) = channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let receiver = Arc::clone(&receiver);
            let thread = std::thread::Builder::new()
                .name(format!("fairrank-dp-{index}"))
                .spawn(move || work(&receiver))
                .map_err(|error| EngineError::Unavailable {
                    message: format!("cannot start a DP worker thread: {error}"),
                })?;
            threads.push(thread);
        }
        Ok(PrivateWorkers {
            sender: Mutex::new(Some(sender)),
            threads: Mutex::new(threads),
        })
    }

    /// Queues `job`. If the workers are gone the job is dropped, and its completion guard
    /// answers the caller with an error.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let sender = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(sender) = sender.as_ref() {
            let _ = sender.send(Box::new(job));
        }
    }
}

impl Drop for PrivateWorkers {
    fn drop(&mut self) {
        drop(
            self.sender
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        let current = std::thread::current().id();
        for thread in threads {
            // A worker dropping the last engine handle cannot join itself.
            if thread.thread().id() != current {
                let _ = thread.join();
            }
        }
    }
}

/// A worker's loop: run jobs until the queue closes, refilling noise after each.
fn work(receiver: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let receiver = receiver.lock().unwrap_or_else(PoisonError::into_inner);
            receiver.recv()
        };
        let Ok(job) = job else { return };
        let _ = catch_unwind(AssertUnwindSafe(job));
        super::refill_noise();
    }
}
