//! [`ExecutorClient`]: a [`NetClient`]'s calls made from one glommio executor over that
//! executor's own connections.
//!
//! The [`NetClient`] works from any thread because each of its connections has a writer and a
//! reader thread: a request crosses to the writer thread, its answer comes back from the
//! reader thread through a channel, and the caller's executor is woken from outside. Under
//! load that is a few thread hand-offs per request, and on a small machine those threads
//! compete with the caller and the nodes for the same CPUs. An `ExecutorClient` keeps all of it
//! on the calling executor: its connections are glommio sockets, requests queued in one
//! scheduler pass go out in one write, and a reader task hands each answer to the waiting task
//! on the same thread.
//!
//! Routing, redirects, retries and the leader cache are the [`NetClient`]'s (shared with every
//! other `ExecutorClient` of it); only the connections are this executor's. `!Send`: make one
//! per executor with [`NetClient::on_executor`], on that executor.
//!
//! **Bounded**: a connection holds one slot per call waiting on it (the calling tasks bound
//! them) and the requests not yet written; the server answers `Busy` past its per-connection
//! limit. **Closing**: dropping the `ExecutorClient` (no call can be waiting then: calls borrow
//! it) closes its connections; their tasks end when the server has closed its side.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_lite::io::{BufReader, ReadHalf, WriteHalf};
use glommio::net::TcpStream;
use ringraft_engine::{Consistency, Tickets};
use ringraft_sm::{Command, CommandResult};

use crate::client::{answer_in, socket_addr, Carrier, ClientError, NetClient, SWEEP_INTERVAL};
use crate::coarse::CoarseInstant;
use crate::frame;
use crate::peer::{write_queued, Signal};
use crate::protocol::{self, Body, Failure, Request, Response};

/// See the module docs.
pub struct ExecutorClient {
    client: NetClient,
    /// Open connections by (node, shard).
    conns: RefCell<HashMap<(u64, u64), Rc<LocalConn>, ahash::RandomState>>,
    /// Connections being opened: calls that need one meanwhile wait for that attempt instead
    /// of each opening their own (a thousand tasks starting at once would otherwise flood the
    /// server's accept queue, and dropped SYNs wait a second or more for their retry).
    opening: RefCell<HashMap<(u64, u64), Rc<Opening>, ahash::RandomState>>,
    /// Connection attempts made so far.
    attempts: Cell<u64>,
}

/// One attempt to open a connection, and the calls waiting for it.
#[derive(Default)]
struct Opening {
    result: RefCell<Option<Result<Rc<LocalConn>, ClientError>>>,
    waiting: RefCell<Vec<Waker>>,
}

impl std::fmt::Debug for ExecutorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorClient")
            .field("connections", &self.conns.borrow().len())
            .finish()
    }
}

impl NetClient {
    /// This client's calls over connections of the current glommio executor (see
    /// [`ExecutorClient`]). Must be called on a glommio executor, and the result used there.
    pub fn on_executor(&self) -> ExecutorClient {
        ExecutorClient {
            client: self.clone(),
            conns: RefCell::default(),
            opening: RefCell::default(),
            attempts: Cell::new(0),
        }
    }
}

impl ExecutorClient {
    /// The client whose routing this uses.
    pub fn client(&self) -> &NetClient {
        &self.client
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.conns.borrow().values().filter(|c| !c.dead.get()).count()
    }

    /// Connections this client has tried to open (one attempt at a time per node and shard,
    /// however many calls wait for it).
    pub fn connection_attempts(&self) -> u64 {
        self.attempts.get()
    }

    /// Commands for one group (all keys must belong to it), applied in order.
    pub async fn submit(
        &self,
        group: u64,
        commands: Vec<Command>,
    ) -> Result<Vec<CommandResult>, ClientError> {
        self.client.via(self).submit(group, commands).await
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        self.client.via(self).put(key, value).await
    }

    /// `false` if the key was absent.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, ClientError> {
        self.client.via(self).delete(key).await
    }

    /// Writes `new` (`None` deletes) if the value is `expected`; else `Err(current value)`.
    pub async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<Result<(), Option<Vec<u8>>>, ClientError> {
        self.client.via(self).compare_and_swap(key, expected, new).await
    }

    /// Reads a key, as [`NetClient::get`].
    pub async fn get(&self, key: &[u8], consistency: Consistency) -> Result<Option<Vec<u8>>, ClientError> {
        self.client.via(self).get_at(None, key, consistency).await
    }

    /// The connection to the shard of `node` that serves `group`, opened if need be (once:
    /// calls needing it meanwhile share the attempt and its outcome).
    async fn conn(&self, node: u64, group: u64) -> Result<Rc<LocalConn>, ClientError> {
        let key = self.client.conn_key(node, group);
        if let Some(conn) = self.conns.borrow().get(&key).filter(|c| !c.dead.get()) {
            return Ok(conn.clone());
        }
        let under_way = self.opening.borrow().get(&key).cloned();
        if let Some(opening) = under_way {
            return futures_lite::future::poll_fn(|cx| match opening.result.borrow().as_ref() {
                Some(result) => Poll::Ready(result.clone()),
                None => {
                    opening.waiting.borrow_mut().push(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
        }
        let addr = self.client.address_of(node, group)?;
        let attempt = Attempt {
            client: self,
            key,
            addr: addr.clone(),
            opening: Rc::new(Opening::default()),
        };
        self.opening.borrow_mut().insert(key, attempt.opening.clone());
        self.attempts.set(self.attempts.get() + 1);
        let result = LocalConn::open(&addr, self.client.config()).await;
        if let Ok(conn) = &result {
            self.conns.borrow_mut().insert(key, conn.clone());
        }
        *attempt.opening.result.borrow_mut() = Some(result.clone());
        result
    }
}

/// An attempt under way: when it ends, even by its call being dropped, it leaves the map and
/// every call waiting for it gets its outcome.
struct Attempt<'a> {
    client: &'a ExecutorClient,
    key: (u64, u64),
    addr: String,
    opening: Rc<Opening>,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.client.opening.borrow_mut().remove(&self.key);
        self.opening.result.borrow_mut().get_or_insert_with(|| {
            Err(ClientError::Unreachable {
                addr: self.addr.clone(),
                message: "the call opening the connection was dropped".into(),
            })
        });
        for waker in self.opening.waiting.borrow_mut().drain(..) {
            waker.wake();
        }
    }
}

impl Carrier for ExecutorClient {
    async fn call(
        &self,
        node: u64,
        group: u64,
        request: &Request,
        timeout: Duration,
    ) -> Result<Result<Body, Failure>, ClientError> {
        self.conn(node, group).await?.call(request, timeout).await
    }

    async fn call_addr(
        &self,
        addr: &str,
        request: &Request,
        timeout: Duration,
    ) -> Result<Result<Body, Failure>, ClientError> {
        let conn = LocalConn::open(addr, self.client.config()).await?;
        let answer = conn.call(request, timeout).await;
        conn.close();
        answer
    }
}

impl Drop for ExecutorClient {
    fn drop(&mut self) {
        for conn in self.conns.borrow().values() {
            conn.close();
        }
    }
}

/// A call waiting on a connection.
struct Waiting {
    deadline: CoarseInstant,
    timeout: Duration,
    answer: Option<Result<Response, ClientError>>,
    waker: Option<Waker>,
}

/// One pipelined connection, served by three tasks of this executor: a writer, a reader, and
/// a sweeper that times calls out.
struct LocalConn {
    addr: String,
    /// Encoded requests not yet written.
    out: RefCell<Vec<u8>>,
    wake_writer: Signal,
    wake_sweeper: Signal,
    /// Calls waiting, under their request ids: a ticket per call (an index, not a hash map
    /// lookup, on each of the three touches per call; a late answer to a timed-out call never
    /// reaches the call that reuses its slot).
    waiting: RefCell<Tickets<Waiting>>,
    /// Broken or closed: nothing more is sent on it.
    dead: Cell<bool>,
    /// Closing: the writer ends once `out` is written.
    closing: Cell<bool>,
}

impl LocalConn {
    async fn open(addr: &str, config: &crate::client::ClientConfig) -> Result<Rc<LocalConn>, ClientError> {
        let unreachable = |message: String| ClientError::Unreachable {
            addr: addr.to_string(),
            message,
        };
        let socket = socket_addr(addr)?;
        let stream = TcpStream::connect_timeout(socket, config.connect_timeout)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| unreachable(e.to_string()))?;
        let (reader, writer) = futures_lite::io::split(stream);
        let conn = Rc::new(LocalConn {
            addr: addr.to_string(),
            out: RefCell::default(),
            wake_writer: Signal::default(),
            wake_sweeper: Signal::default(),
            waiting: RefCell::default(),
            dead: Cell::new(false),
            closing: Cell::new(false),
        });
        glommio::spawn_local(write_requests(conn.clone(), writer)).detach();
        glommio::spawn_local(read_answers(conn.clone(), reader, config.frame_bytes_max)).detach();
        glommio::spawn_local(sweep(conn.clone())).detach();
        Ok(conn)
    }

    async fn call(&self, request: &Request, timeout: Duration) -> Result<Result<Body, Failure>, ClientError> {
        if self.dead.get() || self.closing.get() {
            return Err(ClientError::Unreachable {
                addr: self.addr.clone(),
                message: "connection closed".into(),
            });
        }
        let id = self.waiting.borrow_mut().insert(Waiting {
            deadline: CoarseInstant::now() + timeout,
            timeout,
            answer: None,
            waker: None,
        });
        protocol::encode_request(&mut self.out.borrow_mut(), id, request);
        self.wake_writer.notify();
        self.wake_sweeper.notify();
        // The reader answers it, the sweeper times it out, or the connection's end fails it.
        let answer = Answer { conn: self, id }.await;
        Ok(answer?.outcome)
    }

    /// Ends every waiting call: with `error`, or as lost (it may have been applied).
    fn fail_all(&self, error: Option<ClientError>) {
        self.dead.set(true);
        for waiting in self.waiting.borrow_mut().values_mut() {
            if waiting.answer.is_none() {
                let error = error.clone().unwrap_or(ClientError::Lost {
                    addr: self.addr.clone(),
                });
                waiting.answer = Some(Err(error));
                if let Some(waker) = waiting.waker.take() {
                    waker.wake();
                }
            }
        }
        self.wake_writer.notify();
        self.wake_sweeper.notify();
    }

    fn close(&self) {
        self.closing.set(true);
        self.wake_writer.notify();
        self.wake_sweeper.notify();
    }
}

/// A call's answer: ready once its slot holds one. Dropping it frees the slot.
struct Answer<'a> {
    conn: &'a LocalConn,
    id: u64,
}

impl Future for Answer<'_> {
    type Output = Result<Response, ClientError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut waiting = self.conn.waiting.borrow_mut();
        let slot = waiting
            .get_mut(self.id)
            .expect("a call's slot lives as long as its Answer");
        match slot.answer.take() {
            Some(answer) => Poll::Ready(answer),
            None => {
                match &mut slot.waker {
                    Some(waker) if waker.will_wake(cx.waker()) => {}
                    waker => *waker = Some(cx.waker().clone()),
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        self.conn.waiting.borrow_mut().remove(self.id);
    }
}

/// Writes requests as they come: everything queued since the last write goes in one write.
async fn write_requests(conn: Rc<LocalConn>, writer: WriteHalf<TcpStream>) {
    let finished = || conn.dead.get() || conn.closing.get();
    if write_queued(&conn.out, &conn.wake_writer, finished, writer)
        .await
        .is_err()
    {
        conn.fail_all(None);
    }
}

/// Hands each answer to its call, until the connection ends.
async fn read_answers(conn: Rc<LocalConn>, reader: ReadHalf<TcpStream>, frame_bytes_max: u64) {
    let mut reader = BufReader::with_capacity(64 << 10, reader);
    let mut arena = bytes::BytesMut::new();
    loop {
        match answer_in(frame::read_in(&mut reader, frame_bytes_max, &mut arena).await) {
            Ok(response) => {
                // Absent: it timed out, or its caller stopped waiting.
                if let Some(slot) = conn.waiting.borrow_mut().get_mut(response.id) {
                    if slot.answer.is_none() {
                        slot.answer = Some(Ok(response));
                        if let Some(waker) = slot.waker.take() {
                            waker.wake();
                        }
                    }
                }
            }
            Err(error) => {
                conn.fail_all(error);
                return;
            }
        }
    }
}

/// Times out calls past their deadline (one timer per connection, not per call; a timeout
/// may fire up to `SWEEP_INTERVAL` late). Ends with the connection.
async fn sweep(conn: Rc<LocalConn>) {
    loop {
        if conn.dead.get() || conn.closing.get() {
            return;
        }
        if conn.waiting.borrow().is_empty() {
            conn.wake_sweeper.wait().await;
            continue;
        }
        glommio::timer::sleep(SWEEP_INTERVAL).await;
        let now = CoarseInstant::now();
        for slot in conn.waiting.borrow_mut().values_mut() {
            if slot.answer.is_none() && slot.deadline <= now {
                slot.answer = Some(Err(ClientError::Timeout(slot.timeout)));
                if let Some(waker) = slot.waker.take() {
                    waker.wake();
                }
            }
        }
    }
}
