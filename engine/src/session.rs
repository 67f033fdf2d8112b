//! A [`Session`]: the embedded client's requests from one thread, answered a shard loop at a
//! time. Same calls as [`Client`] (`put`, `get`, ... routed by key, `NotLeader` followed), but
//! all of the session's requests share one [`ReplySink`], so a shard answering 100 of them in one
//! loop takes one lock and wakes one task, instead of sending on 100 channels and waking 100
//! tasks (often on another thread). Use one per thread that keeps many requests in flight (an
//! executor running many tasks, a benchmark client); [`Client`] stays the handle for anything
//! else.
//!
//! **How answers reach their tasks**: each request waits in a slot under its tag. The task that
//! last found its own slot empty is the *listener*: its waker is the one the sink holds. When
//! woken it takes every answer, fills the slots and wakes their tasks (on this thread: cheap).
//! A listener that finishes (or is dropped) hands the role to another waiting task, so someone
//! always listens while requests wait.
//!
//! **Bounded**: at most `in_flight_max` requests wait at once; more are refused with `Busy`
//! before anything is sent. The sink holds at most one answer per waiting request.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use ringraft_sm::{Command, CommandResult};

use crate::client::{
    cas_answer, cas_commands, delete_answer, delete_commands, get_answer, put_answer, put_commands,
    submit_input, Client,
};
use crate::core::{Consistency, EngineError};
use crate::reply::{Outcome, Reply, ReplySink};
use crate::runtime::{Refused, ShardInput};

enum Slot {
    Waiting(Option<Waker>),
    Done(Outcome),
}

#[derive(Default)]
struct State {
    next_tag: u64,
    /// ahash: SipHash cost a few percent of a benchmark client's CPU.
    slots: HashMap<u64, Slot, ahash::RandomState>,
    /// The tag whose task's waker the sink holds.
    listener: Option<u64>,
}

/// See the module docs. `Send` but not `Sync`: it belongs to one thread at a time.
pub struct Session {
    client: Client,
    sink: ReplySink,
    state: RefCell<State>,
    in_flight_max: usize,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("waiting", &self.state.borrow().slots.len())
            .field("in_flight_max", &self.in_flight_max)
            .finish()
    }
}

impl Client {
    /// A session for one thread with at most `in_flight_max` requests waiting at once (at least
    /// one). See [`Session`].
    pub fn session(&self, in_flight_max: usize) -> Session {
        Session {
            client: self.clone(),
            sink: ReplySink::new(),
            state: RefCell::new(State::default()),
            in_flight_max: in_flight_max.max(1),
        }
    }
}

impl Session {
    /// Requests waiting for their answers now.
    pub fn in_flight(&self) -> usize {
        self.state.borrow().slots.len()
    }

    /// Sends one request per attempt to the group's leader as the client knows it, following
    /// `NotLeader` (each node once), like [`Client`]'s calls.
    async fn call(
        &self,
        group: u64,
        make: impl Fn(Reply) -> ShardInput,
        to_leader: bool,
    ) -> Result<Vec<CommandResult>, EngineError> {
        let mut redirects = self.client.redirects(group, to_leader)?;
        while let Some(node) = redirects.next_node() {
            let tag = {
                let mut state = self.state.borrow_mut();
                if state.slots.len() >= self.in_flight_max {
                    return Err(EngineError::Busy(
                        "the session's requests in flight are at their limit",
                    ));
                }
                let tag = state.next_tag;
                state.next_tag += 1;
                state.slots.insert(tag, Slot::Waiting(None));
                tag
            };
            let answer = Answer { session: self, tag };
            let input = make(Reply::sink(self.sink.clone(), tag));
            match self.client.shard_input(node, group).try_send(input) {
                Ok(()) => {}
                // `answer` is dropped here, freeing the slot.
                Err(Refused::Full) => return Err(EngineError::Busy("the shard's input queue is full")),
                Err(Refused::Stopped) => continue, // node stopped: try another
            }
            if let Some(result) = redirects.settle(&self.client, node, answer.await) {
                return result;
            }
        }
        Err(EngineError::NotLeader { leader: None })
    }

    /// Takes every answer the sink holds into the slots, waking their tasks (not `own`'s),
    /// until the sink is empty: then it holds `cx`'s waker and `own` is the listener.
    fn drain(&self, own: u64, cx: &mut Context<'_>) {
        loop {
            let answers = match self.sink.poll_take(cx) {
                Poll::Ready(answers) => answers,
                Poll::Pending => {
                    self.state.borrow_mut().listener = Some(own);
                    return;
                }
            };
            let mut wake = Vec::new();
            {
                let mut state = self.state.borrow_mut();
                for (tag, outcome) in answers {
                    // Absent: its caller stopped waiting (the future was dropped).
                    if let Some(slot) = state.slots.get_mut(&tag) {
                        if let Slot::Waiting(Some(waker)) = std::mem::replace(slot, Slot::Done(outcome)) {
                            if tag != own {
                                wake.push(waker);
                            }
                        }
                    }
                }
            }
            wake.into_iter().for_each(Waker::wake);
        }
    }

    /// `tag`'s task stops waiting; returns its slot if it still had one. If it was the
    /// listener, another waiting task takes over (its waker goes to the sink; it is woken at
    /// once if answers are already there).
    fn leave(&self, tag: u64) -> Option<Slot> {
        let (slot, handover) = {
            let mut state = self.state.borrow_mut();
            let slot = state.slots.remove(&tag);
            if state.listener != Some(tag) {
                return slot;
            }
            let next = state.slots.iter().find_map(|(&t, slot)| match slot {
                Slot::Waiting(Some(waker)) => Some((t, waker.clone())),
                _ => None,
            });
            state.listener = next.as_ref().map(|(t, _)| *t);
            (slot, next)
        };
        if let Some((_, waker)) = handover {
            self.sink.listen(waker);
        }
        slot
    }

    /// Proposes commands to one group; one result per command, in order, once applied.
    pub async fn submit(
        &self,
        group: u64,
        commands: Vec<Command>,
    ) -> Result<Vec<CommandResult>, EngineError> {
        self.submit_made(group, || commands.clone()).await
    }

    /// [`Session::submit`] of the commands `make` builds (see [`submit_input`]).
    async fn submit_made(
        &self,
        group: u64,
        make: impl Fn() -> Vec<Command>,
    ) -> Result<Vec<CommandResult>, EngineError> {
        self.call(group, submit_input(group, make), true).await
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), EngineError> {
        put_answer(
            self.submit_made(self.client.group_of(key), || put_commands(key, value))
                .await?,
        )
    }

    /// Deletes `key`; `false` if it was absent.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, EngineError> {
        delete_answer(
            self.submit_made(self.client.group_of(key), || delete_commands(key))
                .await?,
        )
    }

    /// Writes `new` (`None` deletes) if the value is `expected`; otherwise returns the current
    /// value as `Err`.
    pub async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<Result<(), Option<Vec<u8>>>, EngineError> {
        let make = || cas_commands(key, expected, new);
        cas_answer(self.submit_made(self.client.group_of(key), make).await?)
    }

    pub async fn get(&self, key: &[u8], consistency: Consistency) -> Result<Option<Vec<u8>>, EngineError> {
        let group = self.client.group_of(key);
        let make = |reply| ShardInput::Read {
            group,
            key: key.to_vec(),
            consistency,
            reply,
        };
        let results = self.call(group, make, consistency != Consistency::Local).await?;
        get_answer(results)
    }
}

/// One request's answer. Dropping it frees the slot (a late answer is then discarded).
struct Answer<'a> {
    session: &'a Session,
    tag: u64,
}

impl Future for Answer<'_> {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let (session, tag) = (self.session, self.tag);
        if !matches!(session.state.borrow().slots.get(&tag), Some(Slot::Done(_))) {
            session.drain(tag, cx);
        }
        let mut state = session.state.borrow_mut();
        match state.slots.get_mut(&tag) {
            Some(Slot::Done(_)) => {
                drop(state);
                let Some(Slot::Done(outcome)) = session.leave(tag) else {
                    unreachable!("the slot was just seen done")
                };
                Poll::Ready(outcome)
            }
            Some(Slot::Waiting(waker)) => {
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
            None => unreachable!("a waiting request's slot is only removed when it is answered"),
        }
    }
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        // After it returned its answer this finds nothing left to do.
        self.session.leave(self.tag);
    }
}
