//! The client protocol's messages (frame payloads on the client port). Specified, for clients in
//! any language, in `docs/client-protocol.md`. All integers little-endian; `blob` is a u32
//! length and bytes, `string` a u16 length and UTF-8 bytes, `option<blob>` a u8 flag (0 absent,
//! 1 present) and, if present, a blob.

use ringraft_engine::{Consistency, EngineError, GroupMetrics, GroupStatus, MemberChange, NodeStats};
use ringraft_sm::{Command, CommandResult};

use crate::frame::{self, kind, put_blob, put_string, Cursor, Malformed};

/// A client request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Commands for one group, applied in order as one unit of the group's log.
    Submit { group: u64, commands: Vec<Command> },
    Get {
        group: u64,
        consistency: Consistency,
        key: Vec<u8>,
    },
    /// The cluster's layout: members, client addresses, shards, groups.
    Cluster,
    /// This node's per-group status.
    Status,
    /// This node's counters.
    Stats,
    /// Hand leadership of `group` to node `to` (0: the most up-to-date follower). Sent to the
    /// group's leader; answered once leadership moved.
    Transfer { group: u64, to: u64 },
    /// This node's per-group metrics (lags, queues, counters, membership), in body kind 4:
    /// the fields of `GroupMetrics` up to `busy_answers` and the membership.
    GroupMetrics,
    /// The same in body kind 5, which states its field count: every field of `GroupMetrics`
    /// (`first_index` and `checkpoint_index` too), and room for more without another kind.
    /// Nodes from before it answer `BAD_REQUEST`.
    GroupMetricsV2,
    /// Change the membership of `group` (sent to its leader); answered once applied.
    Member { group: u64, changes: Vec<MemberChange> },
}

/// Error codes of a response.
pub mod code {
    pub const OK: u8 = 0;
    pub const NOT_LEADER: u8 = 1;
    pub const BUSY: u8 = 2;
    pub const TOO_LARGE: u8 = 3;
    pub const UNKNOWN_GROUP: u8 = 4;
    pub const TIMEOUT: u8 = 5;
    pub const UNKNOWN_OUTCOME: u8 = 6;
    pub const BAD_REQUEST: u8 = 7;
    pub const FAILED: u8 = 8;
}

/// One member as the `Cluster` response lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    pub host: String,
    pub client_port: u16,
    pub peer_port: u16,
}

/// The `Cluster` response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterInfo {
    pub cluster: u64,
    pub groups: u64,
    pub shards: u64,
    pub members: Vec<Member>,
}

impl ClusterInfo {
    /// The group a key belongs to: crc32c (Castagnoli) of the key bytes, modulo the group count.
    pub fn group_of(&self, key: &[u8]) -> u64 {
        ringraft_engine::group_of(key, self.groups)
    }

    /// `host:port` of the client port serving `group` on `node`.
    pub fn address(&self, node: u64, group: u64) -> Option<String> {
        let m = self.members.iter().find(|m| m.id == node)?;
        let port = m.client_port as u64 + group % self.shards.max(1);
        Some(format_address(&m.host, port))
    }
}

fn format_address(host: &str, port: u64) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A response body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    Results(Vec<CommandResult>),
    Cluster(ClusterInfo),
    Status(Vec<GroupStatus>),
    Stats(NodeStats),
    GroupMetrics(Vec<GroupMetrics>),
    /// The answer to [`Request::GroupMetricsV2`].
    GroupMetricsV2(Vec<GroupMetrics>),
}

/// A failed request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// `leader` and its client `address` for this group, when known.
    #[error("not the leader (leader: {leader:?} at {address:?})")]
    NotLeader {
        leader: Option<u64>,
        address: Option<String>,
    },
    #[error("busy: {0}")]
    Busy(String),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("unknown group: {0}")]
    UnknownGroup(String),
    /// The server gave up waiting; the request may or may not take effect.
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("outcome unknown: {0}")]
    UnknownOutcome(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("failed: {0}")]
    Failed(String),
}

impl Failure {
    /// The wire form of an engine error; `address` resolves a leader id.
    pub fn from_engine(error: EngineError, address: impl Fn(u64) -> Option<String>) -> Failure {
        match error {
            EngineError::NotLeader { leader } => Failure::NotLeader {
                leader,
                address: leader.and_then(address),
            },
            EngineError::Busy(what) => Failure::Busy(what.to_string()),
            EngineError::TooLarge(m) => Failure::TooLarge(m),
            EngineError::UnknownGroup(g) => Failure::UnknownGroup(format!("group {g}")),
            e @ EngineError::UnknownOutcome => Failure::UnknownOutcome(e.to_string()),
            EngineError::BadRequest(m) => Failure::BadRequest(m),
            EngineError::Timeout(m) => Failure::Timeout(m),
            EngineError::Failed(m) => Failure::Failed(m),
        }
    }

    fn code(&self) -> u8 {
        match self {
            Failure::NotLeader { .. } => code::NOT_LEADER,
            Failure::Busy(_) => code::BUSY,
            Failure::TooLarge(_) => code::TOO_LARGE,
            Failure::UnknownGroup(_) => code::UNKNOWN_GROUP,
            Failure::Timeout(_) => code::TIMEOUT,
            Failure::UnknownOutcome(_) => code::UNKNOWN_OUTCOME,
            Failure::BadRequest(_) => code::BAD_REQUEST,
            Failure::Failed(_) => code::FAILED,
        }
    }
}

/// A response: the request id it answers and its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub id: u64,
    pub outcome: Result<Body, Failure>,
}

/// Fields per group in body kind 4 (fixed, not on the wire).
const GROUP_METRIC_FIELDS_V1: usize = 18;
/// Fields per group in body kind 5 (stated on the wire).
const GROUP_METRIC_FIELDS: usize = 20;

/// The wire order of a group's metrics (docs/client-protocol.md, body kinds 4 and 5: kind 4
/// carries the first 18).
fn group_metric_fields(g: &GroupMetrics) -> [u64; GROUP_METRIC_FIELDS] {
    [
        g.group,
        g.leader.unwrap_or(0),
        g.is_leader as u64,
        g.term,
        g.last_index,
        g.commit,
        g.applied,
        g.commit_lag,
        g.apply_lag,
        g.queued_commands,
        g.queued_bytes,
        g.reads_waiting,
        g.proposals,
        g.commands_proposed,
        g.entries_appended,
        g.bytes_appended,
        g.leader_changes,
        g.busy_answers,
        g.first_index,
        g.checkpoint_index,
    ]
}

/// A group's metrics from its wire fields (missing ones, from a sender that knows fewer, are 0).
fn group_metrics_from(v: &[u64], voters: Vec<u64>, learners: Vec<u64>) -> GroupMetrics {
    let f = |i: usize| v.get(i).copied().unwrap_or(0);
    GroupMetrics {
        group: f(0),
        leader: (f(1) != 0).then_some(f(1)),
        is_leader: f(2) != 0,
        term: f(3),
        last_index: f(4),
        commit: f(5),
        applied: f(6),
        commit_lag: f(7),
        apply_lag: f(8),
        queued_commands: f(9),
        queued_bytes: f(10),
        reads_waiting: f(11),
        proposals: f(12),
        commands_proposed: f(13),
        entries_appended: f(14),
        bytes_appended: f(15),
        leader_changes: f(16),
        busy_answers: f(17),
        voters,
        learners,
        first_index: f(18),
        checkpoint_index: f(19),
    }
}

/// Body kinds 4 (`fields` = 18, not on the wire) and 5 (`fields` = `None`: all of them, their
/// count on the wire); the mirror of `get_group_metrics`.
fn put_group_metrics(out: &mut Vec<u8>, groups: &[GroupMetrics], fields: Option<usize>) {
    out.extend_from_slice(&(groups.len() as u32).to_le_bytes());
    let fields = fields.unwrap_or_else(|| {
        out.extend_from_slice(&(GROUP_METRIC_FIELDS as u16).to_le_bytes());
        GROUP_METRIC_FIELDS
    });
    for g in groups {
        for v in &group_metric_fields(g)[..fields] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for list in [&g.voters, &g.learners] {
            out.extend_from_slice(&(list.len() as u32).to_le_bytes());
            for id in list {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
    }
}

/// Body kinds 4 (`fields` = 18, not on the wire) and 5 (`fields` = `None`: read from it).
fn get_group_metrics(c: &mut Cursor<'_>, fields: Option<usize>) -> Result<Vec<GroupMetrics>, Malformed> {
    let count = c.u32("group count")? as usize;
    let fields = match fields {
        Some(fields) => fields,
        None => c.u16("field count")? as usize,
    };
    // Each group takes at least its fields and two list counts.
    if count > c.remaining() / (8 * fields + 8) {
        return Err(Malformed(format!("{count} groups cannot fit the payload")));
    }
    let mut groups = Vec::with_capacity(count);
    // Sized once a group is known to fit (the count check above bounds `fields` by then).
    let mut v = if count > 0 { vec![0u64; fields] } else { Vec::new() };
    for _ in 0..count {
        for slot in &mut v {
            *slot = c.u64("group metric")?;
        }
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            let n = c.u32("member count")? as usize;
            if n > c.remaining() / 8 {
                return Err(Malformed(format!("{n} members cannot fit the payload")));
            }
            for _ in 0..n {
                list.push(c.u64("member")?);
            }
        }
        let [voters, learners] = lists;
        groups.push(group_metrics_from(&v, voters, learners));
    }
    Ok(groups)
}

fn stats_fields(s: &NodeStats) -> [u64; 6] {
    [
        s.proposals,
        s.commands_proposed,
        s.entries_applied,
        s.busy_answers,
        s.wal_writes,
        s.wal_bytes_written,
    ]
}

fn put_option(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            put_blob(out, v);
        }
    }
}

fn get_option(c: &mut Cursor<'_>, what: &str) -> Result<Option<Vec<u8>>, Malformed> {
    match c.u8(what)? {
        0 => Ok(None),
        1 => Ok(Some(c.blob(what)?.to_vec())),
        other => Err(Malformed(format!("{what}: option flag {other}"))),
    }
}

const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
const OP_CAS: u8 = 3;
const OP_GET: u8 = 4;

const MEMBER_ADD_VOTER: u8 = 1;
const MEMBER_ADD_LEARNER: u8 = 2;
const MEMBER_REMOVE: u8 = 3;

/// Appends a request frame.
pub fn encode_request(out: &mut Vec<u8>, id: u64, request: &Request) {
    let frame_kind = match request {
        Request::Submit { .. } => kind::SUBMIT,
        Request::Get { .. } => kind::GET,
        Request::Cluster => kind::CLUSTER,
        Request::Status => kind::STATUS,
        Request::Stats => kind::STATS,
        Request::Transfer { .. } => kind::TRANSFER,
        Request::GroupMetrics => kind::GROUP_METRICS,
        Request::GroupMetricsV2 => kind::GROUP_METRICS_V2,
        Request::Member { .. } => kind::MEMBER,
    };
    let start = frame::begin(out, frame_kind);
    out.extend_from_slice(&id.to_le_bytes());
    match request {
        Request::Submit { group, commands } => {
            out.extend_from_slice(&group.to_le_bytes());
            out.extend_from_slice(&(commands.len() as u32).to_le_bytes());
            for command in commands {
                match command {
                    Command::Put { key, value } => {
                        out.push(OP_PUT);
                        put_blob(out, key);
                        put_blob(out, value);
                    }
                    Command::Delete { key } => {
                        out.push(OP_DELETE);
                        put_blob(out, key);
                    }
                    Command::CompareAndSwap { key, expected, new } => {
                        out.push(OP_CAS);
                        put_blob(out, key);
                        put_option(out, expected.as_deref());
                        put_option(out, new.as_deref());
                    }
                    Command::Get { key } => {
                        out.push(OP_GET);
                        put_blob(out, key);
                    }
                }
            }
        }
        Request::Get {
            group,
            consistency,
            key,
        } => {
            out.extend_from_slice(&group.to_le_bytes());
            out.push(match consistency {
                Consistency::Linearizable => 0,
                Consistency::Local => 1,
                Consistency::Lease => 2,
            });
            put_blob(out, key);
        }
        Request::Transfer { group, to } => {
            out.extend_from_slice(&group.to_le_bytes());
            out.extend_from_slice(&to.to_le_bytes());
        }
        Request::Member { group, changes } => {
            out.extend_from_slice(&group.to_le_bytes());
            out.extend_from_slice(&(changes.len() as u32).to_le_bytes());
            for change in changes {
                let (op, node) = match change {
                    MemberChange::AddVoter(n) => (MEMBER_ADD_VOTER, n),
                    MemberChange::AddLearner(n) => (MEMBER_ADD_LEARNER, n),
                    MemberChange::Remove(n) => (MEMBER_REMOVE, n),
                };
                out.push(op);
                out.extend_from_slice(&node.to_le_bytes());
            }
        }
        Request::Cluster
        | Request::Status
        | Request::Stats
        | Request::GroupMetrics
        | Request::GroupMetricsV2 => {}
    }
    frame::finish(out, start);
}

/// Decodes a request frame: its id (0 when even that is unreadable) and the request.
pub fn decode_request(frame_kind: u8, payload: &[u8]) -> (u64, Result<Request, Malformed>) {
    let mut c = Cursor::new(payload);
    let id = match c.u64("request id") {
        Ok(id) => id,
        Err(e) => return (0, Err(e)),
    };
    (id, decode_request_body(frame_kind, &mut c))
}

fn decode_request_body(frame_kind: u8, c: &mut Cursor<'_>) -> Result<Request, Malformed> {
    let request = match frame_kind {
        kind::SUBMIT => {
            let group = c.u64("group")?;
            let count = c.u32("command count")? as usize;
            // Every command takes at least 5 bytes: never allocate for a count that cannot fit.
            if count > c.remaining() / 5 {
                return Err(Malformed(format!("{count} commands cannot fit the payload")));
            }
            let mut commands = Vec::with_capacity(count);
            for _ in 0..count {
                let op = c.u8("command op")?;
                let key = c.blob("key")?.to_vec();
                commands.push(match op {
                    OP_PUT => Command::Put {
                        key,
                        value: c.blob("value")?.to_vec(),
                    },
                    OP_DELETE => Command::Delete { key },
                    OP_CAS => Command::CompareAndSwap {
                        key,
                        expected: get_option(c, "expected")?,
                        new: get_option(c, "new")?,
                    },
                    OP_GET => Command::Get { key },
                    other => return Err(Malformed(format!("unknown command op {other}"))),
                });
            }
            Request::Submit { group, commands }
        }
        kind::GET => {
            let group = c.u64("group")?;
            let consistency = match c.u8("consistency")? {
                0 => Consistency::Linearizable,
                1 => Consistency::Local,
                2 => Consistency::Lease,
                other => return Err(Malformed(format!("unknown consistency {other}"))),
            };
            Request::Get {
                group,
                consistency,
                key: c.blob("key")?.to_vec(),
            }
        }
        kind::CLUSTER => Request::Cluster,
        kind::STATUS => Request::Status,
        kind::STATS => Request::Stats,
        kind::GROUP_METRICS => Request::GroupMetrics,
        kind::GROUP_METRICS_V2 => Request::GroupMetricsV2,
        kind::TRANSFER => Request::Transfer {
            group: c.u64("group")?,
            to: c.u64("to")?,
        },
        kind::MEMBER => {
            let group = c.u64("group")?;
            let count = c.u32("change count")? as usize;
            if count > c.remaining() / 9 {
                return Err(Malformed(format!("{count} changes cannot fit the payload")));
            }
            let mut changes = Vec::with_capacity(count);
            for _ in 0..count {
                let op = c.u8("change op")?;
                let node = c.u64("node")?;
                changes.push(match op {
                    MEMBER_ADD_VOTER => MemberChange::AddVoter(node),
                    MEMBER_ADD_LEARNER => MemberChange::AddLearner(node),
                    MEMBER_REMOVE => MemberChange::Remove(node),
                    other => return Err(Malformed(format!("unknown membership change {other}"))),
                });
            }
            Request::Member { group, changes }
        }
        other => return Err(Malformed(format!("unknown request kind {other:#04x}"))),
    };
    c.finish("request")?;
    Ok(request)
}

const RESULT_OK: u8 = 0;
const RESULT_NOT_FOUND: u8 = 1;
const RESULT_CAS_MISMATCH: u8 = 2;
const RESULT_VALUE: u8 = 3;

/// Appends a response frame.
pub fn encode_response(out: &mut Vec<u8>, response: &Response) {
    let start = frame::begin(out, kind::RESPONSE);
    out.extend_from_slice(&response.id.to_le_bytes());
    match &response.outcome {
        Ok(body) => {
            out.push(code::OK);
            match body {
                Body::Results(results) => {
                    out.push(0);
                    out.extend_from_slice(&(results.len() as u32).to_le_bytes());
                    for result in results {
                        match result {
                            CommandResult::Ok => out.push(RESULT_OK),
                            CommandResult::NotFound => out.push(RESULT_NOT_FOUND),
                            CommandResult::CasMismatch { current } => {
                                out.push(RESULT_CAS_MISMATCH);
                                put_option(out, current.as_deref());
                            }
                            CommandResult::Value(v) => {
                                out.push(RESULT_VALUE);
                                put_blob(out, v);
                            }
                        }
                    }
                }
                Body::Cluster(info) => {
                    out.push(1);
                    out.extend_from_slice(&info.cluster.to_le_bytes());
                    out.extend_from_slice(&info.groups.to_le_bytes());
                    out.extend_from_slice(&info.shards.to_le_bytes());
                    out.extend_from_slice(&(info.members.len() as u32).to_le_bytes());
                    for m in &info.members {
                        out.extend_from_slice(&m.id.to_le_bytes());
                        put_string(out, &m.host);
                        out.extend_from_slice(&m.client_port.to_le_bytes());
                        out.extend_from_slice(&m.peer_port.to_le_bytes());
                    }
                }
                Body::GroupMetrics(groups) => {
                    out.push(4);
                    put_group_metrics(out, groups, Some(GROUP_METRIC_FIELDS_V1));
                }
                Body::GroupMetricsV2(groups) => {
                    out.push(5);
                    put_group_metrics(out, groups, None);
                }
                Body::Stats(stats) => {
                    out.push(3);
                    for v in stats_fields(stats) {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
                Body::Status(groups) => {
                    out.push(2);
                    out.extend_from_slice(&(groups.len() as u32).to_le_bytes());
                    for g in groups {
                        for v in [
                            g.node,
                            g.group,
                            g.leader.unwrap_or(0),
                            g.term,
                            g.commit,
                            g.applied,
                        ] {
                            out.extend_from_slice(&v.to_le_bytes());
                        }
                    }
                }
            }
        }
        Err(failure) => {
            out.push(failure.code());
            match failure {
                Failure::NotLeader { leader, address } => {
                    out.extend_from_slice(&leader.unwrap_or(0).to_le_bytes());
                    put_string(out, address.as_deref().unwrap_or(""));
                }
                Failure::Busy(m)
                | Failure::TooLarge(m)
                | Failure::UnknownGroup(m)
                | Failure::Timeout(m)
                | Failure::UnknownOutcome(m)
                | Failure::BadRequest(m)
                | Failure::Failed(m) => put_string(out, m),
            }
        }
    }
    frame::finish(out, start);
}

/// Decodes a response payload.
pub fn decode_response(payload: &[u8]) -> Result<Response, Malformed> {
    let mut c = Cursor::new(payload);
    let id = c.u64("request id")?;
    let code = c.u8("code")?;
    let outcome = match code {
        code::OK => Ok(match c.u8("body kind")? {
            0 => {
                let count = c.u32("result count")? as usize;
                if count > c.remaining() {
                    return Err(Malformed(format!("{count} results cannot fit the payload")));
                }
                let mut results = Vec::with_capacity(count);
                for _ in 0..count {
                    results.push(match c.u8("result tag")? {
                        RESULT_OK => CommandResult::Ok,
                        RESULT_NOT_FOUND => CommandResult::NotFound,
                        RESULT_CAS_MISMATCH => CommandResult::CasMismatch {
                            current: get_option(&mut c, "current")?,
                        },
                        RESULT_VALUE => CommandResult::Value(c.blob("value")?.to_vec()),
                        other => return Err(Malformed(format!("unknown result tag {other}"))),
                    });
                }
                Body::Results(results)
            }
            1 => {
                let cluster = c.u64("cluster id")?;
                let groups = c.u64("groups")?;
                let shards = c.u64("shards")?;
                let count = c.u32("member count")? as usize;
                if count > c.remaining() / 14 {
                    return Err(Malformed(format!("{count} members cannot fit the payload")));
                }
                let mut members = Vec::with_capacity(count);
                for _ in 0..count {
                    members.push(Member {
                        id: c.u64("member id")?,
                        host: c.string("host")?,
                        client_port: c.u16("client port")?,
                        peer_port: c.u16("peer port")?,
                    });
                }
                Body::Cluster(ClusterInfo {
                    cluster,
                    groups,
                    shards,
                    members,
                })
            }
            2 => {
                let count = c.u32("group count")? as usize;
                if count > c.remaining() / 48 {
                    return Err(Malformed(format!("{count} groups cannot fit the payload")));
                }
                let mut groups = Vec::with_capacity(count);
                for _ in 0..count {
                    let node = c.u64("node")?;
                    let group = c.u64("group")?;
                    let leader = c.u64("leader")?;
                    groups.push(GroupStatus {
                        node,
                        group,
                        leader: (leader != 0).then_some(leader),
                        term: c.u64("term")?,
                        commit: c.u64("commit")?,
                        applied: c.u64("applied")?,
                    });
                }
                Body::Status(groups)
            }
            3 => Body::Stats(NodeStats {
                proposals: c.u64("proposals")?,
                commands_proposed: c.u64("commands proposed")?,
                entries_applied: c.u64("entries applied")?,
                busy_answers: c.u64("busy answers")?,
                wal_writes: c.u64("wal writes")?,
                wal_bytes_written: c.u64("wal bytes written")?,
            }),
            4 => Body::GroupMetrics(get_group_metrics(&mut c, Some(GROUP_METRIC_FIELDS_V1))?),
            5 => Body::GroupMetricsV2(get_group_metrics(&mut c, None)?),
            other => return Err(Malformed(format!("unknown body kind {other}"))),
        }),
        code::NOT_LEADER => {
            let leader = c.u64("leader")?;
            let address = c.string("leader address")?;
            Err(Failure::NotLeader {
                leader: (leader != 0).then_some(leader),
                address: (!address.is_empty()).then_some(address),
            })
        }
        code::BUSY => Err(Failure::Busy(c.string("message")?)),
        code::TOO_LARGE => Err(Failure::TooLarge(c.string("message")?)),
        code::UNKNOWN_GROUP => Err(Failure::UnknownGroup(c.string("message")?)),
        code::TIMEOUT => Err(Failure::Timeout(c.string("message")?)),
        code::UNKNOWN_OUTCOME => Err(Failure::UnknownOutcome(c.string("message")?)),
        code::BAD_REQUEST => Err(Failure::BadRequest(c.string("message")?)),
        code::FAILED => Err(Failure::Failed(c.string("message")?)),
        other => return Err(Malformed(format!("unknown response code {other}"))),
    };
    c.finish("response")?;
    Ok(Response { id, outcome })
}

/// Appends an `ERROR` frame: the connection sent something that is not a frame; it is closed
/// after this.
pub fn encode_error(out: &mut Vec<u8>, message: &str) {
    let start = frame::begin(out, kind::ERROR);
    put_string(out, message);
    frame::finish(out, start);
}
