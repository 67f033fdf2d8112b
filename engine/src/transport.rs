//! The transport seam: how a shard's raft messages reach the same shard of other nodes, and how
//! a network server hands client requests to the node's shards.
//!
//! A [`Transport`] is created once per node and shared by its shards. Each shard calls
//! [`Transport::start_shard`] on its own executor at start; the transport may spawn its tasks
//! there (listeners, connections) and returns the shard's [`ShardLink`]. The shard loop then
//! calls [`ShardLink::send`] for every outgoing message and [`ShardLink::flush`] once per loop,
//! so a transport can put all of one loop's messages for a destination into one write. Inbound
//! messages go to the shard through [`Inbound::deliver`] (bounded; a full inbox drops, and raft
//! resends).
//!
//! Two implementations: the in-process one here (channels between nodes of one process, used by
//! [`crate::Engine::start_in_process`]) and the TCP one in `ringraft-net`.

use std::collections::BTreeMap;
use std::sync::Arc;

use ringraft_sm::{Command, CommandResult};

use crate::core::{Consistency, EngineError, Envelope};
use crate::reply::{Reply, ReplySink};
use crate::runtime::{GroupStatus, NodeMetrics, NodeStats, Refused, ShardInput, ShardQueue};
use crate::snapshot::SnapshotPiece;

/// Creates each shard's link. Shared by the node's shards (`Send + Sync`).
pub trait Transport: Send + Sync + 'static {
    /// Runs on the shard's executor (glommio tasks may be spawned). An error stops the shard.
    fn start_shard(&self, shard: ShardNet) -> Result<Box<dyn ShardLink>, String>;
}

/// Where one shard's outgoing messages go. Lives on the shard's executor.
pub trait ShardLink {
    /// Queues one message for the same shard of node `to`. `false` when it was dropped (no
    /// connection, queue full): the shard reports the peer unreachable to raft, which resends.
    fn send(&mut self, to: u64, envelope: Envelope) -> bool;
    /// Queues one snapshot piece for the same shard of node `to`, in order with the messages.
    /// `false` when dropped: the snapshot stream resends after a timeout.
    fn send_piece(&mut self, to: u64, piece: SnapshotPiece) -> bool;
    /// Called once per loop after its sends: a transport may write now.
    fn flush(&mut self) {}
    /// The node is shutting down: stop accepting new work.
    fn close(&mut self) {}
    /// Nodes added to the cluster's address book while this shard runs: from now on `send`
    /// reaches them. Nodes already known stay as they are. `Err` (and nothing changed) when
    /// this transport's nodes are fixed at start.
    fn add_nodes(&mut self, nodes: &[ringraft_tuning::NodeAddress]) -> Result<(), String> {
        let _ = nodes;
        Err("this transport's nodes are fixed when it starts".into())
    }
    /// Nodes removed from the address book: connections to them close, and `send` to them
    /// fails from now on. Unknown ids are ignored. `Err` (nothing changed) as for `add_nodes`.
    fn remove_nodes(&mut self, nodes: &[u64]) -> Result<(), String> {
        let _ = nodes;
        Err("this transport's nodes are fixed when it starts".into())
    }
}

/// What a transport gets for one shard.
#[derive(Clone, Debug)]
pub struct ShardNet {
    pub node: u64,
    pub shard: u64,
    /// Delivers inbound raft messages to this shard.
    pub inbound: Inbound,
    /// The node's shards, for client requests.
    pub handle: NodeHandle,
}

/// Delivers raft messages to one shard.
#[derive(Clone)]
pub struct Inbound(pub(crate) ShardQueue);

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound").finish_non_exhaustive()
    }
}

impl Inbound {
    /// `false` when the shard's inbox is full or the shard stopped (the message is dropped).
    pub fn deliver(&self, envelope: Envelope) -> bool {
        self.0.try_send(ShardInput::Peer(Box::new(envelope))).is_ok()
    }

    /// `false` when the shard's inbox is full or the shard stopped (the piece is dropped).
    pub fn deliver_piece(&self, piece: SnapshotPiece) -> bool {
        self.0.try_send(ShardInput::Piece(Box::new(piece))).is_ok()
    }
}

/// A node's own shards, for a server taking client requests: `Send + Sync + Clone`. Unlike
/// [`crate::Client`] it never follows redirects; `NotLeader` goes back to the caller.
#[derive(Clone)]
pub struct NodeHandle {
    pub(crate) node: u64,
    pub(crate) groups: u64,
    pub(crate) shards: Vec<ShardQueue>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHandle")
            .field("node", &self.node)
            .field("groups", &self.groups)
            .field("shards", &self.shards.len())
            .finish()
    }
}

/// A request handed to a shard; its answer arrives through [`Pending::result`].
#[derive(Debug)]
pub struct Pending(flume::Receiver<Result<Vec<CommandResult>, EngineError>>);

impl Pending {
    /// The shard's answer. A shard that stopped with the request in hand answers
    /// `UnknownOutcome` (the request may have been applied).
    pub async fn result(self) -> Result<Vec<CommandResult>, EngineError> {
        self.0
            .recv_async()
            .await
            .unwrap_or(Err(EngineError::UnknownOutcome))
    }
}

impl NodeHandle {
    pub fn node(&self) -> u64 {
        self.node
    }

    pub fn groups(&self) -> u64 {
        self.groups
    }

    pub fn shards(&self) -> u64 {
        self.shards.len() as u64
    }

    fn shard_of(&self, group: u64) -> Result<&ShardQueue, EngineError> {
        if group >= self.groups {
            return Err(EngineError::UnknownGroup(group));
        }
        Ok(&self.shards[(group % self.shards.len() as u64) as usize])
    }

    fn send(&self, group: u64, input: ShardInput) -> Result<(), EngineError> {
        self.shard_of(group)?
            .try_send(input)
            .map_err(|refused| match refused {
                Refused::Full => EngineError::Busy("the shard's input queue is full"),
                Refused::Stopped => EngineError::Failed("the shard has stopped".into()),
            })
    }

    /// Hands commands to the group's shard; `Busy` at once when its input queue is full.
    pub fn submit(&self, group: u64, commands: Vec<Command>) -> Result<Pending, EngineError> {
        let (reply, rx) = flume::bounded(1);
        self.send_submit(group, commands, Reply::channel(reply))?;
        Ok(Pending(rx))
    }

    /// Hands a read to the group's shard.
    pub fn read(&self, group: u64, key: Vec<u8>, consistency: Consistency) -> Result<Pending, EngineError> {
        let (reply, rx) = flume::bounded(1);
        self.send_read(group, key, consistency, Reply::channel(reply))?;
        Ok(Pending(rx))
    }

    /// Like [`NodeHandle::submit`], but the answer goes to `sink` under `tag` (see
    /// [`ReplySink`]: one hand-over per shard loop for all of a caller's requests). The caller
    /// bounds its requests in flight, and with them the sink.
    pub fn submit_to(
        &self,
        group: u64,
        commands: Vec<Command>,
        sink: &ReplySink,
        tag: u64,
    ) -> Result<(), EngineError> {
        let sink = sink.clone();
        self.send_submit(group, commands, Reply::sink(sink, tag))
    }

    /// Like [`NodeHandle::read`], answering to `sink` under `tag`.
    pub fn read_to(
        &self,
        group: u64,
        key: Vec<u8>,
        consistency: Consistency,
        sink: &ReplySink,
        tag: u64,
    ) -> Result<(), EngineError> {
        let sink = sink.clone();
        self.send_read(group, key, consistency, Reply::sink(sink, tag))
    }

    fn send_submit(&self, group: u64, commands: Vec<Command>, reply: Reply) -> Result<(), EngineError> {
        self.send(
            group,
            ShardInput::Submit {
                group,
                commands,
                reply,
            },
        )
    }

    fn send_read(
        &self,
        group: u64,
        key: Vec<u8>,
        consistency: Consistency,
        reply: Reply,
    ) -> Result<(), EngineError> {
        self.send(
            group,
            ShardInput::Read {
                group,
                key,
                consistency,
                reply,
            },
        )
    }

    /// Hands leadership of `group` to node `to` (or the most up-to-date follower). Answers
    /// once this node no longer leads the group (at once if it did not), or `Timeout` after
    /// two election timeouts.
    pub fn transfer_leader(&self, group: u64, to: Option<u64>) -> Result<Pending, EngineError> {
        let (reply, rx) = flume::bounded(1);
        self.send(
            group,
            ShardInput::Transfer {
                group,
                to,
                reply: Reply::channel(reply),
            },
        )?;
        Ok(Pending(rx))
    }

    /// Changes the membership of `group` (ask its leader). Answers once the change is applied;
    /// `Busy` while another change of the group is pending.
    pub fn change_membership(&self, group: u64, changes: Vec<MemberChange>) -> Result<Pending, EngineError> {
        let (reply, rx) = flume::bounded(1);
        self.send(
            group,
            ShardInput::Membership {
                group,
                changes,
                reply: Reply::channel(reply),
            },
        )?;
        Ok(Pending(rx))
    }

    /// Every group's status on this node, by group.
    pub async fn status(&self) -> Vec<GroupStatus> {
        let mut out = Vec::new();
        for shard in &self.shards {
            let (reply, rx) = flume::bounded(1);
            if shard.send_async(ShardInput::Status { reply }).await.is_ok() {
                out.extend(rx.recv_async().await.unwrap_or_default());
            }
        }
        out.sort_by_key(|s| s.group);
        out
    }

    /// Metrics of every shard of this node.
    pub async fn metrics(&self) -> NodeMetrics {
        let mut shards = Vec::new();
        for shard in &self.shards {
            let (reply, rx) = flume::bounded(1);
            if shard.send_async(ShardInput::Metrics { reply }).await.is_ok() {
                if let Ok(metrics) = rx.recv_async().await {
                    shards.push(metrics);
                }
            }
        }
        NodeMetrics {
            node: self.node,
            shards,
        }
    }

    /// Counters summed over this node's shards.
    pub async fn stats(&self) -> NodeStats {
        let mut total = NodeStats::default();
        for shard in &self.shards {
            let (reply, rx) = flume::bounded(1);
            if shard.send_async(ShardInput::Stats { reply }).await.is_ok() {
                total.add(rx.recv_async().await.unwrap_or_default());
            }
        }
        total
    }
}

/// Channels between the nodes of one process.
#[derive(Clone)]
pub(crate) struct InProcess {
    /// node -> one sender per shard.
    pub(crate) shards: Arc<BTreeMap<u64, Vec<ShardQueue>>>,
}

impl Transport for InProcess {
    fn start_shard(&self, shard: ShardNet) -> Result<Box<dyn ShardLink>, String> {
        Ok(Box::new(InProcessLink {
            shard: shard.shard as usize,
            shards: self.shards.clone(),
        }))
    }
}

struct InProcessLink {
    shard: usize,
    shards: Arc<BTreeMap<u64, Vec<ShardQueue>>>,
}

impl ShardLink for InProcessLink {
    fn send(&mut self, to: u64, envelope: Envelope) -> bool {
        match self.shards.get(&to) {
            Some(senders) => senders[self.shard]
                .try_send(ShardInput::Peer(Box::new(envelope)))
                .is_ok(),
            None => false,
        }
    }

    fn send_piece(&mut self, to: u64, piece: SnapshotPiece) -> bool {
        match self.shards.get(&to) {
            Some(senders) => senders[self.shard]
                .try_send(ShardInput::Piece(Box::new(piece)))
                .is_ok(),
            None => false,
        }
    }
}

/// One change of a group's membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberChange {
    /// Add a voter, or promote a learner to voter.
    AddVoter(u64),
    /// Add a learner (receives the log, does not vote): the way to add a node, which then
    /// catches up before it is promoted.
    AddLearner(u64),
    /// Remove a voter or learner.
    Remove(u64),
}

impl MemberChange {
    pub(crate) fn to_single(self) -> raft::eraftpb::ConfChangeSingle {
        use raft::eraftpb::{ConfChangeSingle, ConfChangeType};
        let (change_type, node) = match self {
            MemberChange::AddVoter(n) => (ConfChangeType::AddNode, n),
            MemberChange::AddLearner(n) => (ConfChangeType::AddLearnerNode, n),
            MemberChange::Remove(n) => (ConfChangeType::RemoveNode, n),
        };
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change_type);
        single.node_id = node;
        single
    }
}
