//! The embedded client: a `Send + Sync + Clone` handle usable from any thread or async runtime.
//! It routes a key to its group (`crc32c(key) % groups`), the group to its shard
//! (`group % shards`, the same on every node), follows `NotLeader` to the leader, and returns
//! every other answer as it is (`Busy` at once; the caller decides when to retry).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ringraft_sm::{Command, CommandResult};

use crate::core::{Consistency, EngineError};
use crate::reply::Reply;
use crate::runtime::{Refused, ShardInput, ShardQueue};

/// Where each node's shards take requests.
#[derive(Clone)]
pub(crate) struct Route {
    pub(crate) nodes: BTreeMap<u64, Vec<ShardQueue>>,
    pub(crate) groups: u64,
}

struct Inner {
    route: Route,
    leaders: LeaderCache,
}

/// Each group's leader as a client last saw it: a hint read and written by every request from
/// any thread, so an atomic per group (requests to different groups never contend), written
/// only when it changes. Shared by the embedded and the network clients.
#[derive(Debug)]
pub struct LeaderCache(Box<[AtomicU64]>);

impl LeaderCache {
    /// Nothing known yet for any of `groups` groups.
    pub fn new(groups: u64) -> LeaderCache {
        // 0 stands for unknown: node ids are positive.
        LeaderCache((0..groups).map(|_| AtomicU64::new(0)).collect())
    }

    /// The leader last seen for `group`, if any (none for a group beyond the count).
    pub fn get(&self, group: u64) -> Option<u64> {
        let leader = self.0.get(group as usize)?.load(Ordering::Relaxed);
        (leader != 0).then_some(leader)
    }

    /// Remembers `leader` for `group` (`None`: forgets it).
    pub fn set(&self, group: u64, leader: Option<u64>) {
        let leader = leader.unwrap_or(0);
        if let Some(known) = self.0.get(group as usize) {
            if known.load(Ordering::Relaxed) != leader {
                known.store(leader, Ordering::Relaxed);
            }
        }
    }
}

/// One call's walk over the nodes: the group's known leader first, each node at most once,
/// following `NotLeader` to the leader it names. Shared by [`Client`] and [`crate::Session`],
/// which differ only in how one attempt waits for its answer.
pub(crate) struct Redirects {
    group: u64,
    to_leader: bool,
    tried: Vec<u64>,
    next: Vec<u64>,
}

impl Redirects {
    /// The next node to ask, or `None` when every candidate was tried.
    pub(crate) fn next_node(&mut self) -> Option<u64> {
        while !self.next.is_empty() {
            let node = self.next.remove(0);
            if !self.tried.contains(&node) {
                self.tried.push(node);
                return Some(node);
            }
        }
        None
    }

    /// What `node` answered: `Some` to return it to the caller, `None` to ask the next node
    /// (a redirect; the leader it names goes first).
    pub(crate) fn settle(
        &mut self,
        client: &Client,
        node: u64,
        result: Result<Vec<CommandResult>, EngineError>,
    ) -> Option<Result<Vec<CommandResult>, EngineError>> {
        match result {
            // Also for a local read: a node that is no member of the group names its leader.
            Err(EngineError::NotLeader { leader }) => {
                if let Some(leader) = leader {
                    client.remember_leader(self.group, leader);
                    if !self.tried.contains(&leader) {
                        self.next.insert(0, leader);
                    }
                }
                None
            }
            result => {
                if self.to_leader && result.is_ok() {
                    client.remember_leader(self.group, node);
                }
                Some(result)
            }
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("nodes", &self.inner.route.nodes.len())
            .field("groups", &self.inner.route.groups)
            .finish()
    }
}

/// The group a key belongs to, out of `groups`: crc32c of the key, modulo the group count.
pub fn group_of(key: &[u8], groups: u64) -> u64 {
    crc32c::crc32c(key) as u64 % groups.max(1)
}

impl Client {
    pub(crate) fn new(route: Route) -> Client {
        Client {
            inner: Arc::new(Inner {
                leaders: LeaderCache::new(route.groups),
                route,
            }),
        }
    }

    pub fn groups(&self) -> u64 {
        self.inner.route.groups
    }

    /// The group `key` belongs to.
    pub fn group_of(&self, key: &[u8]) -> u64 {
        group_of(key, self.inner.route.groups)
    }

    pub(crate) fn remember_leader(&self, group: u64, leader: u64) {
        self.inner.leaders.set(group, Some(leader));
    }

    /// The nodes to try for `group`: its known leader first.
    pub(crate) fn candidates(&self, group: u64) -> Vec<u64> {
        let leader = self.inner.leaders.get(group);
        let mut nodes = Vec::with_capacity(self.inner.route.nodes.len());
        nodes.extend(leader);
        nodes.extend(
            self.inner
                .route
                .nodes
                .keys()
                .copied()
                .filter(|&n| Some(n) != leader),
        );
        nodes
    }

    /// The redirect-following state of one call to `group` (see [`Redirects`]).
    pub(crate) fn redirects(&self, group: u64, to_leader: bool) -> Result<Redirects, EngineError> {
        if group >= self.inner.route.groups {
            return Err(EngineError::UnknownGroup(group));
        }
        Ok(Redirects {
            group,
            to_leader,
            tried: Vec::new(),
            next: self.candidates(group),
        })
    }

    /// Where `node` takes requests for `group`: the input of the shard owning it.
    pub(crate) fn shard_input(&self, node: u64, group: u64) -> &ShardQueue {
        let senders = &self.inner.route.nodes[&node];
        &senders[(group % senders.len() as u64) as usize]
    }

    async fn call(
        &self,
        group: u64,
        make: impl Fn(Reply) -> ShardInput,
        to_leader: bool,
    ) -> Result<Vec<CommandResult>, EngineError> {
        let mut redirects = self.redirects(group, to_leader)?;
        while let Some(node) = redirects.next_node() {
            let (tx, rx) = flume::bounded(1);
            match self.shard_input(node, group).try_send(make(Reply::channel(tx))) {
                Ok(()) => {}
                Err(Refused::Full) => return Err(EngineError::Busy("the shard's input queue is full")),
                Err(Refused::Stopped) => continue, // node stopped: try another
            }
            // An error from recv: the shard stopped with the request in hand.
            let result = rx.recv_async().await.unwrap_or(Err(EngineError::UnknownOutcome));
            if let Some(result) = redirects.settle(self, node, result) {
                return result;
            }
        }
        Err(EngineError::NotLeader { leader: None })
    }

    /// Proposes commands to one group (for callers that batch themselves); one result per
    /// command, in order, once they are committed and applied.
    pub async fn submit(
        &self,
        group: u64,
        commands: Vec<Command>,
    ) -> Result<Vec<CommandResult>, EngineError> {
        self.submit_made(group, || commands.clone()).await
    }

    /// [`Client::submit`] of the commands `make` builds (see [`submit_input`]).
    async fn submit_made(
        &self,
        group: u64,
        make: impl Fn() -> Vec<Command>,
    ) -> Result<Vec<CommandResult>, EngineError> {
        self.call(group, submit_input(group, make), true).await
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), EngineError> {
        put_answer(
            self.submit_made(self.group_of(key), || put_commands(key, value))
                .await?,
        )
    }

    /// Deletes `key`; `false` if it was absent.
    pub async fn delete(&self, key: &[u8]) -> Result<bool, EngineError> {
        delete_answer(
            self.submit_made(self.group_of(key), || delete_commands(key))
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
        cas_answer(self.submit_made(self.group_of(key), make).await?)
    }

    pub async fn get(&self, key: &[u8], consistency: Consistency) -> Result<Option<Vec<u8>>, EngineError> {
        let group = self.group_of(key);
        let to_leader = consistency != Consistency::Local;
        let results = self
            .call(
                group,
                |reply| ShardInput::Read {
                    group,
                    key: key.to_vec(),
                    consistency,
                    reply,
                },
                to_leader,
            )
            .await?;
        get_answer(results)
    }

    /// Blocking variants, for plain threads.
    pub fn put_blocking(&self, key: &[u8], value: &[u8]) -> Result<(), EngineError> {
        futures_lite::future::block_on(self.put(key, value))
    }

    pub fn delete_blocking(&self, key: &[u8]) -> Result<bool, EngineError> {
        futures_lite::future::block_on(self.delete(key))
    }

    pub fn compare_and_swap_blocking(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<Result<(), Option<Vec<u8>>>, EngineError> {
        futures_lite::future::block_on(self.compare_and_swap(key, expected, new))
    }

    pub fn get_blocking(&self, key: &[u8], consistency: Consistency) -> Result<Option<Vec<u8>>, EngineError> {
        futures_lite::future::block_on(self.get(key, consistency))
    }

    pub fn submit_blocking(
        &self,
        group: u64,
        commands: Vec<Command>,
    ) -> Result<Vec<CommandResult>, EngineError> {
        futures_lite::future::block_on(self.submit(group, commands))
    }
}

/// One attempt's input submitting what `make` builds to `group`: the commands are built for
/// each attempt, as the shard takes them and a redirect needs them again.
pub(crate) fn submit_input(group: u64, make: impl Fn() -> Vec<Command>) -> impl Fn(Reply) -> ShardInput {
    move |reply| ShardInput::Submit {
        group,
        commands: make(),
        reply,
    }
}

pub(crate) fn put_commands(key: &[u8], value: &[u8]) -> Vec<Command> {
    vec![Command::Put {
        key: key.to_vec(),
        value: value.to_vec(),
    }]
}

pub(crate) fn put_answer(results: Vec<CommandResult>) -> Result<(), EngineError> {
    expect_one(results, |r| match r {
        CommandResult::Ok => Ok(()),
        other => Err(other),
    })
}

pub(crate) fn delete_commands(key: &[u8]) -> Vec<Command> {
    vec![Command::Delete { key: key.to_vec() }]
}

pub(crate) fn delete_answer(results: Vec<CommandResult>) -> Result<bool, EngineError> {
    expect_one(results, |r| match r {
        CommandResult::Ok => Ok(true),
        CommandResult::NotFound => Ok(false),
        other => Err(other),
    })
}

pub(crate) fn cas_commands(key: &[u8], expected: Option<&[u8]>, new: Option<&[u8]>) -> Vec<Command> {
    vec![Command::CompareAndSwap {
        key: key.to_vec(),
        expected: expected.map(<[u8]>::to_vec),
        new: new.map(<[u8]>::to_vec),
    }]
}

pub(crate) fn cas_answer(results: Vec<CommandResult>) -> Result<Result<(), Option<Vec<u8>>>, EngineError> {
    expect_one(results, |r| match r {
        CommandResult::Ok => Ok(Ok(())),
        CommandResult::CasMismatch { current } => Ok(Err(current)),
        other => Err(other),
    })
}

pub(crate) fn get_answer(results: Vec<CommandResult>) -> Result<Option<Vec<u8>>, EngineError> {
    expect_one(results, |r| match r {
        CommandResult::Value(value) => Ok(Some(value)),
        CommandResult::NotFound => Ok(None),
        other => Err(other),
    })
}

/// The one result of a one-command request, as `pick` reads it; `pick` hands back a result it
/// does not expect, shown in the error (formatted only then: this runs for every request).
fn expect_one<T>(
    results: Vec<CommandResult>,
    pick: impl FnOnce(CommandResult) -> Result<T, CommandResult>,
) -> Result<T, EngineError> {
    let [result] = <[CommandResult; 1]>::try_from(results)
        .map_err(|r| EngineError::BadRequest(format!("expected one result, got {}", r.len())))?;
    pick(result).map_err(|unexpected| EngineError::BadRequest(format!("unexpected result {unexpected:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Client` works from any runtime, multi-threaded ones included: its futures are `Send`.
    #[test]
    fn client_futures_are_send() {
        fn send<T: Send>(_: &T) {}
        let client = Client::new(Route {
            nodes: BTreeMap::new(),
            groups: 1,
        });
        send(&client.put(b"k", b"v"));
        send(&client.get(b"k", Consistency::Linearizable));
        send(&client.compare_and_swap(b"k", None, Some(b"v")));
        send(&client.delete(b"k"));
        // No node: nothing to ask.
        let outcome = futures_lite::future::block_on(client.put(b"k", b"v"));
        assert_eq!(outcome, Err(EngineError::NotLeader { leader: None }));
    }

    #[test]
    fn reads_of_any_consistency_follow_a_redirect() {
        let client = Client::new(Route {
            nodes: BTreeMap::new(),
            groups: 1,
        });
        // A local read at a node that is no member of the group is redirected to its leader,
        // as a write or linearizable read at a follower is.
        for to_leader in [false, true] {
            let mut redirects = client.redirects(0, to_leader).unwrap();
            let redirected = redirects.settle(&client, 1, Err(EngineError::NotLeader { leader: Some(3) }));
            assert_eq!(redirected, None);
            assert_eq!(redirects.next_node(), Some(3));
            assert_eq!(client.inner.leaders.get(0), Some(3));
            let served = redirects.settle(&client, 3, Ok(vec![CommandResult::NotFound]));
            assert_eq!(served, Some(Ok(vec![CommandResult::NotFound])));
        }
    }

    #[test]
    fn the_leader_cache_remembers_and_forgets_per_group() {
        let leaders = LeaderCache::new(3);
        assert_eq!(leaders.get(1), None);
        leaders.set(1, Some(7));
        assert_eq!(
            (leaders.get(0), leaders.get(1), leaders.get(2)),
            (None, Some(7), None)
        );
        leaders.set(1, None);
        assert_eq!(leaders.get(1), None);
        // A group beyond the count is never known, and remembering it changes nothing.
        leaders.set(3, Some(1));
        assert_eq!(leaders.get(3), None);
    }

    #[test]
    fn answers_read_their_one_result_and_name_an_unexpected_one() {
        assert_eq!(put_answer(vec![CommandResult::Ok]), Ok(()));
        assert_eq!(delete_answer(vec![CommandResult::NotFound]), Ok(false));
        assert_eq!(
            get_answer(vec![CommandResult::Value(b"v".to_vec())]),
            Ok(Some(b"v".to_vec()))
        );
        assert_eq!(
            cas_answer(vec![CommandResult::CasMismatch { current: None }]),
            Ok(Err(None))
        );
        fn bad<T: std::fmt::Debug>(outcome: Result<T, EngineError>) -> String {
            match outcome {
                Err(EngineError::BadRequest(why)) => why,
                other => panic!("not a BadRequest: {other:?}"),
            }
        }
        assert_eq!(
            bad(put_answer(vec![CommandResult::NotFound])),
            "unexpected result NotFound"
        );
        assert!(bad(get_answer(vec![CommandResult::Ok])).contains("Ok"));
        assert_eq!(bad(put_answer(vec![])), "expected one result, got 0");
    }
}
