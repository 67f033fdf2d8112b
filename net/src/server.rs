//! The client port of one shard: `client_port + shard`. Requests for any group are taken (each
//! goes to the shard owning it); clients that route well send each group's requests to its own
//! shard's port and so never cross cores.
//!
//! Per connection: a reader takes frames (length checked before allocating) and hands each
//! submit or get straight to its shard, tagged, with the connection's [`ReplySink`] as the
//! place to answer; the rarer requests (status, membership...) run as tasks of their own. So
//! many requests are in flight (pipelining) and answers go back in completion order, matched by
//! request id. The shard hands over all of one loop's answers for the connection at once; one
//! task per connection turns them into response frames. At most `limits.client_queue_depth`
//! requests are in flight per connection; more are answered `Busy` at once. A request waits at
//! most `limits.request_timeout_ms` for its answer (checked every `SWEEP_INTERVAL`, so up to
//! that much later), then gets `Timeout`. Anything that is not a
//! valid frame or request gets an `ERROR` frame (or a `BadRequest` answer) and the connection is
//! closed; the shard and every other connection carry on.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use bytes::BytesMut;
use futures_lite::io::{BufReader, WriteHalf};
use futures_lite::FutureExt;
use glommio::net::{TcpListener, TcpStream};
use ringraft_engine::{EngineError, NodeHandle, Outcome, ReplySink, Tickets};
use ringraft_sm::Command;
use ringraft_tuning::{Config, NodeAddress};
use tracing::{debug, warn};

use crate::coarse::CoarseInstant;
use crate::frame::{self, FrameError};
use crate::peer::{within, write_queued, ShardState, Signal};
use crate::protocol::{self, Body, ClusterInfo, Failure, Member, Request, Response};

const READ_BUFFER_BYTES: usize = 64 << 10;

/// How often a connection looks for requests past `limits.request_timeout_ms`.
const SWEEP_INTERVAL: Duration = Duration::from_millis(50);

pub(crate) async fn serve(state: Rc<ShardState>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(connection(state.clone(), stream)).detach();
            }
            Err(e) => {
                warn!("accepting a client connection: {e}");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

struct Connection {
    out: RefCell<Vec<u8>>,
    /// Requests taken and not yet answered (through the sink or by their own task).
    in_flight: Cell<usize>,
    reading_done: Cell<bool>,
    /// Wakes the writer.
    signal: Signal,
    /// Where the shards answer this connection's submits and gets.
    sink: ReplySink,
    /// Those requests by tag (their ticket here): the client's request id, the group, when
    /// they time out.
    waiting: RefCell<Tickets<Waiting>>,
    /// Wakes the sweeper: the first request to wait, or the end of reading.
    wake_sweeper: Signal,
    /// Wakes the answering task when the sweeper answered, or at the end of reading.
    wake_answerer: Signal,
}

struct Waiting {
    id: u64,
    group: u64,
    deadline: CoarseInstant,
}

impl Connection {
    fn respond(&self, response: &Response) {
        protocol::encode_response(&mut self.out.borrow_mut(), response);
        self.signal.notify();
    }

    /// Hands a submit or get to its shard. `Err` is the answer to send at once.
    fn dispatch(&self, state: &ShardState, id: u64, request: Request) -> Result<(), Failure> {
        let info = state.info.borrow();
        let group = match &request {
            Request::Submit { group, commands } => {
                check_keys(&info, *group, commands.iter().map(Command::key))?;
                *group
            }
            Request::Get { group, key, .. } => {
                check_keys(&info, *group, [&key[..]])?;
                *group
            }
            other => unreachable!("only submits and gets are dispatched, not {other:?}"),
        };
        // The tag is the request's ticket, so it waits before it is sent.
        let limit = Duration::from_millis(state.config.limits.request_timeout_ms);
        let tag = self.waiting.borrow_mut().insert(Waiting {
            id,
            group,
            deadline: CoarseInstant::now() + limit,
        });
        let sent = match request {
            Request::Submit { group, commands } => state.handle.submit_to(group, commands, &self.sink, tag),
            Request::Get {
                group,
                consistency,
                key,
            } => state.handle.read_to(group, key, consistency, &self.sink, tag),
            other => unreachable!("only submits and gets are dispatched, not {other:?}"),
        };
        if let Err(e) = sent {
            self.waiting.borrow_mut().remove(tag);
            return Err(Failure::from_engine(e, |leader| info.address(leader, group)));
        }
        let waiting = self.waiting.borrow();
        if waiting.len() == 1 {
            // The sweeper waits for this when nothing waited.
            self.wake_sweeper.notify();
        }
        self.in_flight.set(self.in_flight.get() + 1);
        Ok(())
    }
}

/// Turns the shards' answers for one connection into responses. Ends once reading has ended
/// and nothing waits.
async fn answer(state: Rc<ShardState>, conn: Rc<Connection>) {
    loop {
        if conn.reading_done.get() && conn.waiting.borrow().is_empty() {
            return;
        }
        let answers = async { Some(conn.sink.take().await) }
            .or(async {
                conn.wake_answerer.wait().await;
                None
            })
            .await;
        for (tag, outcome) in answers.into_iter().flatten() {
            finish(&state, &conn, tag, outcome);
        }
        conn.signal.notify();
    }
}

/// Answers `Timeout` to requests that waited longer than `limits.request_timeout_ms`, looking
/// every `SWEEP_INTERVAL` while any request waits. Ends once reading has ended and nothing
/// waits.
async fn sweep(state: Rc<ShardState>, conn: Rc<Connection>) {
    let limit = Duration::from_millis(state.config.limits.request_timeout_ms);
    loop {
        if conn.waiting.borrow().is_empty() {
            if conn.reading_done.get() {
                return;
            }
            conn.wake_sweeper.wait().await;
            continue;
        }
        glommio::timer::sleep(SWEEP_INTERVAL).await;
        let now = CoarseInstant::now();
        let expired: Vec<u64> = conn
            .waiting
            .borrow()
            .iter()
            .filter(|(_, w)| w.deadline <= now)
            .map(|(tag, _)| tag)
            .collect();
        if expired.is_empty() {
            continue;
        }
        for tag in expired {
            let message = format!(
                "no answer within {} ms (limits.request_timeout_ms); the request may still take effect",
                limit.as_millis()
            );
            finish(&state, &conn, tag, Err(EngineError::Timeout(message)));
        }
        conn.signal.notify();
        conn.wake_answerer.notify();
    }
}

/// Queues the response to the request under `tag`, if it still waits (one that timed out does
/// not; its late answer is dropped).
fn finish(state: &ShardState, conn: &Connection, tag: u64, outcome: Outcome) {
    let Some(w) = conn.waiting.borrow_mut().remove(tag) else {
        return;
    };
    conn.in_flight.set(conn.in_flight.get() - 1);
    let outcome = outcome
        .map(Body::Results)
        .map_err(|e| Failure::from_engine(e, |leader| state.info.borrow().address(leader, w.group)));
    protocol::encode_response(&mut conn.out.borrow_mut(), &Response { id: w.id, outcome });
}

async fn connection(state: Rc<ShardState>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let from = stream.peer_addr().ok();
    let (reader, writer) = futures_lite::io::split(stream);
    let conn = Rc::new(Connection {
        out: RefCell::new(Vec::new()),
        in_flight: Cell::new(0),
        reading_done: Cell::new(false),
        signal: Signal::default(),
        sink: ReplySink::new(),
        waiting: RefCell::new(Tickets::default()),
        wake_sweeper: Signal::default(),
        wake_answerer: Signal::default(),
    });
    let writing = glommio::spawn_local(write_out(conn.clone(), writer));
    let answering = glommio::spawn_local(answer(state.clone(), conn.clone()));
    let sweeping = glommio::spawn_local(sweep(state.clone(), conn.clone()));
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let depth = state.config.limits.client_queue_depth as usize;
    let mut arena = BytesMut::new();
    loop {
        if state.clients_closed.get() {
            break;
        }
        let frame = match frame::read_in(&mut reader, state.frame_max, &mut arena).await {
            Ok(frame) => frame,
            Err(FrameError::Closed) => break,
            Err(e) => {
                debug!(?from, "client sent a bad frame: {e}");
                protocol::encode_error(&mut conn.out.borrow_mut(), &e.to_string());
                conn.signal.notify();
                break;
            }
        };
        let (id, request) = protocol::decode_request(frame.kind, &frame.payload);
        let request = match request {
            Ok(request) => request,
            Err(e) => {
                debug!(?from, "client sent a bad request: {e}");
                conn.respond(&Response {
                    id,
                    outcome: Err(Failure::BadRequest(e.to_string())),
                });
                break;
            }
        };
        if conn.in_flight.get() >= depth {
            conn.respond(&Response {
                id,
                outcome: Err(Failure::Busy(format!(
                    "{depth} requests in flight on this connection (limits.client_queue_depth)"
                ))),
            });
            continue;
        }
        if matches!(request, Request::Submit { .. } | Request::Get { .. }) {
            if let Err(failure) = conn.dispatch(&state, id, request) {
                conn.respond(&Response {
                    id,
                    outcome: Err(failure),
                });
            }
            continue;
        }
        conn.in_flight.set(conn.in_flight.get() + 1);
        let (state, conn) = (state.clone(), conn.clone());
        glommio::spawn_local(async move {
            let outcome = handle(&state, request).await;
            conn.in_flight.set(conn.in_flight.get() - 1);
            conn.respond(&Response { id, outcome });
        })
        .detach();
    }
    conn.reading_done.set(true);
    conn.wake_sweeper.notify();
    conn.wake_answerer.notify();
    sweeping.await;
    answering.await;
    conn.signal.notify();
    writing.await;
}

/// Writes answers as they come: everything queued since the last write goes in one write.
async fn write_out(conn: Rc<Connection>, writer: WriteHalf<TcpStream>) {
    let finished = || conn.reading_done.get() && conn.in_flight.get() == 0;
    // A failed write ends the connection: the reader sees it broken too.
    let _ = write_queued(&conn.out, &conn.signal, finished, writer).await;
}

/// The cluster's layout as the `CLUSTER` request answers it.
pub(crate) fn cluster_info(config: &Config, handle: &NodeHandle) -> ClusterInfo {
    ClusterInfo {
        cluster: config.cluster.id,
        groups: handle.groups(),
        shards: handle.shards(),
        members: config.cluster.nodes.iter().map(member).collect(),
    }
}

/// A node as the `CLUSTER` answer lists it.
pub(crate) fn member(node: &NodeAddress) -> Member {
    Member {
        id: node.id,
        host: node.host.to_string(),
        client_port: node.client_port,
        peer_port: node.peer_port,
    }
}

fn check_keys<'a>(
    info: &ClusterInfo,
    group: u64,
    keys: impl IntoIterator<Item = &'a [u8]>,
) -> Result<(), Failure> {
    if group >= info.groups {
        return Err(Failure::UnknownGroup(format!(
            "group {group}; the cluster has {} groups",
            info.groups
        )));
    }
    for key in keys {
        let belongs = info.group_of(key);
        if belongs != group {
            return Err(Failure::BadRequest(format!(
                "a key belongs to group {belongs}, not {group} (group = crc32c(key) % {})",
                info.groups
            )));
        }
    }
    Ok(())
}

async fn handle(state: &ShardState, request: Request) -> Result<Body, Failure> {
    // A clone: a borrow held across the awaits below would panic when nodes are added.
    let info = state.info.borrow().clone();
    let info = &*info;
    let (group, pending) = match request {
        Request::Cluster => return Ok(Body::Cluster(info.clone())),
        Request::Status => return Ok(Body::Status(state.handle.status().await)),
        Request::Stats => return Ok(Body::Stats(state.handle.stats().await)),
        Request::GroupMetrics => {
            let metrics = state.handle.metrics().await;
            return Ok(Body::GroupMetrics(metrics.groups().cloned().collect()));
        }
        Request::GroupMetricsV2 => {
            let metrics = state.handle.metrics().await;
            return Ok(Body::GroupMetricsV2(metrics.groups().cloned().collect()));
        }
        Request::Transfer { group, to } => {
            check_keys(info, group, [])?;
            (
                group,
                state.handle.transfer_leader(group, (to != 0).then_some(to)),
            )
        }
        Request::Member { group, changes } => {
            check_keys(info, group, [])?;
            (group, state.handle.change_membership(group, changes))
        }
        Request::Submit { .. } | Request::Get { .. } => {
            unreachable!("the reader hands submits and gets to their shard itself")
        }
    };
    let to_failure = |e: EngineError| Failure::from_engine(e, |leader| info.address(leader, group));
    let pending = pending.map_err(to_failure)?;
    let limit = Duration::from_millis(state.config.limits.request_timeout_ms);
    match within(limit, pending.result()).await {
        Some(Ok(results)) => Ok(Body::Results(results)),
        Some(Err(e)) => Err(to_failure(e)),
        None => Err(Failure::Timeout(format!(
            "no answer within {} ms (limits.request_timeout_ms); the request may still take effect",
            limit.as_millis()
        ))),
    }
}
