//! The TCP transport: [`TcpTransport`] implements the engine's [`Transport`] seam.
//!
//! Shard `s` of every node listens for peers on `peer_port + s` and for clients on
//! `client_port + s` (`server.rs`). Shard `s` talks only to shard `s` of other nodes, over one
//! connection per pair: the node with the smaller id dials, the other accepts (an authenticated
//! connection from either side is used; a newer one replaces an older one). Replication never
//! crosses cores.
//!
//! Sending: [`ShardLink::send`] queues a message on the peer's bounded queue
//! (`limits.peer_queue_messages`) and returns `false` when the peer is not connected or the
//! queue is full: the shard then tells raft (`report_unreachable`), which resends. After each
//! shard loop, the peer's writer task drains its queue into one `RAFT` frame (one write per
//! destination per loop). A slow or dead peer only ever costs its own bounded queue. Snapshot
//! pieces share the queue (in order with the messages) and go out as one `SNAP` frame each.
//!
//! Receiving: a reader task per connection reads frames (length checked against
//! `limits.frame_bytes_max` before allocating), decodes messages with entry data as slices of the
//! frame buffer, drops any whose `from` is not the authenticated peer, and delivers the rest to
//! the shard's bounded inbox.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_lite::io::{BufReader, ReadHalf, WriteHalf};
use futures_lite::{AsyncWriteExt, FutureExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::task::JoinHandle;
use ringraft_engine::{Envelope, Inbound, ShardLink, ShardNet, SnapshotPiece, Transport};
use ringraft_tuning::{Config, NodeAddress};
use tracing::{debug, info, warn};

use crate::frame::{self, kind, FrameError};
use crate::handshake::{HandshakeError, Hello, Local, HELLO_BYTES, PROOF_BYTES};
use crate::raft_wire;
use crate::server;
use crate::snap_wire;

/// How long a handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Reconnect backoff: first delay and cap.
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Read buffer per connection.
const READ_BUFFER_BYTES: usize = 256 << 10;

/// The TCP transport of one node.
#[derive(Clone, Debug)]
pub struct TcpTransport {
    config: Arc<Config>,
}

impl TcpTransport {
    /// A transport for the node `config.node.id` (the config must be valid: `tuning::validate`).
    pub fn new(config: &Config) -> TcpTransport {
        TcpTransport {
            config: Arc::new(config.clone()),
        }
    }
}

/// Binds a listening socket without SO_REUSEPORT (glommio's `bind` sets it, which would let a
/// second instance of a node share the port) but with SO_REUSEADDR (std's default), so a
/// restarted node can listen again at once.
pub(crate) fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let std = StdListener::bind(addr)?;
    std.set_nonblocking(true)?;
    // SAFETY: the descriptor is a bound, listening TCP socket we own; ownership moves over.
    Ok(unsafe { TcpListener::from_raw_fd(std.into_raw_fd()) })
}

impl Transport for TcpTransport {
    fn start_shard(&self, net: ShardNet) -> Result<Box<dyn ShardLink>, String> {
        let config = &self.config;
        let me = config
            .this_node()
            .ok_or_else(|| format!("node {} is not in cluster.nodes", config.node.id))?;
        let host = config.node.listen_host;
        let peer_addr = SocketAddr::new(host, me.peer_port + net.shard as u16);
        let client_addr = SocketAddr::new(host, me.client_port + net.shard as u16);
        let peer_listener =
            listen(peer_addr).map_err(|e| format!("cannot listen for peers on {peer_addr}: {e}"))?;
        let client_listener =
            listen(client_addr).map_err(|e| format!("cannot listen for clients on {client_addr}: {e}"))?;
        let peers = config
            .cluster
            .nodes
            .iter()
            .filter(|n| n.id != config.node.id)
            .map(|n| {
                let addr = SocketAddr::new(n.host, n.peer_port + net.shard as u16);
                (n.id, Rc::new(Peer::new(n.id, addr)))
            })
            .collect();
        let state = Rc::new(ShardState {
            local: RefCell::new(Local {
                cluster: config.cluster.id,
                node: config.node.id,
                shard: net.shard,
                members: config.cluster.nodes.iter().map(|n| n.id).collect(),
                key: config.cluster.key.clone().unwrap_or_default().into_bytes(),
            }),
            shard: net.shard,
            config: config.clone(),
            info: RefCell::new(Rc::new(server::cluster_info(config, &net.handle))),
            peers: RefCell::new(peers),
            inbound: net.inbound,
            handle: net.handle,
            clients_closed: Cell::new(false),
            queue_max: config.limits.peer_queue_messages as usize,
            frame_max: config.limits.frame_bytes_max,
        });
        info!(node = config.node.id, shard = net.shard, %peer_addr, %client_addr, "listening");
        let clients = glommio::spawn_local(server::serve(state.clone(), client_listener)).detach();
        let accepting = glommio::spawn_local(accept_peers(state.clone(), peer_listener)).detach();
        let mut dialing = BTreeMap::new();
        for peer in state.peers.borrow().values() {
            if let Some(task) = dial_if_mine(&state, peer) {
                dialing.insert(peer.id, task);
            }
        }
        Ok(Box::new(TcpLink {
            state,
            clients: Some(clients),
            _accepting: accepting,
            dialing,
        }))
    }
}

/// Of two peers, the one with the lower id dials (one connection per pair); `None` when
/// `peer` dials this node.
fn dial_if_mine(state: &Rc<ShardState>, peer: &Rc<Peer>) -> Option<JoinHandle<()>> {
    (peer.id > state.local.borrow().node)
        .then(|| glommio::spawn_local(dial(state.clone(), peer.clone())).detach())
}

/// What a shard's network tasks share.
pub(crate) struct ShardState {
    /// The handshake's side; its members grow when nodes are added (`ShardLink::add_nodes`).
    pub(crate) local: RefCell<Local>,
    pub(crate) shard: u64,
    /// The node's config at start (the address book in it is not kept up to date: `peers`,
    /// `local` and `info` are).
    pub(crate) config: Arc<Config>,
    /// The `CLUSTER` answer, replaced when nodes are added. Callers clone the `Rc` rather than
    /// hold the borrow across an await.
    pub(crate) info: RefCell<Rc<crate::protocol::ClusterInfo>>,
    peers: RefCell<BTreeMap<u64, Rc<Peer>>>,
    inbound: Inbound,
    pub(crate) handle: ringraft_engine::NodeHandle,
    /// The node is shutting down: no new client connections or requests.
    pub(crate) clients_closed: Cell<bool>,
    queue_max: usize,
    pub(crate) frame_max: u64,
}

impl ShardState {
    fn peer(&self, node: u64) -> Option<Rc<Peer>> {
        self.peers.borrow().get(&node).cloned()
    }

    /// Replaces the `CLUSTER` answer with `change` applied to a copy (requests being answered
    /// keep the `Rc` they cloned).
    fn change_info(&self, change: impl FnOnce(&mut crate::protocol::ClusterInfo)) {
        let mut info = (**self.info.borrow()).clone();
        change(&mut info);
        *self.info.borrow_mut() = Rc::new(info);
    }
}

/// Wakes every task waiting on it.
#[derive(Default)]
pub(crate) struct Signal {
    set: Cell<bool>,
    wakers: RefCell<Vec<Waker>>,
}

impl Signal {
    pub(crate) fn notify(&self) {
        self.set.set(true);
        for waker in self.wakers.borrow_mut().drain(..) {
            waker.wake();
        }
    }

    /// Resolves at the next `notify` (or at once if one came since the last wait).
    pub(crate) fn wait(&self) -> Wait<'_> {
        Wait(self)
    }
}

/// Writes what is queued in `out` as it comes, everything queued since the last write in one
/// write, woken by `signal`, until `finished()` holds with nothing queued; then closes
/// `writer`. Err: a write failed (the connection is broken).
pub(crate) async fn write_queued<W: futures_lite::AsyncWrite + Unpin>(
    out: &RefCell<Vec<u8>>,
    signal: &Signal,
    finished: impl Fn() -> bool,
    mut writer: W,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        if out.borrow().is_empty() {
            if finished() {
                let _ = writer.close().await;
                return Ok(());
            }
            signal.wait().await;
            continue;
        }
        std::mem::swap(&mut buf, &mut out.borrow_mut());
        writer.write_all(&buf).await?;
        writer.flush().await?;
        buf.clear();
    }
}

pub(crate) struct Wait<'a>(&'a Signal);

impl Future for Wait<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        if self.0.set.replace(false) {
            // Others waiting on the same notify must see it too.
            for waker in self.0.wakers.borrow_mut().drain(..) {
                waker.wake();
            }
            Poll::Ready(())
        } else {
            // A task that polls again (or polls a new wait after dropping one, as a select
            // loop does) is kept once, so the list stays as long as the tasks waiting.
            let mut wakers = self.0.wakers.borrow_mut();
            if !wakers.iter().any(|w| w.will_wake(context.waker())) {
                wakers.push(context.waker().clone());
            }
            Poll::Pending
        }
    }
}

/// What waits in a peer's queue.
enum Outbound {
    Raft(Envelope),
    Piece(SnapshotPiece),
}

/// One peer node, as seen from one shard.
struct Peer {
    id: u64,
    addr: SocketAddr,
    queue: RefCell<VecDeque<Outbound>>,
    connected: Cell<bool>,
    /// Bumped by each new connection; an older connection's tasks stop when they see it.
    generation: Cell<u64>,
    /// Removed from the address book: its connection's tasks stop.
    removed: Cell<bool>,
    signal: Signal,
}

impl Peer {
    fn new(id: u64, addr: SocketAddr) -> Peer {
        Peer {
            id,
            addr,
            queue: RefCell::new(VecDeque::new()),
            connected: Cell::new(false),
            generation: Cell::new(0),
            removed: Cell::new(false),
            signal: Signal::default(),
        }
    }
}

struct TcpLink {
    state: Rc<ShardState>,
    /// The client port's accept loop (cancelled at `close`).
    clients: Option<JoinHandle<()>>,
    /// Peer accept and dial loops: they live as long as the shard, so a draining shard can
    /// still commit what it has in flight. They end with the executor, or (a dial loop) when
    /// its node is removed.
    _accepting: JoinHandle<()>,
    dialing: BTreeMap<u64, JoinHandle<()>>,
}

impl TcpLink {
    fn enqueue(&mut self, to: u64, item: Outbound) -> bool {
        let peers = self.state.peers.borrow();
        let Some(peer) = peers.get(&to) else {
            return false;
        };
        if !peer.connected.get() {
            return false;
        }
        let mut queue = peer.queue.borrow_mut();
        if queue.len() >= self.state.queue_max {
            return false;
        }
        queue.push_back(item);
        true
    }
}

impl ShardLink for TcpLink {
    fn send(&mut self, to: u64, envelope: Envelope) -> bool {
        self.enqueue(to, Outbound::Raft(envelope))
    }

    fn send_piece(&mut self, to: u64, piece: SnapshotPiece) -> bool {
        self.enqueue(to, Outbound::Piece(piece))
    }

    fn flush(&mut self) {
        for peer in self.state.peers.borrow().values() {
            if !peer.queue.borrow().is_empty() {
                peer.signal.notify();
            }
        }
    }

    /// Stops taking client connections and requests. Peer connections stay: in-flight
    /// proposals still need the followers' acknowledgements to be answered.
    fn close(&mut self) {
        self.state.clients_closed.set(true);
        if let Some(task) = self.clients.take() {
            task.cancel();
        }
    }

    /// New peers: the handshake accepts them, this shard dials those with higher ids, and the
    /// `CLUSTER` answer lists them (so clients and `NotLeader` redirects can reach them).
    fn add_nodes(&mut self, nodes: &[NodeAddress]) -> Result<(), String> {
        let state = &self.state;
        let new: Vec<&NodeAddress> = {
            let peers = state.peers.borrow();
            let me = state.local.borrow().node;
            nodes
                .iter()
                .filter(|n| n.id != me && !peers.contains_key(&n.id))
                .collect()
        };
        if new.is_empty() {
            return Ok(());
        }
        for node in &new {
            let addr = SocketAddr::new(node.host, node.peer_port + state.shard as u16);
            let peer = Rc::new(Peer::new(node.id, addr));
            state.peers.borrow_mut().insert(node.id, peer.clone());
            state.local.borrow_mut().members.push(node.id);
            state.change_info(|info| info.members.push(server::member(node)));
            if let Some(task) = dial_if_mine(state, &peer) {
                self.dialing.insert(node.id, task);
            }
            info!(node = node.id, %addr, shard = state.shard, "peer added to the address book");
        }
        Ok(())
    }

    /// Forgets peers: their handshakes are refused from now on, a connection to one ends
    /// (its writer sees `removed`), the dial loop stops, and `CLUSTER` no longer lists it.
    fn remove_nodes(&mut self, nodes: &[u64]) -> Result<(), String> {
        let state = &self.state;
        for &node in nodes {
            let Some(peer) = state.peers.borrow_mut().remove(&node) else {
                continue;
            };
            if let Some(task) = self.dialing.remove(&node) {
                task.cancel();
            }
            peer.removed.set(true);
            peer.connected.set(false);
            peer.queue.borrow_mut().clear();
            peer.signal.notify();
            state.local.borrow_mut().members.retain(|&m| m != node);
            state.change_info(|info| info.members.retain(|m| m.id != node));
            info!(node, shard = state.shard, "peer removed from the address book");
        }
        Ok(())
    }
}

/// Runs `future` unless `limit` passes first.
pub(crate) async fn within<T>(limit: Duration, future: impl Future<Output = T>) -> Option<T> {
    async { Some(future.await) }
        .or(async {
            glommio::timer::sleep(limit).await;
            None
        })
        .await
}

async fn write_frame(stream: &mut TcpStream, frame_kind: u8, payload: &[u8]) -> Result<(), String> {
    let mut out = Vec::with_capacity(frame::HEADER_BYTES + payload.len());
    frame::encode(&mut out, frame_kind, payload);
    stream.write_all(&out).await.map_err(|e| e.to_string())
}

async fn read_frame(stream: &mut TcpStream, expected: u8, max: usize) -> Result<frame::Frame, String> {
    let frame = frame::read(stream, max as u64).await.map_err(|e| e.to_string())?;
    if frame.kind != expected {
        return Err(HandshakeError::UnexpectedFrame(frame.kind).to_string());
    }
    Ok(frame)
}

/// Runs the handshake; returns the authenticated peer's node id.
async fn handshake(stream: &mut TcpStream, local: &Local, dialed: Option<u64>) -> Result<u64, String> {
    let mine = Hello::new(local.cluster, local.node, local.shard);
    let dialing = dialed.is_some();
    let theirs = if dialing {
        write_frame(stream, kind::HELLO, &mine.encode()).await?;
        let frame = read_frame(stream, kind::HELLO, HELLO_BYTES).await?;
        local.check(&frame.payload, dialed).map_err(|e| e.to_string())?
    } else {
        let frame = read_frame(stream, kind::HELLO, HELLO_BYTES).await?;
        let theirs = local.check(&frame.payload, None).map_err(|e| e.to_string())?;
        write_frame(stream, kind::HELLO, &mine.encode()).await?;
        theirs
    };
    let (dialer, acceptor) = if dialing { (mine, theirs) } else { (theirs, mine) };
    write_frame(stream, kind::AUTH, &local.proof(dialing, &dialer, &acceptor)).await?;
    let proof = read_frame(stream, kind::AUTH, PROOF_BYTES).await?;
    local
        .verify(dialing, &dialer, &acceptor, &proof.payload)
        .map_err(|e| e.to_string())?;
    Ok(theirs.node)
}

async fn dial(state: Rc<ShardState>, peer: Rc<Peer>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        match TcpStream::connect_timeout(peer.addr, Duration::from_secs(1)).await {
            Ok(mut stream) => {
                let _ = stream.set_nodelay(true);
                let local = state.local.borrow().clone();
                match within(HANDSHAKE_TIMEOUT, handshake(&mut stream, &local, Some(peer.id))).await {
                    Some(Ok(_)) => {
                        backoff = BACKOFF_MIN;
                        run_connection(&state, &peer, stream).await;
                    }
                    Some(Err(e)) => warn!(peer = peer.id, addr = %peer.addr, "handshake refused: {e}"),
                    None => warn!(peer = peer.id, addr = %peer.addr, "handshake timed out"),
                }
            }
            Err(e) => debug!(peer = peer.id, addr = %peer.addr, "connect: {e}"),
        }
        glommio::timer::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn accept_peers(state: Rc<ShardState>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(mut stream) => {
                let state = state.clone();
                glommio::spawn_local(async move {
                    let _ = stream.set_nodelay(true);
                    let from = stream.peer_addr().ok();
                    let local = state.local.borrow().clone();
                    match within(HANDSHAKE_TIMEOUT, handshake(&mut stream, &local, None)).await {
                        Some(Ok(node)) => match state.peer(node) {
                            Some(peer) => run_connection(&state, &peer, stream).await,
                            None => warn!(?from, node, "peer is not a cluster member"),
                        },
                        Some(Err(e)) => warn!(?from, "peer handshake refused: {e}"),
                        None => warn!(?from, "peer handshake timed out"),
                    }
                })
                .detach();
            }
            Err(e) => {
                warn!("accepting a peer connection: {e}");
                glommio::timer::sleep(BACKOFF_MIN).await;
            }
        }
    }
}

/// Serves one authenticated connection until it fails, is replaced or the shard closes.
async fn run_connection(state: &Rc<ShardState>, peer: &Rc<Peer>, stream: TcpStream) {
    let generation = peer.generation.get() + 1;
    peer.generation.set(generation);
    // Wake an older connection's writer so it sees it was replaced.
    peer.signal.notify();
    peer.queue.borrow_mut().clear();
    peer.connected.set(true);
    info!(peer = peer.id, addr = %peer.addr, shard = state.shard, "peer connected");
    let (reader, writer) = futures_lite::io::split(stream);
    let end = read_side(state, peer, reader)
        .or(write_side(state, peer, writer, generation))
        .await;
    if peer.generation.get() == generation {
        peer.connected.set(false);
        peer.queue.borrow_mut().clear();
    }
    info!(
        peer = peer.id,
        shard = state.shard,
        "peer connection ended: {end}"
    );
}

async fn read_side(state: &ShardState, peer: &Peer, reader: ReadHalf<TcpStream>) -> String {
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    loop {
        let frame = match frame::read(&mut reader, state.frame_max).await {
            Ok(frame) => frame,
            Err(FrameError::Closed) => return "closed by the peer".into(),
            Err(e) => return format!("read: {e}"),
        };
        if frame.kind == kind::SNAP {
            match snap_wire::decode(&frame.payload) {
                Ok(piece) if piece.from == peer.id => {
                    // A full inbox drops it; the snapshot stream resends.
                    let _ = state.inbound.deliver_piece(piece);
                }
                Ok(piece) => warn!(
                    peer = peer.id,
                    from = piece.from,
                    "dropped a snapshot piece with a forged sender"
                ),
                Err(e) => return format!("bad snapshot frame: {e}"),
            }
            continue;
        }
        if frame.kind != kind::RAFT {
            return format!("unexpected frame kind {:#04x}", frame.kind);
        }
        let envelopes = match raft_wire::decode(&frame.payload) {
            Ok(envelopes) => envelopes,
            Err(e) => return format!("bad raft frame: {e}"),
        };
        for envelope in envelopes {
            if envelope.message.from != peer.id {
                warn!(
                    peer = peer.id,
                    from = envelope.message.from,
                    "dropped a message with a forged sender"
                );
                continue;
            }
            // A full inbox drops the message; raft resends.
            let _ = state.inbound.deliver(envelope);
        }
    }
}

async fn write_side(
    state: &ShardState,
    peer: &Peer,
    mut writer: WriteHalf<TcpStream>,
    generation: u64,
) -> String {
    let max = state.frame_max as usize;
    let mut out: Vec<u8> = Vec::new();
    loop {
        loop {
            if peer.removed.get() {
                return "removed from the address book".into();
            }
            if peer.generation.get() != generation {
                return "replaced by a newer connection".into();
            }
            if !peer.queue.borrow().is_empty() {
                break;
            }
            peer.signal.wait().await;
        }
        out.clear();
        let front_is_piece = matches!(peer.queue.borrow().front(), Some(Outbound::Piece(_)));
        if front_is_piece {
            let Some(Outbound::Piece(piece)) = peer.queue.borrow_mut().pop_front() else {
                unreachable!("checked above");
            };
            let start = frame::begin(&mut out, kind::SNAP);
            snap_wire::put_piece(&mut out, &piece);
            if out.len() - start - frame::HEADER_BYTES > max {
                warn!(
                    peer = peer.id,
                    group = piece.group,
                    "dropped a snapshot piece larger than limits.frame_bytes_max (lower sm.snapshot_chunk_bytes)"
                );
                continue;
            }
            frame::finish(&mut out, start);
            if let Err(e) = writer.write_all(&out).await {
                return format!("write: {e}");
            }
            if let Err(e) = writer.flush().await {
                return format!("write: {e}");
            }
            continue;
        }
        let start = frame::begin(&mut out, kind::RAFT);
        let base = raft_wire::begin(&mut out);
        let mut count = 0u32;
        loop {
            let envelope = {
                let mut queue = peer.queue.borrow_mut();
                if !matches!(queue.front(), Some(Outbound::Raft(_))) {
                    break;
                }
                let Some(Outbound::Raft(envelope)) = queue.pop_front() else {
                    unreachable!("checked above");
                };
                envelope
            };
            let before = out.len();
            raft_wire::put_message(&mut out, base, &envelope);
            if out.len() - start - frame::HEADER_BYTES > max {
                out.truncate(before);
                if count == 0 {
                    warn!(
                        peer = peer.id,
                        group = envelope.group,
                        "dropped a raft message larger than limits.frame_bytes_max"
                    );
                } else {
                    peer.queue.borrow_mut().push_front(Outbound::Raft(envelope));
                    break;
                }
            } else {
                count += 1;
            }
        }
        if count == 0 {
            continue;
        }
        raft_wire::finish(&mut out, base, count);
        frame::finish(&mut out, start);
        if let Err(e) = writer.write_all(&out).await {
            return format!("write: {e}");
        }
        if let Err(e) = writer.flush().await {
            return format!("write: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_keeps_one_waker_per_waiting_task() {
        struct Nothing;
        impl std::task::Wake for Nothing {
            fn wake(self: std::sync::Arc<Self>) {}
        }
        let signal = Signal::default();
        let waker = Waker::from(std::sync::Arc::new(Nothing));
        let mut context = Context::from_waker(&waker);
        // A select loop: a new wait each round, dropped when the other branch wins.
        for _ in 0..1000 {
            let mut wait = signal.wait();
            assert!(Pin::new(&mut wait).poll(&mut context).is_pending());
        }
        assert_eq!(signal.wakers.borrow().len(), 1);
        signal.notify();
        assert!(signal.wakers.borrow().is_empty());
        assert!(Pin::new(&mut signal.wait()).poll(&mut context).is_ready());
    }
}
