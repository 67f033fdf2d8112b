//! The real runner: a 3-node cluster in one process (glommio executors, O_DIRECT files, channels
//! between nodes), used from plain threads; shut down and started again on the same files.

use std::time::{Duration, Instant};

use ringraft_engine::{Client, Consistency, Engine, EngineError};
use ringraft_tuning::{Config, CpuList, IoMemory};

fn configs(dir: &std::path::Path) -> Vec<Config> {
    (1..=3)
        .map(|id| {
            let mut config = Config::local_cluster(3, id);
            config.node.data_dir = dir.join(format!("node{id}"));
            // Three nodes share this machine's CPUs: no pinning.
            config.shards.pin = false;
            config.shards.cpus = CpuList::List(vec![0]);
            config.shards.groups_per_shard = 2;
            config.wal.segment_bytes = 1 << 20;
            config.wal.batch_bytes_max = 256 << 10;
            config.batching.entry_bytes_max = 128 << 10;
            config.limits.value_bytes_max = 64 << 10;
            // 3 nodes x 1 shard x 3 rings x 512 KiB fits the common 8 MiB memlock limit of a
            // non-root user.
            config.glommio.io_memory_bytes = IoMemory::Bytes(512 << 10);
            config.raft.tick_interval_ms = 10;
            config.raft.election_timeout_ms = 300;
            config.raft.heartbeat_interval_ms = 30;
            config
        })
        .collect()
}

/// Retries while the cluster elects leaders.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<T, EngineError>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f() {
            Ok(value) => return value,
            Err(
                error @ (EngineError::NotLeader { .. } | EngineError::Busy(_) | EngineError::UnknownOutcome),
            ) => {
                assert!(Instant::now() < deadline, "{what}: still {error} after 20 s");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => panic!("{what}: {error}"),
        }
    }
}

/// Puts a key of every group until each answers: every group has elected a leader.
fn wait_for_every_leader(client: &Client) {
    for group in 0..client.groups() {
        let key = (0..)
            .map(|i| format!("warm-{i}"))
            .find(|k| client.group_of(k.as_bytes()) == group)
            .unwrap();
        eventually("a leader per group", || client.put_blocking(key.as_bytes(), b"w"));
    }
}

fn exercise(client: &Client) {
    eventually("first put", || client.put_blocking(b"hello", b"world"));
    assert_eq!(
        eventually("get", || client.get_blocking(b"hello", Consistency::Linearizable)),
        Some(b"world".to_vec())
    );
    assert_eq!(
        eventually("cas", || client.compare_and_swap_blocking(
            b"hello",
            Some(b"world"),
            Some(b"there")
        )),
        Ok(())
    );
    assert_eq!(
        eventually("cas mismatch", || client.compare_and_swap_blocking(
            b"hello",
            Some(b"world"),
            None
        )),
        Err(Some(b"there".to_vec()))
    );
    assert!(eventually("delete", || client.delete_blocking(b"hello")));
    assert!(!eventually("delete absent", || client.delete_blocking(b"hello")));
    // Plain threads, many keys across both groups.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let client = client.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let key = format!("t{t}-k{i}");
                    eventually("put", || client.put_blocking(key.as_bytes(), key.as_bytes()));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let too_big = vec![0u8; 100 << 10];
    assert!(matches!(
        client.put_blocking(b"big", &too_big),
        Err(EngineError::TooLarge(_)) | Err(EngineError::NotLeader { .. })
    ));
}

/// The metrics agree with what `exercise` did: 200+ puts acknowledged across two groups.
fn check_metrics(engines: &[Engine]) {
    let metrics: Vec<_> = engines.iter().map(Engine::metrics).collect();
    let proposed: u64 = metrics
        .iter()
        .flat_map(|m| m.groups())
        .map(|g| g.commands_proposed)
        .sum();
    // put, CAS, CAS mismatch, delete, delete of an absent key, 200 puts (reads use ReadIndex).
    assert!(proposed >= 205, "commands proposed by the leaders: {proposed}");
    let per_entry = metrics
        .iter()
        .map(|m| m.commands_per_entry())
        .fold(0, |n, h| n + h.len());
    let proposals: u64 = metrics.iter().flat_map(|m| m.groups()).map(|g| g.proposals).sum();
    assert_eq!(per_entry, proposals, "one histogram sample per proposed entry");
    for m in &metrics {
        assert_eq!(m.shards.len(), 1);
        let shard = &m.shards[0];
        assert!(
            !shard.sync_latency_us.is_empty(),
            "node {} recorded sync latencies",
            m.node
        );
        // One sample per completed WAL write; one write may still be in flight.
        let (samples, writes) = (shard.sync_latency_us.len(), shard.wal_writes);
        assert!(
            samples == writes || samples + 1 == writes,
            "{samples} sync samples for {writes} WAL writes"
        );
        assert_eq!(shard.groups.len(), 2);
        if shard.groups.iter().any(|g| g.is_leader) {
            assert!(
                !shard.request_latency_us.is_empty(),
                "node {} timed its requests",
                m.node
            );
        }
        for g in &shard.groups {
            assert!(
                g.entries_appended > 0,
                "node {} appended entries of group {}",
                m.node,
                g.group
            );
            assert!(g.leader.is_some() && g.leader_changes >= 1);
            assert_eq!(g.apply_lag, g.commit - g.applied);
            assert_eq!(g.queued_commands, 0, "idle: nothing queued");
        }
    }
    for group in 0..2 {
        let leaders = metrics
            .iter()
            .flat_map(|m| m.groups())
            .filter(|g| g.group == group && g.is_leader)
            .count();
        assert_eq!(leaders, 1, "group {group} has one leader");
    }
}

#[test]
fn in_process_cluster_serves_survives_restart_and_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (engines, client) = Engine::start_in_process(configs(dir.path())).expect("start");
    assert_eq!(client.groups(), 2);
    exercise(&client);
    let status = engines[0].status();
    assert_eq!(status.len(), 2);
    check_metrics(&engines);
    // The in-process transport's nodes are fixed at start: adding one is refused, and the
    // cluster goes on serving.
    let mut fourth = configs(dir.path())[0].cluster.nodes[0].clone();
    fourth.id = 4;
    let refused = engines[0].add_nodes(&[fourth]).unwrap_err();
    assert!(refused.contains("fixed when it starts"), "{refused}");
    // So is removing one, a member of the groups or not one at all.
    for node in [3, 9] {
        let refused = engines[0].remove_nodes(&[node]).unwrap_err();
        assert!(refused.contains("fixed when it starts"), "{refused}");
    }
    client.put_blocking(b"after add_nodes", b"ok").unwrap();
    for engine in engines {
        engine.shutdown().expect("clean shutdown");
    }
    // Same files: every acknowledged write is still there.
    let (engines, client) = Engine::start_in_process(configs(dir.path())).expect("restart");
    // The shutdown checkpointed every group: its metrics say where.
    for m in engines.iter().map(Engine::metrics) {
        for g in m.groups() {
            assert!(g.checkpoint_index > 0 && g.checkpoint_index <= g.applied, "{g:?}");
            assert!(g.first_index >= 1 && g.first_index <= g.last_index + 1, "{g:?}");
        }
    }
    for t in 0..4 {
        for i in 0..50 {
            let key = format!("t{t}-k{i}");
            let value = eventually("read after restart", || {
                client.get_blocking(key.as_bytes(), Consistency::Linearizable)
            });
            assert_eq!(value.as_deref(), Some(key.as_bytes()), "{key}");
        }
    }
    assert_eq!(
        eventually("deleted stays deleted", || client
            .get_blocking(b"hello", Consistency::Linearizable)),
        None
    );
    for engine in engines {
        engine.shutdown().expect("clean shutdown");
    }
}

#[test]
fn a_stopping_leader_hands_leadership_over() {
    let dir = tempfile::tempdir().unwrap();
    let (engines, client) = Engine::start_in_process(configs(dir.path())).expect("start");
    let key = (0u32..)
        .map(|i| format!("k{i}").into_bytes())
        .find(|k| client.group_of(k) == 0)
        .unwrap();
    eventually("put", || client.put_blocking(&key, b"v"));
    let leader_of = |engine: &Engine| engine.status().into_iter().find(|s| s.group == 0).unwrap().leader;
    let leader = leader_of(&engines[0]).expect("group 0 has a leader");
    let mut engines: Vec<Option<Engine>> = engines.into_iter().map(Some).collect();
    let stopping = engines[leader as usize - 1].take().unwrap();
    stopping.shutdown().expect("clean shutdown");
    // At once (no election timeout): one of the others already leads group 0.
    let live: Vec<&Engine> = engines.iter().flatten().collect();
    let new_leader = live
        .iter()
        .find(|e| leader_of(e) == Some(e.status()[0].node))
        .map(|e| e.status()[0].node);
    assert!(
        new_leader.is_some_and(|n| n != leader),
        "no live node leads group 0 right after its leader {leader} stopped: {:?}",
        live.iter().map(|e| leader_of(e)).collect::<Vec<_>>()
    );
    // And the group serves through the embedded client.
    eventually("put after hand-over", || client.put_blocking(&key, b"w"));
    // An operator moves it to the third node on purpose.
    let new_leader = new_leader.unwrap();
    let third = live
        .iter()
        .map(|e| e.status()[0].node)
        .find(|&n| n != new_leader)
        .unwrap();
    let handle = live
        .iter()
        .find(|e| e.status()[0].node == new_leader)
        .unwrap()
        .handle();
    let moved = futures_lite::future::block_on(handle.transfer_leader(0, Some(third)).unwrap().result());
    assert_eq!(moved, Ok(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(10);
    // Every live node must know the new leader: the follower learns it only
    // from the new leader's first append, a moment after `third` has won.
    while !live.iter().all(|e| leader_of(e) == Some(third)) {
        assert!(
            Instant::now() < deadline,
            "the live nodes do not all know node {third} leads group 0"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Asking a follower: it names the leader.
    let follower = live
        .iter()
        .find(|e| e.status()[0].node != third)
        .unwrap()
        .handle();
    let answer = futures_lite::future::block_on(follower.transfer_leader(0, None).unwrap().result());
    assert_eq!(answer, Err(EngineError::NotLeader { leader: Some(third) }));
    for engine in engines.into_iter().flatten() {
        engine.shutdown().expect("clean shutdown");
    }
}

#[test]
fn leaders_spread_evenly_over_the_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let configs: Vec<Config> = configs(dir.path())
        .into_iter()
        .map(|mut config| {
            config.shards.groups_per_shard = 6;
            config.raft.leader_balance_interval_ms = 1500;
            config
        })
        .collect();
    let (engines, client) = Engine::start_in_process(configs).expect("start");
    let leaders = |engines: &[Engine]| -> Vec<Option<u64>> {
        engines[0].status().into_iter().map(|s| s.leader).collect()
    };
    for group in 0..6 {
        let key = (0u32..)
            .map(|i| format!("k{i}").into_bytes())
            .find(|k| client.group_of(k) == group)
            .unwrap();
        eventually("put", || client.put_blocking(&key, b"v"));
    }
    // Skew it on purpose: node 1 takes every group.
    for group in 0..6u64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let leader = leaders(&engines)[group as usize];
            if leader == Some(1) {
                break;
            }
            if let Some(leader) = leader {
                let handle = engines[leader as usize - 1].handle();
                let _ =
                    futures_lite::future::block_on(handle.transfer_leader(group, Some(1)).unwrap().result());
            }
            assert!(Instant::now() < deadline, "group {group} did not move to node 1");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The balancer spreads them: two groups per node.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = leaders(&engines);
        let per_node: Vec<usize> = (1..=3)
            .map(|n| now.iter().filter(|l| **l == Some(n)).count())
            .collect();
        if per_node == [2, 2, 2] {
            break;
        }
        assert!(Instant::now() < deadline, "leaders did not spread: {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for engine in engines {
        engine.shutdown().expect("clean shutdown");
    }
}

/// A session on one glommio executor: many tasks with requests in flight, answers a shard loop at
/// a time; requests beyond `in_flight_max` get `Busy` at once; tasks that stop waiting (a lost
/// race against a timer) leave the others served.
#[test]
fn a_session_serves_many_tasks_of_one_thread() {
    use std::cell::Cell;
    use std::rc::Rc;

    let dir = tempfile::tempdir().unwrap();
    let (engines, client) = Engine::start_in_process(configs(dir.path())).expect("start");
    wait_for_every_leader(&client);
    let tasks = 48;
    let puts = 40;
    let remote = client.clone();
    let (busy, abandoned) = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            // Busy: two requests wait, the third is refused before it is sent. Each put is
            // polled once, in order, with no yield to the executor between, so the first two
            // are sent and hold both slots while the third is tried. Spawned tasks could be
            // preempted between; and even here a loaded machine may deschedule this thread
            // long enough for a first put to be answered before the third is tried. Such a
            // round proves nothing and is run again.
            let small = remote.session(2);
            let mut busy = 0;
            for round in 0.. {
                assert!(
                    round < 50,
                    "never were two puts still waiting when a third was tried"
                );
                let keys: Vec<String> = (0..3).map(|i| format!("small-{round}-{i}")).collect();
                let mut answered_at_once = false;
                let mut waiting = Vec::new();
                for key in &keys {
                    let mut put = Box::pin(small.put(key.as_bytes(), b"v"));
                    match futures_lite::future::poll_once(&mut put).await {
                        None => waiting.push(put),
                        Some(Err(EngineError::Busy(_))) if !answered_at_once => busy += 1,
                        Some(answer) => {
                            answered_at_once = true;
                            assert!(
                                matches!(answer, Ok(()) | Err(EngineError::UnknownOutcome)),
                                "{answer:?}"
                            );
                        }
                    }
                }
                for put in waiting {
                    let answer = put.await;
                    assert!(
                        matches!(answer, Ok(()) | Err(EngineError::UnknownOutcome)),
                        "{answer:?}"
                    );
                }
                if !answered_at_once {
                    break;
                }
            }
            assert_eq!(small.in_flight(), 0);

            let session = Rc::new(remote.session(tasks));
            let abandoned = Rc::new(Cell::new(0));
            let handles: Vec<_> = (0..tasks)
                .map(|t| {
                    let (session, abandoned) = (session.clone(), abandoned.clone());
                    glommio::spawn_local(async move {
                        for i in 0..puts {
                            let key = format!("s{t}-{i}");
                            // Every fifth task gives up on its first put after a moment; the
                            // put may still take effect, so it is retried like any other.
                            if t % 5 == 0 && i == 0 {
                                let put = async { Some(session.put(key.as_bytes(), key.as_bytes()).await) };
                                let gave_up = async {
                                    glommio::timer::sleep(Duration::from_micros(50)).await;
                                    None
                                };
                                if futures_lite::future::or(put, gave_up).await.is_none() {
                                    abandoned.set(abandoned.get() + 1);
                                }
                            }
                            loop {
                                match session.put(key.as_bytes(), key.as_bytes()).await {
                                    Ok(()) => break,
                                    Err(
                                        EngineError::NotLeader { .. }
                                        | EngineError::Busy(_)
                                        | EngineError::UnknownOutcome,
                                    ) => glommio::timer::sleep(Duration::from_millis(5)).await,
                                    Err(e) => panic!("put {key}: {e}"),
                                }
                            }
                        }
                    })
                })
                .collect();
            for handle in handles {
                handle.await;
            }
            assert_eq!(session.in_flight(), 0);
            (busy, abandoned.get())
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(
        busy, 1,
        "the third of three requests in a session of two is refused"
    );
    assert!(abandoned <= tasks.div_ceil(5));
    for t in 0..tasks {
        for i in 0..puts {
            let key = format!("s{t}-{i}");
            let value = eventually("read back", || {
                client.get_blocking(key.as_bytes(), Consistency::Linearizable)
            });
            assert_eq!(value.as_deref(), Some(key.as_bytes()), "{key}");
        }
    }
    for engine in engines {
        engine.shutdown().expect("clean shutdown");
    }
}

/// The task whose waker the session's sink holds gets its answer and ends; the other waiting
/// task must still hear of its own answer (the listener role is handed over).
#[test]
fn a_session_hands_listening_over_when_the_listener_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let (engines, client) = Engine::start_in_process(configs(dir.path())).expect("start");
    eventually("a leader", || client.put_blocking(b"slow", b"0"));
    let remote = client.clone();
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let session = std::rc::Rc::new(remote.session(8));
            for round in 0..20 {
                // The put waits for a commit; the local get, sent after it (so its task becomes
                // the listener), is answered in the shard loop that takes it.
                let slow = {
                    let session = session.clone();
                    glommio::spawn_local(
                        async move { session.put(b"slow", format!("{round}").as_bytes()).await },
                    )
                };
                let fast = {
                    let session = session.clone();
                    glommio::spawn_local(async move { session.get(b"slow", Consistency::Local).await })
                };
                fast.await.expect("a local read");
                let waited = async { Some(slow.await) };
                let stuck = async {
                    glommio::timer::sleep(Duration::from_secs(10)).await;
                    None
                };
                let outcome = futures_lite::future::or(waited, stuck).await;
                let outcome = outcome.expect("the put's answer reached its task");
                assert!(
                    matches!(outcome, Ok(()) | Err(EngineError::UnknownOutcome)),
                    "{outcome:?}"
                );
                assert_eq!(session.in_flight(), 0);
            }
        })
        .unwrap()
        .join()
        .unwrap();
    for engine in engines {
        engine.shutdown().expect("clean shutdown");
    }
}

/// A shard whose WAL fails (here its directory vanishes, so the next segment cannot be made)
/// cannot go on. Every request must still be answered: those it held, those queued when it
/// failed, and those sent afterwards (`Failed`, with the cause); the engine reports the failure
/// and stops with an error. Before, requests queued at the failure waited forever.
#[test]
fn a_failed_shard_answers_every_request_and_the_engine_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = configs(dir.path()).remove(0);
    config.cluster.nodes.truncate(1);
    let (engines, client) = Engine::start_in_process(vec![config]).expect("start");
    wait_for_every_leader(&client);
    std::fs::remove_dir_all(dir.path().join("node1").join("shard-0").join("wal")).unwrap();
    let (done_tx, done_rx) = flume::bounded(1);
    let remote = client.clone();
    let tasks = 32;
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let session = std::rc::Rc::new(remote.session(tasks));
            let handles: Vec<_> = (0..tasks)
                .map(|t| {
                    let session = session.clone();
                    glommio::spawn_local(async move {
                        let value = vec![t as u8; 60 << 10];
                        // Writes fill segments until a new one is needed; then every answer is
                        // an error, and the task stops at the first `Failed`.
                        for i in 0.. {
                            match session.put(format!("t{t}-{i}").as_bytes(), &value).await {
                                Err(EngineError::Failed(cause)) => return cause,
                                Ok(()) | Err(EngineError::UnknownOutcome | EngineError::Busy(_)) => {}
                                Err(other) => panic!("task {t}: {other}"),
                            }
                        }
                        unreachable!()
                    })
                })
                .collect();
            let mut causes = Vec::new();
            for handle in handles {
                causes.push(handle.await);
            }
            let _ = done_tx.send(causes);
        })
        .unwrap();
    let causes = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("every request answered after the shard failed");
    assert_eq!(causes.len(), tasks);
    let failure = engines[0].failure().expect("the engine reports the failed shard");
    assert!(failure.contains("shard 0"), "{failure}");
    // A request sent now is refused at once, not left in a queue nobody reads.
    match client.put_blocking(b"after", b"v") {
        Err(EngineError::Failed(_) | EngineError::NotLeader { .. }) => {}
        other => panic!("a put to a failed shard: {other:?}"),
    }
    assert!(
        engines[0].status().is_empty(),
        "a failed shard has no status to give"
    );
    for engine in engines {
        let stopped = engine.shutdown();
        assert!(stopped.is_err(), "shutdown reports the failure: {stopped:?}");
    }
}

/// Four nodes, every group on the first three: once idle, every group sleeps on its members
/// (quiescence through the shard beats), and node 4, a member of none, sleeps them all too.
#[test]
fn idle_groups_sleep_on_their_members_and_outside_them() {
    let dir = tempfile::tempdir().unwrap();
    let configs: Vec<Config> = (1..=4)
        .map(|id| {
            let mut config = configs(dir.path())[0].clone();
            let local = Config::local_cluster(4, id);
            config.node = local.node;
            config.node.data_dir = dir.path().join(format!("node{id}"));
            config.cluster = local.cluster;
            config.cluster.initial_voters = vec![1, 2, 3];
            config.raft.quiesce_after_ms = 200;
            config
        })
        .collect();
    let (engines, client) = Engine::start_in_process(configs).expect("start");
    wait_for_every_leader(&client);
    let asleep = |engine: &Engine| -> u64 { engine.metrics().shards.iter().map(|s| s.groups_asleep).sum() };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let counts: Vec<u64> = engines.iter().map(asleep).collect();
        if counts.iter().all(|&n| n == client.groups()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "groups asleep per node after 20 s idle: {counts:?} (of {})",
            client.groups()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A write wakes its group; it serves, then sleeps again.
    client
        .put_blocking(b"after", b"sleep")
        .expect("a sleeping group serves");
    assert_eq!(
        client
            .get_blocking(b"after", Consistency::Linearizable)
            .unwrap()
            .as_deref(),
        Some(&b"sleep"[..])
    );
    for engine in engines {
        engine.shutdown().expect("clean shutdown");
    }
}
