//! Where a shard's answers go. Every request carries a [`Reply`]: either a one-shot channel of
//! its own, or a tag in a [`ReplySink`] that many requests of one caller share (a client
//! connection of the TCP server, an embedded [`crate::Session`]).
//!
//! Why sinks: under load a shard answers ~100 requests per loop. With a channel each, that is
//! ~100 channel allocations, ~100 sends and ~100 wake-ups of the caller's task (often on another
//! thread: an eventfd write, and an executor that parks and wakes again). With a sink the shard
//! gathers one loop's answers per sink and hands them over under one lock with one wake-up.
//!
//! **Bounded**: a sink holds at most one answer per request its owner has in flight, and every
//! owner bounds its requests in flight (the server by `limits.client_queue_depth` per
//! connection, a session by the `in_flight_max` it was made with). The shard never blocks on a
//! sink.
//!
//! **Wake-up contract**: [`ReplySink::poll_take`] stores the waker of its last caller that found
//! the sink empty, under the same lock as the answers, so an answer delivered after the check
//! always wakes that caller. One waiting task per sink is enough: it takes every answer and
//! hands each to whoever waits for it.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use ringraft_sm::CommandResult;

use crate::core::EngineError;

/// A request's outcome: one result per command, in order, or why there are none.
pub type Outcome = Result<Vec<CommandResult>, EngineError>;

/// Where one request's answer goes. Every request is answered: a reply dropped unanswered (a
/// shard stopping on an error, a request still queued when its shard's thread ends) answers
/// `UnknownOutcome` on its way out, so no caller waits forever.
pub(crate) struct Reply(Option<ReplyTo>);

enum ReplyTo {
    Channel(flume::Sender<Outcome>),
    Sink { sink: ReplySink, tag: u64 },
}

impl Reply {
    /// A one-shot channel of the request's own.
    pub(crate) fn channel(tx: flume::Sender<Outcome>) -> Reply {
        Reply(Some(ReplyTo::Channel(tx)))
    }

    /// Tag `tag` in a sink the caller shares among its requests.
    pub(crate) fn sink(sink: ReplySink, tag: u64) -> Reply {
        Reply(Some(ReplyTo::Sink { sink, tag }))
    }

    fn take(&mut self) -> ReplyTo {
        self.0.take().expect("a reply is answered once")
    }

    /// Lets go of a reply without answering it: for a request that never reached its shard,
    /// whose sender answers its caller itself.
    pub(crate) fn forget(mut self) {
        self.0 = None;
    }

    /// Hands over one answer now (paths off the loop's batch: errors, shutdown).
    pub(crate) fn send(mut self, outcome: Outcome) {
        match self.take() {
            // The receiver is gone when its caller gave up waiting: nothing to do.
            ReplyTo::Channel(tx) => {
                let _ = tx.send(outcome);
            }
            ReplyTo::Sink { sink, tag } => sink.deliver(std::iter::once((tag, outcome))),
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.0.is_some() {
            // The request may have been proposed before it was dropped: its outcome is
            // unknown, never a false ok.
            let reply = Reply(self.0.take());
            reply.send(Err(EngineError::UnknownOutcome));
        }
    }
}

/// Answers of one shard loop, gathered per destination before anything is handed over.
#[derive(Default)]
pub(crate) struct AnswerBatch {
    sinks: Vec<(ReplySink, Vec<(u64, Outcome)>)>,
}

impl AnswerBatch {
    pub(crate) fn add(&mut self, mut reply: Reply, outcome: Outcome) {
        match reply.take() {
            ReplyTo::Channel(tx) => {
                let _ = tx.send(outcome);
            }
            ReplyTo::Sink { sink, tag } => {
                // A loop answers a handful of sinks (one per client connection or session).
                match self.sinks.iter_mut().find(|(s, _)| Arc::ptr_eq(&s.0, &sink.0)) {
                    Some((_, answers)) => answers.push((tag, outcome)),
                    None => self.sinks.push((sink, vec![(tag, outcome)])),
                }
            }
        }
    }

    /// One lock and at most one wake-up per sink.
    pub(crate) fn deliver(&mut self) {
        for (sink, answers) in self.sinks.drain(..) {
            sink.deliver(answers);
        }
    }
}

#[derive(Default)]
struct SinkState {
    answers: Vec<(u64, Outcome)>,
    waker: Option<Waker>,
}

/// Answers for many requests of one caller, each under the tag the caller gave it. `Send +
/// Sync + Clone` (clones share the sink); see the module docs.
#[derive(Clone, Default)]
pub struct ReplySink(Arc<Mutex<SinkState>>);

impl std::fmt::Debug for ReplySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("ReplySink")
            .field("answers", &state.answers.len())
            .field("waiting", &state.waker.is_some())
            .finish()
    }
}

impl ReplySink {
    pub fn new() -> ReplySink {
        ReplySink::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        // Nothing panics while holding the lock (extend, take, a waker swap).
        self.0.lock().expect("a reply sink's lock is never poisoned")
    }

    pub(crate) fn deliver(&self, answers: impl IntoIterator<Item = (u64, Outcome)>) {
        let waker = {
            let mut state = self.lock();
            state.answers.extend(answers);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Makes `waker` the one the next delivery wakes; wakes it at once if answers are waiting.
    pub(crate) fn listen(&self, waker: Waker) {
        let mut state = self.lock();
        if state.answers.is_empty() {
            state.waker = Some(waker);
        } else {
            drop(state);
            waker.wake();
        }
    }

    /// Every answer delivered so far (empty if none), without waiting.
    pub fn try_take(&self) -> Vec<(u64, Outcome)> {
        std::mem::take(&mut self.lock().answers)
    }

    /// Every answer delivered so far, or `Pending` with `cx`'s waker stored to be woken by the
    /// next delivery (replacing any waker stored before).
    pub fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Vec<(u64, Outcome)>> {
        let mut state = self.lock();
        if state.answers.is_empty() {
            match &mut state.waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        } else {
            Poll::Ready(std::mem::take(&mut state.answers))
        }
    }

    /// Waits until at least one answer is there and takes them all.
    pub fn take(&self) -> impl Future<Output = Vec<(u64, Outcome)>> + '_ {
        std::future::poll_fn(move |cx| self.poll_take(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_delivers_each_sink_once_in_order() {
        let (a, b) = (ReplySink::new(), ReplySink::new());
        let (tx, rx) = flume::bounded(1);
        let mut batch = AnswerBatch::default();
        batch.add(Reply::sink(a.clone(), 1), Ok(vec![]));
        batch.add(Reply::sink(b.clone(), 7), Err(EngineError::UnknownOutcome));
        batch.add(Reply::channel(tx), Ok(vec![CommandResult::Ok]));
        batch.add(Reply::sink(a.clone(), 2), Ok(vec![CommandResult::NotFound]));
        // A channel answer goes at once; sinks wait for deliver().
        assert_eq!(rx.try_recv().unwrap(), Ok(vec![CommandResult::Ok]));
        assert!(a.try_take().is_empty());
        batch.deliver();
        let tags: Vec<u64> = a.try_take().into_iter().map(|(t, _)| t).collect();
        assert_eq!(tags, [1, 2]);
        assert_eq!(b.try_take(), vec![(7, Err(EngineError::UnknownOutcome))]);
        assert!(a.try_take().is_empty());
    }

    #[test]
    fn a_waiting_taker_is_woken_from_another_thread() {
        let sink = ReplySink::new();
        let remote = sink.clone();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            remote.deliver([(3, Ok(vec![]))]);
        });
        let answers = futures_lite::future::block_on(sink.take());
        assert_eq!(answers, vec![(3, Ok(vec![]))]);
        sender.join().unwrap();
    }
}
