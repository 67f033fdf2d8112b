//! The client library: an async client (plus blocking calls) for a ringraft cluster over the
//! client protocol. `Send + Sync + Clone`; its futures need no particular runtime (they work
//! under glommio, tokio, or `block_on` on a plain thread).
//!
//! - Learns the cluster's layout (members, client ports, shards, groups) from any seed address.
//! - Routes each key to its group (`crc32c(key) % groups`) and the group to the client port of
//!   the shard owning it on the node it believes leads the group.
//! - Follows `NotLeader` redirects, retries `Busy` and leaderless moments with exponential
//!   backoff, and returns every other answer as it is.
//! - Learns the layout again as nodes join and leave (SIGHUP): from the redirecting node when a
//!   redirect names a node the layout does not list; from the next node that answers after one
//!   could not be reached; and from the seeds when none of the nodes it knows can be reached
//!   (the cluster was replaced node by node). At most once per
//!   [`ClientConfig::relearn_interval_min`], however many calls notice.
//! - Pipelines: any number of requests share one connection per (node, shard); each connection
//!   has a writer thread that puts everything queued into one write, and a reader thread that
//!   matches answers to requests by id. On a glommio executor, [`NetClient::on_executor`] gives
//!   the same calls over that executor's own connections instead
//!   ([`crate::executor_client`]).
//!
//! A write whose connection is lost after it was sent, or that times out, is reported as such:
//! its outcome is unknown (it may have been applied). Reads are retried on another node.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ringraft_engine::{Consistency, GroupMetrics, GroupStatus, LeaderCache, MemberChange, NodeStats};
use ringraft_sm::{Command, CommandResult};

use crate::coarse::CoarseInstant;
use crate::frame::{self, kind, FrameError};
use crate::protocol::{self, Body, ClusterInfo, Failure, Request, Response};

/// How the client behaves.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Addresses (`host:port`, any node's client port) to learn the cluster from.
    pub seeds: Vec<String>,
    /// How long one request may wait for its answer.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Attempts per call across redirects, `Busy` and leaderless periods.
    pub attempts_max: u32,
    /// Backoff between attempts: first delay and cap (doubling).
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Largest frame accepted from a server.
    pub frame_bytes_max: u64,
    /// Least time between two attempts to learn the layout again: when a node goes, every
    /// call in flight notices, and one `CLUSTER` request serves them all.
    pub relearn_interval_min: Duration,
}

impl ClientConfig {
    pub fn new(seeds: impl IntoIterator<Item = impl Into<String>>) -> ClientConfig {
        ClientConfig {
            seeds: seeds.into_iter().map(Into::into).collect(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            attempts_max: 40,
            backoff_min: Duration::from_millis(1),
            backoff_max: Duration::from_millis(200),
            frame_bytes_max: 64 << 20,
            relearn_interval_min: Duration::from_millis(100),
        }
    }
}

/// Why a call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The server's answer.
    #[error(transparent)]
    Server(#[from] Failure),
    /// No connection could carry the request; it was not sent.
    #[error("cannot reach {addr}: {message}")]
    Unreachable { addr: String, message: String },
    /// The connection broke with the request in flight: it may or may not have been applied.
    #[error("outcome unknown: the connection to {addr} broke with the request in flight")]
    Lost { addr: String },
    /// No answer in time: the request may or may not take effect.
    #[error("no answer within {0:?}; the request may still take effect")]
    Timeout(Duration),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Redirects, `Busy` or leaderless periods used up every attempt.
    #[error("gave up after {attempts} attempts; last: {last}")]
    GaveUp { attempts: u32, last: Box<ClientError> },
}

impl ClientError {
    /// True when the request may have been applied although no ok came back.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            ClientError::Lost { .. } | ClientError::Timeout(_) => true,
            ClientError::Server(Failure::UnknownOutcome(_) | Failure::Timeout(_)) => true,
            ClientError::GaveUp { last, .. } => last.outcome_unknown(),
            _ => false,
        }
    }
}

/// What one frame read from a server means: an answer, or why the connection ends (`None`: it
/// closed or broke, so whatever waits on it is lost).
pub(crate) fn answer_in(frame: Result<frame::Frame, FrameError>) -> Result<Response, Option<ClientError>> {
    let frame = match frame {
        Ok(frame) => frame,
        Err(FrameError::Closed | FrameError::Io(_)) => return Err(None),
        Err(e) => {
            return Err(Some(ClientError::Protocol(format!(
                "server sent a bad frame: {e}"
            ))))
        }
    };
    match frame.kind {
        kind::RESPONSE => {
            protocol::decode_response(&frame.payload).map_err(|e| Some(ClientError::Protocol(e.to_string())))
        }
        kind::ERROR => {
            let message = frame::Cursor::new(&frame.payload)
                .string("error")
                .unwrap_or_else(|e| e.to_string());
            Err(Some(ClientError::Protocol(format!(
                "server refused the connection: {message}"
            ))))
        }
        other => Err(Some(ClientError::Protocol(format!(
            "unexpected frame kind {other:#04x}"
        )))),
    }
}

/// The socket address `addr` (`host:port`) names; `Unreachable` when it names none.
pub(crate) fn socket_addr(addr: &str) -> Result<std::net::SocketAddr, ClientError> {
    let unreachable = |message: String| ClientError::Unreachable {
        addr: addr.to_string(),
        message,
    };
    addr.to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .next()
        .ok_or_else(|| unreachable("no address".into()))
}

/// A blocking reader as an `AsyncRead` that is always ready (the reader thread blocks in it).
struct Blocking<R>(R);

impl<R: std::io::Read + Unpin> futures_lite::AsyncRead for Blocking<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(self.0.read(buf))
    }
}

/// Where a request's answer goes, and when it stops waiting.
type Waiter = (
    flume::Sender<Result<Response, ClientError>>,
    CoarseInstant,
    Duration,
);

/// A connection's requests waiting for answers, by id (ahash: SipHash showed in profiles).
type Pending = HashMap<u64, Waiter, ahash::RandomState>;

/// How often a connection's sweeper times out requests (a timeout may fire this much late).
pub(crate) const SWEEP_INTERVAL: Duration = Duration::from_millis(50);

/// One pipelined connection.
struct Conn {
    addr: String,
    frames: flume::Sender<Vec<u8>>,
    pending: Arc<Mutex<Pending>>,
    next_id: AtomicU64,
    dead: Arc<AtomicBool>,
}

impl Conn {
    fn open(addr: &str, config: &ClientConfig) -> Result<Arc<Conn>, ClientError> {
        let unreachable = |message: String| ClientError::Unreachable {
            addr: addr.to_string(),
            message,
        };
        let socket = socket_addr(addr)?;
        let stream = TcpStream::connect_timeout(&socket, config.connect_timeout)
            .map_err(|e| unreachable(e.to_string()))?;
        stream.set_nodelay(true).map_err(|e| unreachable(e.to_string()))?;
        let read_stream = stream.try_clone().map_err(|e| unreachable(e.to_string()))?;
        let (frames, queued) = flume::unbounded::<Vec<u8>>();
        let pending: Arc<Mutex<Pending>> = Arc::default();
        let dead = Arc::new(AtomicBool::new(false));
        let fail_all = {
            let (pending, dead, addr) = (pending.clone(), dead.clone(), addr.to_string());
            move |error: Option<ClientError>| {
                dead.store(true, Ordering::SeqCst);
                for (_, (waiter, _, _)) in pending.lock().unwrap().drain() {
                    let error = error.clone().unwrap_or(ClientError::Lost { addr: addr.clone() });
                    let _ = waiter.send(Err(error));
                }
            }
        };
        {
            let fail_all = fail_all.clone();
            let mut stream = stream;
            std::thread::Builder::new()
                .name(format!("ringraft-client-w {addr}"))
                .spawn(move || {
                    let mut buf = Vec::new();
                    while let Ok(first) = queued.recv() {
                        buf.clear();
                        buf.extend_from_slice(&first);
                        while buf.len() < (1 << 20) {
                            match queued.try_recv() {
                                Ok(more) => buf.extend_from_slice(&more),
                                Err(_) => break,
                            }
                        }
                        if stream.write_all(&buf).is_err() {
                            break;
                        }
                    }
                    // The client dropped the connection, or it broke.
                    let _ = stream.shutdown(Shutdown::Both);
                    fail_all(None);
                })
                .map_err(|e| unreachable(format!("thread: {e}")))?;
        }
        {
            let pending = pending.clone();
            let max = config.frame_bytes_max;
            std::thread::Builder::new()
                .name(format!("ringraft-client-r {addr}"))
                .spawn(move || {
                    let mut reader = Blocking(BufReader::with_capacity(64 << 10, read_stream));
                    loop {
                        let frame = futures_lite::future::block_on(frame::read(&mut reader, max));
                        match answer_in(frame) {
                            Ok(response) => {
                                if let Some((waiter, _, _)) = pending.lock().unwrap().remove(&response.id) {
                                    let _ = waiter.send(Ok(response));
                                }
                            }
                            Err(error) => {
                                fail_all(error);
                                break;
                            }
                        }
                    }
                })
                .map_err(|e| unreachable(format!("thread: {e}")))?;
        }
        {
            // One timer per connection instead of one per request: requests past their
            // deadline get `Timeout`. Stops when the connection is gone.
            let (pending, dead) = (Arc::downgrade(&pending), dead.clone());
            std::thread::Builder::new()
                .name(format!("ringraft-client-t {addr}"))
                .spawn(move || loop {
                    std::thread::sleep(SWEEP_INTERVAL);
                    let Some(pending) = pending.upgrade() else { return };
                    if dead.load(Ordering::SeqCst) {
                        return;
                    }
                    let now = CoarseInstant::now();
                    pending.lock().unwrap().retain(|_, (waiter, deadline, timeout)| {
                        if now < *deadline {
                            return true;
                        }
                        let _ = waiter.send(Err(ClientError::Timeout(*timeout)));
                        false
                    });
                })
                .map_err(|e| unreachable(format!("thread: {e}")))?;
        }
        Ok(Arc::new(Conn {
            addr: addr.to_string(),
            frames,
            pending,
            next_id: AtomicU64::new(1),
            dead,
        }))
    }

    async fn call(&self, request: &Request, timeout: Duration) -> Result<Result<Body, Failure>, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = flume::bounded(1);
        let deadline = CoarseInstant::now() + timeout;
        self.pending.lock().unwrap().insert(id, (tx, deadline, timeout));
        let not_sent = || ClientError::Unreachable {
            addr: self.addr.clone(),
            message: "connection closed".into(),
        };
        if self.dead.load(Ordering::SeqCst) {
            self.pending.lock().unwrap().remove(&id);
            return Err(not_sent());
        }
        let mut buf = Vec::new();
        protocol::encode_request(&mut buf, id, request);
        if self.frames.send(buf).is_err() {
            self.pending.lock().unwrap().remove(&id);
            return Err(not_sent());
        }
        // The reader answers it, the sweeper times it out, or the connection's end fails it.
        let answer = rx.recv_async().await.unwrap_or(Err(ClientError::Lost {
            addr: self.addr.clone(),
        }));
        Ok(answer?.outcome)
    }
}

struct Inner {
    config: ClientConfig,
    /// The cluster's layout, replaced when a redirect names a node it does not list (nodes
    /// join and leave running clusters: SIGHUP). Its groups and shards never change; the hot
    /// paths read those copies below instead of taking the lock.
    info: RwLock<Arc<ClusterInfo>>,
    groups: u64,
    shards: u64,
    /// Open connections by (node, shard): the address is made only to open one.
    conns: Mutex<HashMap<(u64, u64), Arc<Conn>, ahash::RandomState>>,
    leaders: LeaderCache,
    /// When the last attempt to learn the layout again began (see [`NetClient::relearn`]).
    relearned_at: Mutex<Option<std::time::Instant>>,
}

/// See the module docs.
#[derive(Clone)]
pub struct NetClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NetClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetClient")
            .field("cluster", &*self.cluster())
            .finish()
    }
}

/// Asks one address for the cluster's layout.
pub fn fetch_cluster(addr: &str, config: &ClientConfig) -> Result<ClusterInfo, ClientError> {
    let conn = Conn::open(addr, config)?;
    match futures_lite::future::block_on(conn.call(&Request::Cluster, config.request_timeout))? {
        Ok(Body::Cluster(info)) if info.groups > GROUPS_MAX => Err(ClientError::Protocol(format!(
            "the cluster says it has {} groups; this client handles at most {GROUPS_MAX}",
            info.groups
        ))),
        Ok(Body::Cluster(info)) if info.groups > 0 && info.shards > 0 => Ok(info),
        Ok(other) => Err(ClientError::Protocol(format!(
            "unexpected cluster answer {other:?}"
        ))),
        Err(failure) => Err(failure.into()),
    }
}

/// The most groups a cluster may have for this client (it keeps 8 bytes per group; a server
/// claiming more is refused rather than trusted with the client's memory).
pub const GROUPS_MAX: u64 = 1 << 20;

/// Asks one node (any of its client ports) for its per-group status.
pub fn fetch_status(addr: &str, config: &ClientConfig) -> Result<Vec<GroupStatus>, ClientError> {
    let conn = Conn::open(addr, config)?;
    match futures_lite::future::block_on(conn.call(&Request::Status, config.request_timeout))? {
        Ok(Body::Status(groups)) => Ok(groups),
        Ok(other) => Err(ClientError::Protocol(format!(
            "unexpected status answer {other:?}"
        ))),
        Err(failure) => Err(failure.into()),
    }
}

/// Asks one node for every group's metrics (lags, queues, counters, log and checkpoint
/// indexes). A node from before `GROUP_METRICS_V2` refuses that request (and closes the
/// connection); it is asked again the old way, and the fields the old answer lacks
/// (`first_index`, `checkpoint_index`) are 0.
pub fn fetch_group_metrics(addr: &str, config: &ClientConfig) -> Result<Vec<GroupMetrics>, ClientError> {
    let conn = Conn::open(addr, config)?;
    let answer = futures_lite::future::block_on(conn.call(&Request::GroupMetricsV2, config.request_timeout))?;
    let answer = match answer {
        Err(Failure::BadRequest(why)) if why.contains("unknown request kind") => {
            let conn = Conn::open(addr, config)?;
            futures_lite::future::block_on(conn.call(&Request::GroupMetrics, config.request_timeout))?
        }
        answer => answer,
    };
    match answer {
        Ok(Body::GroupMetrics(groups) | Body::GroupMetricsV2(groups)) => Ok(groups),
        Ok(other) => Err(ClientError::Protocol(format!(
            "unexpected metrics answer {other:?}"
        ))),
        Err(failure) => Err(failure.into()),
    }
}

/// Asks one node for its counters (summed over its shards).
pub fn fetch_stats(addr: &str, config: &ClientConfig) -> Result<NodeStats, ClientError> {
    let conn = Conn::open(addr, config)?;
    match futures_lite::future::block_on(conn.call(&Request::Stats, config.request_timeout))? {
        Ok(Body::Stats(stats)) => Ok(stats),
        Ok(other) => Err(ClientError::Protocol(format!(
            "unexpected stats answer {other:?}"
        ))),
        Err(failure) => Err(failure.into()),
    }
}

impl NetClient {
    /// Connects: learns the cluster from the first seed that answers.
    pub fn connect(config: ClientConfig) -> Result<NetClient, ClientError> {
        let mut last = ClientError::Unreachable {
            addr: String::new(),
            message: "no seed addresses given".into(),
        };
        for seed in &config.seeds {
            match fetch_cluster(seed, &config) {
                Ok(info) => return Ok(NetClient::with_layout(config, info)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn with_layout(config: ClientConfig, info: ClusterInfo) -> NetClient {
        NetClient {
            inner: Arc::new(Inner {
                config,
                leaders: LeaderCache::new(info.groups),
                groups: info.groups,
                shards: info.shards,
                info: RwLock::new(Arc::new(info)),
                conns: Mutex::default(),
                relearned_at: Mutex::default(),
            }),
        }
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The cluster's layout as this client last learned it.
    pub fn cluster(&self) -> Arc<ClusterInfo> {
        self.inner.info.read().unwrap().clone()
    }

    pub fn group_of(&self, key: &[u8]) -> u64 {
        ringraft_engine::group_of(key, self.inner.groups)
    }

    /// The node this client believes leads `group`, if any.
    pub fn leader_of(&self, group: u64) -> Option<u64> {
        self.inner.leaders.get(group)
    }

    /// Which connection carries requests for `group` to `node`: (node, shard).
    pub(crate) fn conn_key(&self, node: u64, group: u64) -> (u64, u64) {
        (node, group % self.inner.shards.max(1))
    }

    /// `host:port` of the client port serving `group` on `node`.
    pub(crate) fn address_of(&self, node: u64, group: u64) -> Result<String, ClientError> {
        self.cluster()
            .address(node, group)
            .ok_or_else(|| ClientError::Protocol(format!("node {node} is not in the cluster")))
    }

    /// The connection to the shard of `node` that serves `group`, opened if need be.
    fn conn(&self, node: u64, group: u64) -> Result<Arc<Conn>, ClientError> {
        let key = self.conn_key(node, group);
        let mut conns = self.inner.conns.lock().unwrap();
        if let Some(conn) = conns.get(&key) {
            if !conn.dead.load(Ordering::SeqCst) {
                return Ok(conn.clone());
            }
        }
        let conn = Conn::open(&self.address_of(node, group)?, &self.inner.config)?;
        conns.insert(key, conn.clone());
        Ok(conn)
    }

    /// The member after `after` in the layout; the first one if `after` left it.
    fn next_member(&self, after: u64) -> u64 {
        let info = self.cluster();
        let members = &info.members;
        let next = members
            .iter()
            .position(|m| m.id == after)
            .map_or(0, |at| (at + 1) % members.len());
        members[next].id
    }

    /// Sends `request` for `group` over `carrier`: to the believed leader when `to_leader`,
    /// following redirects; otherwise to `node` (or the believed leader) as it is.
    async fn route<C: Carrier>(
        &self,
        carrier: &C,
        group: u64,
        request: Request,
        to_leader: bool,
        retry_lost: bool,
        node: Option<u64>,
    ) -> Result<Body, ClientError> {
        let config = &self.inner.config;
        if group >= self.inner.groups {
            return Err(Failure::UnknownGroup(format!("group {group}")).into());
        }
        let mut target = node.or_else(|| self.leader_of(group)).unwrap_or_else(|| {
            let members = &self.cluster().members;
            members[group as usize % members.len()].id
        });
        let mut backoff = config.backoff_min;
        let mut last = None;
        // Nodes in a row that could not be reached.
        let mut unreachable = 0;
        // A redirect to a known leader goes at once; every other retry backs off.
        let mut at_once = false;
        for attempt in 0..config.attempts_max {
            if attempt > 0 && !std::mem::take(&mut at_once) {
                futures_timer::Delay::new(backoff).await;
                backoff = (backoff * 2).min(config.backoff_max);
            }
            // A Protocol error (`target` not in the cluster, a bad answer) ends the call below:
            // no retry helps.
            let outcome = carrier
                .call(target, group, &request, config.request_timeout)
                .await;
            match &outcome {
                _ if node.is_some() => {}
                Err(ClientError::Unreachable { .. }) => {
                    unreachable += 1;
                    if unreachable >= self.cluster().members.len() {
                        // None of the nodes this client knows: the cluster may have been
                        // replaced node by node since. The seeds may still lead to it.
                        unreachable = 0;
                        self.relearn(carrier, Source::Seeds).await;
                    }
                }
                Ok(_) if unreachable > 0 => {
                    // The nodes that did not answer may have left the cluster, and others
                    // joined: this one knows.
                    unreachable = 0;
                    self.relearn(carrier, Source::Node(target, group)).await;
                }
                _ => {}
            }
            let error = match outcome {
                Ok(Ok(body)) => {
                    if to_leader {
                        self.inner.leaders.set(group, Some(target));
                    }
                    return Ok(body);
                }
                Ok(Err(failure)) => ClientError::Server(failure),
                Err(e) => e,
            };
            match &error {
                // Also for a local read: a node that is no member of the group names its leader.
                ClientError::Server(Failure::NotLeader { leader, .. }) if node.is_none() => {
                    // A leader this client does not know joined after it learned the cluster:
                    // learn it again from the node that named it.
                    let unknown = leader.filter(|&l| !self.knows(l));
                    if let Some(unknown) = unknown {
                        self.relearn(carrier, Source::Node(target, group)).await;
                        if !self.knows(unknown) {
                            // Not listed there either (yet): ask around meanwhile.
                            self.inner.leaders.set(group, None);
                            target = self.next_member(target);
                            last = Some(error);
                            continue;
                        }
                    }
                    match leader {
                        Some(leader) if *leader != target => {
                            self.inner.leaders.set(group, Some(*leader));
                            target = *leader;
                            at_once = true;
                        }
                        _ => {
                            self.inner.leaders.set(group, None);
                            target = self.next_member(target);
                        }
                    }
                }
                ClientError::Server(Failure::Busy(_)) => {}
                ClientError::Unreachable { .. } if node.is_none() => {
                    self.inner.leaders.set(group, None);
                    target = self.next_member(target);
                }
                ClientError::Lost { .. } | ClientError::Timeout(_) if retry_lost && node.is_none() => {
                    target = self.next_member(target);
                }
                _ => return Err(error),
            }
            last = Some(error);
        }
        Err(ClientError::GaveUp {
            attempts: config.attempts_max,
            last: Box::new(last.expect("at least one attempt")),
        })
    }

    fn knows(&self, node: u64) -> bool {
        self.cluster().members.iter().any(|m| m.id == node)
    }

    /// Asks for the cluster's layout and takes it, if it is the same cluster with the same
    /// groups and shards (only members may change); returns whether it did. A failure leaves
    /// the layout as it was. Skipped (`false`) within [`ClientConfig::relearn_interval_min`]
    /// of the last attempt.
    async fn relearn<C: Carrier>(&self, carrier: &C, source: Source) -> bool {
        let config = &self.inner.config;
        {
            let mut at = self.inner.relearned_at.lock().unwrap();
            if at.is_some_and(|at| at.elapsed() < config.relearn_interval_min) {
                return false;
            }
            *at = Some(std::time::Instant::now());
        }
        let timeout = config.request_timeout;
        match source {
            Source::Node(node, group) => {
                let answer = carrier.call(node, group, &Request::Cluster, timeout).await;
                self.take_layout(answer)
            }
            Source::Seeds => {
                for seed in &config.seeds {
                    let answer = carrier.call_addr(seed, &Request::Cluster, timeout).await;
                    if self.take_layout(answer) {
                        return true;
                    }
                }
                false
            }
        }
    }

    /// Takes the layout in `answer` if it is this client's cluster (see [`NetClient::relearn`]).
    fn take_layout(&self, answer: Result<Result<Body, Failure>, ClientError>) -> bool {
        let Ok(Ok(Body::Cluster(info))) = answer else {
            return false;
        };
        let mut current = self.inner.info.write().unwrap();
        let same = info.cluster == current.cluster
            && info.groups == self.inner.groups
            && info.shards == self.inner.shards
            && !info.members.is_empty();
        if same {
            *current = Arc::new(info);
        }
        same
    }

    /// Calls made over `carrier`.
    pub(crate) fn via<'a, C: Carrier>(&'a self, carrier: &'a C) -> Via<'a, C> {
        Via {
            client: self,
            carrier,
        }
    }

    /// Commands for one group (all keys must belong to it), applied in order.
    pub async fn submit(
        &self,
        group: u64,
        commands: Vec<Command>,
    ) -> Result<Vec<CommandResult>, ClientError> {
        self.via(self).submit(group, commands).await
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        self.via(self).put(key, value).await
    }

    /// `false` if the key was absent.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, ClientError> {
        self.via(self).delete(key).await
    }

    /// Writes `new` (`None` deletes) if the value is `expected`; else `Err(current value)`.
    pub async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<Result<(), Option<Vec<u8>>>, ClientError> {
        self.via(self).compare_and_swap(key, expected, new).await
    }

    /// Reads a key: `Linearizable` from the leader (ReadIndex), `Local` from whichever replica
    /// is asked (possibly stale).
    pub async fn get(&self, key: &[u8], consistency: Consistency) -> Result<Option<Vec<u8>>, ClientError> {
        self.via(self).get_at(None, key, consistency).await
    }

    /// Reads a key from one particular node (`Local`: that replica's applied state).
    pub async fn get_from(
        &self,
        node: u64,
        key: &[u8],
        consistency: Consistency,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        self.via(self).get_at(Some(node), key, consistency).await
    }

    /// Hands leadership of `group` to node `to` (`None`: the most up-to-date follower); returns
    /// once it moved. An admin operation (docs/client-protocol.md, `TRANSFER`).
    pub async fn transfer_leader(&self, group: u64, to: Option<u64>) -> Result<(), ClientError> {
        let request = Request::Transfer {
            group,
            to: to.unwrap_or(0),
        };
        self.route(self, group, request, true, true, None).await?;
        // Leadership moved: forget the cached leader.
        self.inner.leaders.set(group, None);
        Ok(())
    }

    /// Changes the membership of `group` (joint consensus when several voters change); returns
    /// once the change is applied. An admin operation (docs/client-protocol.md, `MEMBER`).
    pub async fn change_membership(&self, group: u64, changes: Vec<MemberChange>) -> Result<(), ClientError> {
        let request = Request::Member { group, changes };
        self.route(self, group, request, true, true, None).await?;
        Ok(())
    }

    pub fn change_membership_blocking(
        &self,
        group: u64,
        changes: Vec<MemberChange>,
    ) -> Result<(), ClientError> {
        futures_lite::future::block_on(self.change_membership(group, changes))
    }

    /// Blocking variants, for plain threads.
    pub fn put_blocking(&self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        futures_lite::future::block_on(self.put(key, value))
    }

    pub fn delete_blocking(&self, key: &[u8]) -> Result<bool, ClientError> {
        futures_lite::future::block_on(self.delete(key))
    }

    pub fn compare_and_swap_blocking(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<Result<(), Option<Vec<u8>>>, ClientError> {
        futures_lite::future::block_on(self.compare_and_swap(key, expected, new))
    }

    pub fn get_blocking(&self, key: &[u8], consistency: Consistency) -> Result<Option<Vec<u8>>, ClientError> {
        futures_lite::future::block_on(self.get(key, consistency))
    }

    pub fn transfer_leader_blocking(&self, group: u64, to: Option<u64>) -> Result<(), ClientError> {
        futures_lite::future::block_on(self.transfer_leader(group, to))
    }

    pub fn get_from_blocking(
        &self,
        node: u64,
        key: &[u8],
        consistency: Consistency,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        futures_lite::future::block_on(self.get_from(node, key, consistency))
    }

    pub fn submit_blocking(
        &self,
        group: u64,
        commands: Vec<Command>,
    ) -> Result<Vec<CommandResult>, ClientError> {
        futures_lite::future::block_on(self.submit(group, commands))
    }
}

/// What carries one request to the shard of a node serving a group and brings its answer back:
/// a [`NetClient`]'s own connections (threads), or an executor's glommio connections
/// ([`crate::executor_client::ExecutorClient`]). Routing, redirects and retries above it are the
/// same for both.
pub(crate) trait Carrier {
    /// Calls the shard of `node` that serves `group`.
    fn call(
        &self,
        node: u64,
        group: u64,
        request: &Request,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<Result<Body, Failure>, ClientError>>;

    /// Calls `addr` (`host:port`) once, over a connection of its own closed afterwards: for
    /// seeds, which name no node.
    fn call_addr(
        &self,
        addr: &str,
        request: &Request,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<Result<Body, Failure>, ClientError>>;
}

/// Where [`NetClient::relearn`] asks.
enum Source {
    /// The shard of a node serving a group.
    Node(u64, u64),
    /// Each seed address in turn, until one answers for this client's cluster.
    Seeds,
}

impl Carrier for NetClient {
    async fn call(
        &self,
        node: u64,
        group: u64,
        request: &Request,
        timeout: Duration,
    ) -> Result<Result<Body, Failure>, ClientError> {
        self.conn(node, group)?.call(request, timeout).await
    }

    async fn call_addr(
        &self,
        addr: &str,
        request: &Request,
        timeout: Duration,
    ) -> Result<Result<Body, Failure>, ClientError> {
        Conn::open(addr, &self.inner.config)?.call(request, timeout).await
    }
}

/// A client's calls over one carrier.
pub(crate) struct Via<'a, C> {
    client: &'a NetClient,
    carrier: &'a C,
}

impl<C: Carrier> Via<'_, C> {
    /// Commands for one group (all keys must belong to it), applied in order.
    pub(crate) async fn submit(
        &self,
        group: u64,
        commands: Vec<Command>,
    ) -> Result<Vec<CommandResult>, ClientError> {
        match self
            .client
            .route(
                self.carrier,
                group,
                Request::Submit { group, commands },
                true,
                false,
                None,
            )
            .await?
        {
            Body::Results(results) => Ok(results),
            other => Err(ClientError::Protocol(format!("unexpected answer {other:?}"))),
        }
    }

    async fn one(&self, command: Command) -> Result<CommandResult, ClientError> {
        let group = self.client.group_of(command.key());
        let results = self.submit(group, vec![command]).await?;
        <[CommandResult; 1]>::try_from(results)
            .map(|[r]| r)
            .map_err(|r| ClientError::Protocol(format!("expected one result, got {}", r.len())))
    }

    pub(crate) async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), ClientError> {
        match self
            .one(Command::Put {
                key: key.to_vec(),
                value: value.to_vec(),
            })
            .await?
        {
            CommandResult::Ok => Ok(()),
            other => Err(ClientError::Protocol(format!("unexpected put result {other:?}"))),
        }
    }

    /// `false` if the key was absent.
    pub(crate) async fn delete(&self, key: &[u8]) -> Result<bool, ClientError> {
        match self.one(Command::Delete { key: key.to_vec() }).await? {
            CommandResult::Ok => Ok(true),
            CommandResult::NotFound => Ok(false),
            other => Err(ClientError::Protocol(format!(
                "unexpected delete result {other:?}"
            ))),
        }
    }

    /// Writes `new` (`None` deletes) if the value is `expected`; else `Err(current value)`.
    pub(crate) async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<Result<(), Option<Vec<u8>>>, ClientError> {
        let command = Command::CompareAndSwap {
            key: key.to_vec(),
            expected: expected.map(<[u8]>::to_vec),
            new: new.map(<[u8]>::to_vec),
        };
        match self.one(command).await? {
            CommandResult::Ok => Ok(Ok(())),
            CommandResult::CasMismatch { current } => Ok(Err(current)),
            other => Err(ClientError::Protocol(format!("unexpected CAS result {other:?}"))),
        }
    }

    pub(crate) async fn get_at(
        &self,
        node: Option<u64>,
        key: &[u8],
        consistency: Consistency,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let group = self.client.group_of(key);
        let request = Request::Get {
            group,
            consistency,
            key: key.to_vec(),
        };
        let to_leader = consistency != Consistency::Local;
        match self
            .client
            .route(self.carrier, group, request, to_leader, true, node)
            .await?
        {
            Body::Results(results) => match results.as_slice() {
                [CommandResult::Value(v)] => Ok(Some(v.clone())),
                [CommandResult::NotFound] => Ok(None),
                other => Err(ClientError::Protocol(format!("unexpected get result {other:?}"))),
            },
            other => Err(ClientError::Protocol(format!("unexpected answer {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ClusterInfo, Member, Response};

    /// A server that answers one connection's first request with `body`.
    fn answering_once(body: Body) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = Blocking(BufReader::new(stream.try_clone().unwrap()));
            let request = futures_lite::future::block_on(frame::read(&mut reader, 1 << 20)).unwrap();
            let (id, _) = protocol::decode_request(request.kind, &request.payload);
            let mut out = Vec::new();
            protocol::encode_response(
                &mut out,
                &Response {
                    id,
                    outcome: Ok(body),
                },
            );
            let mut stream = stream;
            stream.write_all(&out).unwrap();
            // Hold the connection until the client lets go.
            let _ = std::io::Read::read(&mut stream, &mut [0u8; 1]);
        });
        addr
    }

    fn cluster(groups: u64) -> Body {
        Body::Cluster(ClusterInfo {
            cluster: 7,
            groups,
            shards: 1,
            members: vec![Member {
                id: 1,
                host: "127.0.0.1".into(),
                client_port: 1,
                peer_port: 2,
            }],
        })
    }

    /// Reads one frame from `bytes` and says what it means to a client.
    fn answer_of(bytes: &[u8]) -> Result<Response, Option<ClientError>> {
        let mut reader = futures_lite::io::Cursor::new(bytes.to_vec());
        answer_in(futures_lite::future::block_on(frame::read(&mut reader, 1 << 20)))
    }

    #[test]
    fn what_a_frame_from_the_server_means() {
        let mut ok = Vec::new();
        let response = Response {
            id: 9,
            outcome: Ok(Body::Results(vec![CommandResult::Ok])),
        };
        protocol::encode_response(&mut ok, &response);
        assert_eq!(answer_of(&ok), Ok(response));
        // Closed at a frame boundary, or mid-frame: whatever waits is lost.
        assert_eq!(answer_of(&[]), Err(None));
        assert_eq!(answer_of(&ok[..ok.len() - 1]), Err(None));
        let protocol_error = |bytes: &[u8]| match answer_of(bytes) {
            Err(Some(ClientError::Protocol(why))) => why,
            other => panic!("{other:?}"),
        };
        let mut refused = Vec::new();
        protocol::encode_error(&mut refused, "go away");
        assert_eq!(protocol_error(&refused), "server refused the connection: go away");
        let mut other = Vec::new();
        let start = frame::begin(&mut other, 0x7e);
        frame::finish(&mut other, start);
        assert!(protocol_error(&other).contains("unexpected frame kind 0x7e"));
        let mut corrupt = ok.clone();
        corrupt[0] ^= 0xff;
        assert!(protocol_error(&corrupt).contains("bad frame"));
    }

    /// A cluster as the client sees it through a [`Carrier`]: which nodes are up, what each
    /// says the layout is, and who leads; the routing logic's seam, as the simulator's network
    /// is the engine's.
    #[derive(Default)]
    struct Scripted {
        /// Node id → the members its `CLUSTER` answer lists. A node not here is unreachable.
        up: HashMap<u64, Vec<u64>>,
        /// Seed address → the members its `CLUSTER` answer lists. Others are unreachable.
        seeds: HashMap<String, Vec<u64>>,
        /// The node leading every group.
        leader: u64,
        /// Every call, in order: `node N <request>` or `addr A <request>`.
        calls: Mutex<Vec<String>>,
    }

    fn layout(members: &[u64]) -> ClusterInfo {
        ClusterInfo {
            cluster: 7,
            groups: 4,
            shards: 1,
            members: members
                .iter()
                .map(|&id| Member {
                    id,
                    host: "127.0.0.1".into(),
                    client_port: 1,
                    peer_port: 2,
                })
                .collect(),
        }
    }

    impl Scripted {
        fn answer(&self, members: &[u64], me: u64, request: &Request) -> Result<Body, Failure> {
            match request {
                Request::Cluster => Ok(Body::Cluster(layout(members))),
                Request::Get { .. } if me == self.leader => Ok(Body::Results(vec![CommandResult::NotFound])),
                _ if me == self.leader => Ok(Body::Results(vec![CommandResult::Ok])),
                _ => Err(Failure::NotLeader {
                    leader: Some(self.leader),
                    address: None,
                }),
            }
        }

        fn unreachable(addr: String) -> ClientError {
            ClientError::Unreachable {
                addr,
                message: "connection refused".into(),
            }
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Carrier for Scripted {
        async fn call(
            &self,
            node: u64,
            _group: u64,
            request: &Request,
            _timeout: Duration,
        ) -> Result<Result<Body, Failure>, ClientError> {
            let name = match request {
                Request::Cluster => "cluster",
                Request::Get { .. } => "get",
                _ => "put",
            };
            self.calls.lock().unwrap().push(format!("node {node} {name}"));
            match self.up.get(&node) {
                Some(members) => Ok(self.answer(members, node, request)),
                None => Err(Scripted::unreachable(format!("node {node}"))),
            }
        }

        async fn call_addr(
            &self,
            addr: &str,
            request: &Request,
            _timeout: Duration,
        ) -> Result<Result<Body, Failure>, ClientError> {
            self.calls.lock().unwrap().push(format!("addr {addr} cluster"));
            match self.seeds.get(addr) {
                Some(members) => Ok(self.answer(members, 0, request)),
                None => Err(Scripted::unreachable(addr.into())),
            }
        }
    }

    fn scripted_client(seeds: &[&str], members: &[u64]) -> NetClient {
        let mut config = ClientConfig::new(seeds.iter().copied());
        config.backoff_max = Duration::from_millis(2);
        config.relearn_interval_min = Duration::ZERO;
        NetClient::with_layout(config, layout(members))
    }

    fn members_of(client: &NetClient) -> Vec<u64> {
        client.cluster().members.iter().map(|m| m.id).collect()
    }

    /// Puts a key of group 0, whose first guess is the first member the client knows.
    fn put_via(client: &NetClient, carrier: &Scripted) -> Result<(), ClientError> {
        let key = (0..)
            .map(|i| format!("key-{i}").into_bytes())
            .find(|key| client.group_of(key) == 0)
            .unwrap();
        futures_lite::future::block_on(client.via(carrier).put(&key, b"value"))
    }

    #[test]
    fn after_an_unreachable_node_the_client_relearns_the_layout_from_the_next_that_answers() {
        // Node 1 left and node 4 joined; node 3 leads, so no redirect names a node the client
        // does not know. The client knew 1, 2, 3.
        let carrier = Scripted {
            up: HashMap::from([(2, vec![2, 3, 4]), (3, vec![2, 3, 4]), (4, vec![2, 3, 4])]),
            leader: 3,
            ..Scripted::default()
        };
        let client = scripted_client(&[], &[1, 2, 3]);
        put_via(&client, &carrier).unwrap();
        assert_eq!(members_of(&client), vec![2, 3, 4]);
        assert_eq!(client.leader_of(0), Some(3));
        assert_eq!(
            carrier.calls(),
            ["node 1 put", "node 2 put", "node 2 cluster", "node 3 put"]
        );
    }

    #[test]
    fn a_local_read_at_a_node_outside_the_group_follows_the_redirect() {
        // Node 1 holds no copy of the group (it answers `NotLeader`); node 2 leads it.
        let carrier = Scripted {
            up: HashMap::from([(1, vec![1, 2]), (2, vec![1, 2])]),
            leader: 2,
            ..Scripted::default()
        };
        let client = scripted_client(&[], &[1, 2]);
        let key = (0..)
            .map(|i| format!("key-{i}").into_bytes())
            .find(|key| client.group_of(key) == 0)
            .unwrap();
        let read = |node| {
            futures_lite::future::block_on(client.via(&carrier).get_at(node, &key, Consistency::Local))
        };
        assert_eq!(read(None), Ok(None));
        assert_eq!(carrier.calls(), ["node 1 get", "node 2 get"]);
        // Asked of that node only, the redirect is the answer.
        assert!(matches!(
            read(Some(1)),
            Err(ClientError::Server(Failure::NotLeader { leader: Some(2), .. }))
        ));
    }

    #[test]
    fn when_no_known_node_answers_the_client_asks_its_seeds() {
        // The cluster was replaced node by node: neither node 1 nor the first seed answers.
        let carrier = Scripted {
            up: HashMap::from([(5, vec![5, 6]), (6, vec![5, 6])]),
            seeds: HashMap::from([("second:1".to_string(), vec![5, 6])]),
            leader: 6,
            ..Scripted::default()
        };
        let client = scripted_client(&["first:1", "second:1"], &[1]);
        put_via(&client, &carrier).unwrap();
        assert_eq!(members_of(&client), vec![5, 6]);
        assert_eq!(
            carrier.calls(),
            [
                "node 1 put",
                "addr first:1 cluster",
                "addr second:1 cluster",
                "node 5 put",
                "node 6 put"
            ]
        );
    }

    #[test]
    fn a_seed_of_another_cluster_is_not_taken_for_this_one() {
        let carrier = Scripted {
            up: HashMap::from([(9, vec![9])]),
            leader: 9,
            ..Scripted::default()
        };
        let client = scripted_client(&[], &[1]);
        // Same id, other groups: not this cluster.
        let mut other = layout(&[9]);
        other.groups = 8;
        assert!(!client.take_layout(Ok(Ok(Body::Cluster(other)))));
        let mut other = layout(&[9]);
        other.cluster = 8;
        assert!(!client.take_layout(Ok(Ok(Body::Cluster(other)))));
        assert!(!client.take_layout(Ok(Ok(Body::Cluster(layout(&[]))))));
        assert_eq!(members_of(&client), vec![1]);
        // With no seed to ask, the call gives up on the nodes it knows.
        match put_via(&client, &carrier) {
            Err(ClientError::GaveUp { last, .. }) => {
                assert!(matches!(*last, ClientError::Unreachable { .. }), "{last:?}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn relearning_happens_at_most_once_per_interval() {
        let carrier = Scripted {
            up: HashMap::from([(2, vec![2])]),
            leader: 2,
            ..Scripted::default()
        };
        let mut client = scripted_client(&[], &[2]);
        Arc::get_mut(&mut client.inner)
            .unwrap()
            .config
            .relearn_interval_min = Duration::from_secs(3600);
        let relearn = || futures_lite::future::block_on(client.relearn(&carrier, Source::Node(2, 0)));
        assert!(relearn());
        assert!(!relearn());
        assert_eq!(carrier.calls(), ["node 2 cluster"]);
    }

    #[test]
    fn a_cluster_claiming_too_many_groups_is_refused() {
        let config = |addr: &String| ClientConfig::new([addr.clone()]);
        let addr = answering_once(cluster(GROUPS_MAX + 1));
        match fetch_cluster(&addr, &config(&addr)) {
            Err(ClientError::Protocol(why)) => assert!(why.contains("at most"), "{why}"),
            other => panic!("{other:?}"),
        }
        let addr = answering_once(cluster(GROUPS_MAX));
        let client = NetClient::connect(config(&addr)).unwrap();
        assert_eq!(client.cluster().groups, GROUPS_MAX);
        assert_eq!(client.leader_of(GROUPS_MAX - 1), None);
        assert_eq!(client.leader_of(GROUPS_MAX), None);
    }
}
