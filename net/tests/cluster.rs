//! Real multi-process clusters on 127.0.0.1: `ringraft run` processes, the client library, kill
//! -9, restarts, a wrong-key peer and a garbage-sending client.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use porcupine_rs::{Model, Operation};
use ringraft_engine::Consistency;
use ringraft_net::client::{fetch_group_metrics, fetch_status, ClientConfig, ClientError, NetClient};
use ringraft_net::frame;
use ringraft_net::protocol::Failure;

/// Free TCP ports, outside the kernel's ephemeral range (see `ringraft_net::ports`).
fn free_ports(n: usize) -> Vec<u16> {
    ringraft_net::ports::local_port_ranges(n, 1).unwrap()
}

struct Node {
    id: u64,
    config: PathBuf,
    log: PathBuf,
    client_port: u16,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self) {
        self.start_with_log_filter(Some("info"));
    }

    /// Starts the node with `RUST_LOG` set to `filter`, or unset (`node.log_level` decides).
    fn start_with_log_filter(&mut self, filter: Option<&str>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_ringraft"));
        match filter {
            Some(filter) => command.env("RUST_LOG", filter),
            None => command.env_remove("RUST_LOG"),
        };
        let child = command
            .args(["run", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ringraft starts");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
        }
    }

    /// SIGTERM; returns whether it exited 0.
    fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the running node.
    fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("the node runs");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(child.id() as i32, signal) };
    }

    /// Waits up to 20 s for the log to contain `text`.
    fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log_text().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the log within 20 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes configs for `keys.len()` nodes (one shard each, 2 groups per shard) into `dir`.
fn cluster(dir: &Path, keys: &[&str]) -> Vec<Node> {
    cluster_with_shards(dir, keys, 1)
}

/// Like [`cluster`], with `shards` unpinned shards per node (on CPUs 0, 1, ...).
fn cluster_with_shards(dir: &Path, keys: &[&str], shards: u16) -> Vec<Node> {
    let ports = ringraft_net::ports::local_port_ranges(2 * keys.len(), shards).unwrap();
    let cpus: Vec<String> = (0..shards).map(|c| c.to_string()).collect();
    let cpus = cpus.join(", ");
    let members: Vec<String> = (0..keys.len())
        .map(|i| {
            format!(
                "  {{ id = {}, host = \"127.0.0.1\", peer_port = {}, client_port = {} }},",
                i + 1,
                ports[2 * i],
                ports[2 * i + 1]
            )
        })
        .collect();
    keys.iter()
        .enumerate()
        .map(|(i, key)| {
            let id = i as u64 + 1;
            let text = format!(
                "[node]\nid = {id}\ndata_dir = \"{}\"\n\n[cluster]\nid = 42\nkey = \"{key}\"\nnodes = [\n{}\n]\n\n\
                 [shards]\ncpus = [{cpus}]\npin = false\ngroups_per_shard = 2\n\n\
                 [wal]\nsegment_bytes = 4194304\nbatch_bytes_max = 1179648\n\n[batching]\nentry_bytes_max = 1114112\n\n\
                 [glommio]\nio_memory_bytes = 1048576\n\n[raft]\nelection_timeout_ms = 300\nheartbeat_interval_ms = 30\n",
                dir.join(format!("data-{id}")).display(),
                members.join("\n")
            );
            let config = dir.join(format!("node-{id}.toml"));
            std::fs::write(&config, text).unwrap();
            Node {
                id,
                config,
                log: dir.join(format!("node-{id}.log")),
                client_port: ports[2 * i + 1],
                child: None,
            }
        })
        .collect()
}

fn client_config(nodes: &[Node]) -> ClientConfig {
    let mut config = ClientConfig::new(nodes.iter().map(Node::addr));
    config.request_timeout = Duration::from_secs(5);
    config.backoff_max = Duration::from_millis(100);
    config.attempts_max = 60;
    config
}

fn connect(nodes: &[Node]) -> NetClient {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match NetClient::connect(client_config(nodes)) {
            Ok(client) => return client,
            Err(e) if Instant::now() > deadline => panic!("cannot connect: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Retries `put` until it succeeds; returns how long that took.
fn put_until_ok(client: &NetClient, key: &[u8], value: &[u8], limit: Duration) -> Duration {
    let began = Instant::now();
    loop {
        match client.put_blocking(key, value) {
            Ok(()) => return began.elapsed(),
            Err(e) if began.elapsed() > limit => panic!("no successful put within {limit:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// One put per group, so every group has a leader before the test goes on.
fn serve_every_group(client: &NetClient) {
    for group in 0..client.cluster().groups {
        let key = (0u32..)
            .map(|i| format!("warm-{i}").into_bytes())
            .find(|k| client.group_of(k) == group)
            .unwrap();
        put_until_ok(client, &key, b"warm", Duration::from_secs(30));
    }
}

/// Three nodes sharing a key, started, every group with a leader that served a write.
fn three_serving_nodes(dir: &Path) -> (Vec<Node>, NetClient) {
    let mut nodes = cluster(dir, &["secret", "secret", "secret"]);
    for node in &mut nodes {
        node.start();
    }
    let client = connect(&nodes);
    serve_every_group(&client);
    (nodes, client)
}

/// A register for porcupine: write ids are unique per write; 0 is "absent".
#[derive(Clone)]
struct Register;

#[derive(Clone, Debug)]
enum Step {
    Write(u64),
    Read(u64),
}

impl Model for Register {
    type State = u64;
    type Op = Step;
    type Metadata = ();

    fn init() -> u64 {
        0
    }

    fn step(state: &u64, op: &Step) -> (bool, u64) {
        match op {
            Step::Write(v) => (true, *v),
            Step::Read(seen) => (seen == state, *state),
        }
    }
}

fn value_id(value: Option<&[u8]>) -> u64 {
    value.map_or(0, |v| u64::from_le_bytes(v.try_into().expect("8-byte values")))
}

#[derive(Default)]
struct History {
    /// Shared key -> operations on it.
    ops: BTreeMap<u8, Vec<Operation<Register>>>,
    /// Unique keys whose put was acknowledged.
    acked_unique: Vec<Vec<u8>>,
    acked_writes: u64,
    unknown_writes: u64,
}

const SHARED_KEYS: u8 = 6;

fn load(client: NetClient, thread: u64, epoch: Instant, stop: Arc<AtomicBool>, history: Arc<Mutex<History>>) {
    let mut rng = thread.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let now = || epoch.elapsed().as_nanos() as i64;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let choice = next() % 10;
        if choice < 3 {
            let key = format!("unique-{thread}-{n}").into_bytes();
            if client.put_blocking(&key, &n.to_le_bytes()).is_ok() {
                history.lock().unwrap().acked_unique.push(key);
            }
            continue;
        }
        let shared = (next() % SHARED_KEYS as u64) as u8;
        let key = format!("shared-{shared}").into_bytes();
        let call_time = now();
        let (op, return_time) = if choice < 7 {
            let id = (thread << 40) | n;
            match client.put_blocking(&key, &id.to_le_bytes()) {
                Ok(()) => {
                    history.lock().unwrap().acked_writes += 1;
                    (Step::Write(id), now())
                }
                Err(e) if e.outcome_unknown() => {
                    history.lock().unwrap().unknown_writes += 1;
                    (Step::Write(id), i64::MAX)
                }
                Err(_) => continue, // refused: never applied
            }
        } else {
            // Some reads through the leader's lease: they must be linearizable as well.
            let consistency = if choice == 9 {
                Consistency::Lease
            } else {
                Consistency::Linearizable
            };
            match client.get_blocking(&key, consistency) {
                Ok(value) => (Step::Read(value_id(value.as_deref())), now()),
                Err(_) => continue,
            }
        };
        history
            .lock()
            .unwrap()
            .ops
            .entry(shared)
            .or_default()
            .push(Operation {
                client_id: None,
                call_time,
                return_time,
                op,
                metadata: None,
            });
    }
}

/// Four load threads writing and reading (see [`load`]) until [`Load::finish`].
struct Load {
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<History>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(client: &NetClient) -> Load {
        let epoch = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let history = Arc::new(Mutex::new(History::default()));
        let threads = (0..4)
            .map(|t| {
                let (client, stop, history) = (client.clone(), stop.clone(), history.clone());
                std::thread::spawn(move || load(client, t + 1, epoch, stop, history))
            })
            .collect();
        Load {
            stop,
            history,
            threads,
        }
    }

    /// Stops the threads; returns what they saw (and asserts they made progress).
    fn finish(self) -> History {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
        let history = std::mem::take(&mut *self.history.lock().unwrap());
        eprintln!(
            "{} acknowledged shared writes, {} unknown, {} acknowledged unique writes",
            history.acked_writes,
            history.unknown_writes,
            history.acked_unique.len()
        );
        assert!(history.acked_writes > 10, "the load made progress");
        history
    }
}

/// Every acknowledged unique write is on each of `nodes` (local reads, waiting for catch-up).
fn assert_acknowledged_writes_on(client: &NetClient, history: &History, nodes: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for key in &history.acked_unique {
        for &node in nodes {
            loop {
                match client.get_from_blocking(node, key, Consistency::Local) {
                    Ok(Some(_)) => break,
                    other if Instant::now() > deadline => panic!(
                        "acknowledged key {} missing on node {node}: {other:?}",
                        String::from_utf8_lossy(key)
                    ),
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

fn leader_of(nodes: &[Node], group: u64) -> Option<u64> {
    for node in nodes.iter().filter(|n| n.child.is_some()) {
        if let Ok(groups) = fetch_status(&node.addr(), &ClientConfig::new([node.addr()])) {
            if let Some(leader) = groups.iter().find(|g| g.group == group).and_then(|g| g.leader) {
                return Some(leader);
            }
        }
    }
    None
}

#[test]
fn three_processes_survive_killing_the_leader_and_lose_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, client) = three_serving_nodes(dir.path());
    let load = Load::start(&client);
    std::thread::sleep(Duration::from_millis(1500));

    // Kill -9 the leader of the group of shared-0, under load.
    let victim_key = b"shared-0";
    let group = client.group_of(victim_key);
    let victim = leader_of(&nodes, group).expect("group has a leader");
    let killed_at = Instant::now();
    nodes[victim as usize - 1].kill();
    let probe = connect(&nodes);
    let recovered = put_until_ok(&probe, b"after-kill", b"x", Duration::from_secs(30));
    let probe_group = probe.group_of(b"after-kill");
    eprintln!(
        "leader {victim} of group {group} killed; a write to group {probe_group} succeeded {:?} later",
        killed_at.elapsed().min(recovered)
    );
    let served = put_until_ok(
        &probe,
        victim_key,
        &u64::MAX.to_le_bytes(),
        Duration::from_secs(30),
    );
    eprintln!("group {group} served a write {served:?} after the kill");
    std::thread::sleep(Duration::from_millis(1000));

    // Restart it under load; it catches up.
    nodes[victim as usize - 1].start();
    std::thread::sleep(Duration::from_millis(2000));

    // A planned stop under load: SIGTERM the current leader. It stops taking requests, answers
    // what it has in flight (its peers still commit them) and exits 0.
    let leader = leader_of(&nodes, group).expect("group has a leader");
    let node = &mut nodes[leader as usize - 1];
    assert!(
        node.terminate(),
        "leader {leader} did not exit 0 on SIGTERM under load:\n{}",
        node.log_text()
    );
    node.start();
    std::thread::sleep(Duration::from_millis(1500));
    let history = load.finish();

    // Every acknowledged write is on all three nodes.
    assert_acknowledged_writes_on(&client, &history, &[1, 2, 3]);
    let deadline = Instant::now() + Duration::from_secs(60);
    // Shared keys: all replicas converge on the linearizable value.
    for shared in 0..SHARED_KEYS {
        let key = format!("shared-{shared}").into_bytes();
        let value = client.get_blocking(&key, Consistency::Linearizable).unwrap();
        for node in &nodes {
            loop {
                let local = client.get_from_blocking(node.id, &key, Consistency::Local);
                if local.as_ref().ok() == Some(&value) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {} diverges on {shared}: {local:?} vs {value:?}",
                    node.id
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    // The client history is linearizable, key by key (the probe's write to shared-0 included).
    for (shared, mut ops) in history.ops {
        if shared == 0 {
            ops.push(Operation {
                client_id: None,
                call_time: 0,
                return_time: i64::MAX,
                op: Step::Write(u64::MAX),
                metadata: None,
            });
        }
        assert!(
            porcupine_rs::check_operations::<Register>(&ops),
            "history of shared-{shared} is not linearizable ({} operations)",
            ops.len()
        );
    }

    // An operator moves leadership of the group to a chosen node (`ringraft transfer`).
    let current = leader_of(&nodes, group).expect("a leader");
    let target = if current == 1 { 2 } else { 1 };
    let output = Command::new(env!("CARGO_BIN_EXE_ringraft"))
        .args([
            "transfer",
            "--addr",
            &nodes[0].addr(),
            "--group",
            &group.to_string(),
        ])
        .args(["--to", &target.to_string()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while leader_of(&nodes, group) != Some(target) {
        assert!(
            Instant::now() < deadline,
            "node {target} did not become leader of group {group}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    put_until_ok(&client, victim_key, b"after transfer", Duration::from_secs(10));

    // SIGTERM: every node stops cleanly with exit code 0.
    for node in &mut nodes {
        let id = node.id;
        assert!(
            node.terminate(),
            "node {id} did not exit 0 on SIGTERM:\n{}",
            node.log_text()
        );
    }
}

#[test]
fn a_peer_with_the_wrong_key_cannot_join() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), &["right", "wrong", "right"]);
    nodes[0].start();
    nodes[1].start();
    let client = connect(&nodes[..1]);
    // Two of three members, but one cannot authenticate: no quorum, no leader.
    std::thread::sleep(Duration::from_millis(2000));
    let mut config = client_config(&nodes[..1]);
    config.attempts_max = 3;
    let lone = NetClient::connect(config).unwrap();
    assert!(lone.put_blocking(b"k", b"v").is_err(), "no quorum without node 2");
    assert!(
        nodes[0].log_text().contains("authentication failed"),
        "{}",
        nodes[0].log_text()
    );
    // The third member has the right key: node 1 and 3 form a quorum.
    nodes[2].start();
    put_until_ok(&client, b"k", b"v", Duration::from_secs(30));
    assert!(
        fetch_status(&nodes[1].addr(), &ClientConfig::new([nodes[1].addr()]))
            .unwrap()
            .iter()
            .all(|g| g.commit <= 1),
        "node 2 received no log"
    );
}

fn read_frame(stream: &mut TcpStream) -> Option<frame::Frame> {
    let mut buf = Vec::new();
    let _ = stream.read_to_end(&mut buf);
    frame::decode(&buf, 1 << 20).ok().flatten().map(|(f, _)| f)
}

#[test]
fn a_client_sending_garbage_does_not_disturb_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), &["k"]);
    // Also serve metrics on this node.
    let metrics_port = free_ports(1)[0];
    let text = std::fs::read_to_string(&nodes[0].config).unwrap();
    let text = text.replacen(
        "[node]\n",
        &format!("[node]\nmetrics_addr = \"127.0.0.1:{metrics_port}\"\n"),
        1,
    );
    std::fs::write(&nodes[0].config, text).unwrap();
    nodes[0].start();
    let client = connect(&nodes);
    put_until_ok(&client, b"before", b"1", Duration::from_secs(30));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let worker = {
        let (client, stop, done) = (client.clone(), stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                client
                    .put_blocking(format!("k{n}").as_bytes(), b"v")
                    .expect("well-behaved client served");
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let timeout = Some(Duration::from_secs(10));
    // Garbage: an ERROR frame, then the connection closes.
    let mut garbage = TcpStream::connect(nodes[0].addr()).unwrap();
    garbage.set_read_timeout(timeout).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_frame(&mut garbage).map(|f| f.kind), Some(frame::kind::ERROR));
    // An oversized frame: refused from its header alone.
    let mut big = TcpStream::connect(nodes[0].addr()).unwrap();
    big.set_read_timeout(timeout).unwrap();
    let mut head = vec![b'R', b'F', frame::VERSION, frame::kind::SUBMIT];
    head.extend_from_slice(&u32::MAX.to_le_bytes());
    head.extend_from_slice(&[0; 8]);
    big.write_all(&head).unwrap();
    let answer = read_frame(&mut big).expect("an error frame");
    assert_eq!(answer.kind, frame::kind::ERROR);
    assert!(String::from_utf8_lossy(&answer.payload).contains("exceeds the maximum"));
    // A valid frame of an unknown kind: a BadRequest answer, then close.
    let mut odd = TcpStream::connect(nodes[0].addr()).unwrap();
    odd.set_read_timeout(timeout).unwrap();
    let mut out = Vec::new();
    frame::encode(&mut out, 0x7f, &7u64.to_le_bytes());
    odd.write_all(&out).unwrap();
    let answer = read_frame(&mut odd).expect("an answer");
    let response = ringraft_net::protocol::decode_response(&answer.payload).unwrap();
    assert_eq!(response.id, 7);
    assert!(matches!(
        response.outcome,
        Err(ringraft_net::protocol::Failure::BadRequest(_))
    ));
    // A truncated frame, then the client vanishes.
    let mut cut = TcpStream::connect(nodes[0].addr()).unwrap();
    cut.write_all(&out[..10]).unwrap();
    drop(cut);
    let before = done.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    assert!(
        done.load(Ordering::Relaxed) > before,
        "the other client kept being served"
    );
    assert_eq!(
        client.get_blocking(b"before", Consistency::Linearizable).unwrap(),
        Some(b"1".to_vec())
    );
    match client.put_blocking(&[0u8; 5000], b"v") {
        Err(ClientError::Server(ringraft_net::protocol::Failure::TooLarge(_))) => {}
        other => panic!("a too-large key: {other:?}"),
    }
    // `ringraft status` shows every group with its lags and counters.
    let status = Command::new(env!("CARGO_BIN_EXE_ringraft"))
        .args(["status", "--addr", &nodes[0].addr(), "--json"])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let groups: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let groups = groups.as_array().unwrap();
    assert_eq!(groups.len(), 2);
    for g in groups {
        assert_eq!(g["leader"], 1);
        assert_eq!(g["is_leader"], true);
        assert!(g["commit"].as_u64().unwrap() >= 1 && g["apply_lag"] == 0, "{g}");
        // Nothing compacted yet (the first checkpoint may or may not have run).
        assert_eq!(g["first_index"], 1, "{g}");
        assert!(g["checkpoint_index"].as_u64().unwrap() <= g["applied"].as_u64().unwrap());
    }
    let table = Command::new(env!("CARGO_BIN_EXE_ringraft"))
        .args(["status", "--addr", &nodes[0].addr()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("apply-lag") && table.contains("log-from") && table.contains(" 1*"),
        "{table}"
    );
    // Piped into a reader that is already gone (as into `head`): it ends quietly.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let piped = Command::new(env!("CARGO_BIN_EXE_ringraft"))
        .args(["status", "--addr", &nodes[0].addr()])
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(piped.status.signal(), Some(libc::SIGPIPE), "{:?}", piped.status);
    // Prometheus metrics reflect the work done.
    let mut http = TcpStream::connect(("127.0.0.1", metrics_port)).unwrap();
    http.set_read_timeout(timeout).unwrap();
    http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut page = String::new();
    let _ = http.read_to_string(&mut page);
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let proposals: f64 = page
        .lines()
        .find(|l| l.starts_with("ringraft_commands_proposed_total{"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .expect("a commands counter");
    assert!(proposals >= 2.0, "{proposals} commands proposed");
    assert!(
        page.contains("ringraft_group_is_leader{node=\"1\",group=\"0\"} 1"),
        "{page}"
    );
    assert!(page.contains("ringraft_sync_latency_microseconds{node=\"1\",shard=\"0\",quantile=\"0.99\"}"));
    assert!(page.contains("ringraft_commit_latency_microseconds_count{node=\"1\",shard=\"0\"}"));
    assert!(page.contains("ringraft_snapshots_installed_total{node=\"1\",shard=\"0\"}"));
    assert!(page.contains("ringraft_checkpoints_total{node=\"1\",shard=\"0\"}"));
    assert!(
        page.contains("ringraft_group_first_index{node=\"1\",group=\"0\"} 1\n"),
        "{page}"
    );
    assert!(page.contains("ringraft_group_checkpoint_index{node=\"1\",group=\"0\"}"));
    assert!(page.contains("process_resident_memory_bytes"));
    // A healthy disk: no segment preparation failed or is being retried.
    assert!(
        page.contains("ringraft_wal_prepare_failures_total{node=\"1\",shard=\"0\"} 0\n"),
        "{page}"
    );
    assert!(
        page.contains("ringraft_wal_prepare_failing{node=\"1\",shard=\"0\"} 0\n"),
        "{page}"
    );
    assert!(page.contains("ringraft_request_latency_microseconds_count{node=\"1\",shard=\"0\"}"));
    assert!(nodes[0].terminate());
}

/// Adds keys to a node's config file (`section` must exist or is appended).
fn patch_config(node: &Node, section: &str, line: &str) {
    let text = std::fs::read_to_string(&node.config).unwrap();
    let header = format!("[{section}]\n");
    let text = if text.contains(&header) {
        text.replacen(&header, &format!("{header}{line}\n"), 1)
    } else {
        format!("{text}\n{header}{line}\n")
    };
    std::fs::write(&node.config, text).unwrap();
}

#[test]
fn a_follower_that_was_down_catches_up_from_the_log() {
    follower_catches_up(100_000);
}

#[test]
fn a_follower_behind_the_compacted_log_catches_up_by_snapshot() {
    follower_catches_up(0);
}

/// Stops a follower, writes and compacts, restarts it and waits until it serves every write.
/// With `retain_for_followers` 0 the leader compacts past what the follower needs: it must get
/// a snapshot (its log says so).
fn follower_catches_up(retain_for_followers: u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), &["k", "k", "k"]);
    for node in &nodes {
        // Checkpoint often and keep almost nothing below it: without the leader keeping what
        // the slowest follower needs, the restarted follower would need a snapshot.
        patch_config(node, "wal", "retain_entries = 5");
        patch_config(
            node,
            "wal",
            &format!("retain_for_followers_entries = {retain_for_followers}"),
        );
        patch_config(node, "sm", "checkpoint_interval_ms = 100");
    }
    for node in &mut nodes {
        node.start();
    }
    let client = connect(&nodes);
    serve_every_group(&client);
    let leader = leader_of(&nodes, 0).expect("group 0 has a leader");
    let follower = if leader == 1 { 2 } else { 1 };
    let expect_snapshot = retain_for_followers == 0;
    let addrs: Vec<String> = nodes.iter().map(Node::addr).collect();
    let group_0 = |node: u64| {
        let addr = addrs[node as usize - 1].clone();
        let groups = fetch_group_metrics(&addr, &ClientConfig::new([addr.clone()])).unwrap();
        groups.into_iter().find(|g| g.group == 0).unwrap()
    };
    let followers_last = group_0(follower).last_index;
    nodes[follower as usize - 1].kill();
    let keys: Vec<Vec<u8>> = (0..300).map(|i| format!("catch-{i}").into_bytes()).collect();
    for key in &keys {
        put_until_ok(&client, key, b"v", Duration::from_secs(30));
    }
    // The leader compacts at its checkpoints (every 100 ms), which lag behind the writes on a
    // loaded machine: wait for the condition, not for a time. Without a snapshot expected:
    // a checkpoint past every write, so compaction had its chance to drop what the follower
    // needs. With one: the log compacted past the follower's last entry.
    let leaders_commit = group_0(leader).commit;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let g = group_0(leader);
        let done = if expect_snapshot {
            g.first_index > followers_last + 1
        } else {
            g.checkpoint_index >= leaders_commit
        };
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leader did not compact within 30 s (follower's last index {followers_last}): {g:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nodes[follower as usize - 1].start();
    let deadline = Instant::now() + Duration::from_secs(30);
    for key in &keys {
        loop {
            match client.get_from_blocking(follower, key, Consistency::Local) {
                Ok(Some(_)) => break,
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "follower {follower} did not catch up ({} missing: {other:?})\n{}",
                        String::from_utf8_lossy(key),
                        nodes[leader as usize - 1].log_text()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
    let snapshot = nodes[follower as usize - 1]
        .log_text()
        .contains("installed a snapshot");
    assert_eq!(
        snapshot,
        expect_snapshot,
        "snapshot install expected: {expect_snapshot}\n{}",
        nodes[follower as usize - 1].log_text()
    );
    for node in &mut nodes {
        let id = node.id;
        assert!(node.terminate(), "node {id} did not exit 0");
    }
}

#[test]
fn a_node_whose_disk_fails_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, client) = single_node(dir.path(), &[]);
    // The WAL's directory vanishes: open segments keep working, but the next segment cannot be
    // prepared, the WAL fails, the shard stops, and the node must exit rather than linger.
    std::fs::remove_dir_all(dir.path().join("data-1").join("shard-0").join("wal")).unwrap();
    let value = vec![7u8; 256 << 10];
    let mut child = nodes[0].child.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the node kept running with a failed WAL:\n{}",
            nodes[0].log_text()
        );
        // Writes fill segments until a new one is needed; their errors are expected.
        let _ = client.put_blocking(b"filler", &value);
    };
    assert!(!status.success(), "a failed shard must not exit 0");
    let log = nodes[0].log_text();
    assert!(log.contains("stopping:") && log.contains("wal"), "{log}");
}

/// A crash leaves far more committed-but-unapplied log than the WAL's entry cache holds (no
/// checkpoint since the start, a 64 KiB cache): on restart raft reads those entries
/// synchronously to apply them, so the node must load them before raft starts.
#[test]
fn a_node_restarts_with_more_unapplied_log_than_its_cache_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, client) = single_node(
        dir.path(),
        &[
            ("wal", "cache_bytes = 65536"),
            ("sm", "checkpoint_interval_ms = 3600000"),
        ],
    );
    let value = vec![5u8; 4096];
    let keys: Vec<Vec<u8>> = (0..400).map(|i| format!("unapplied-{i}").into_bytes()).collect();
    for key in &keys {
        put_until_ok(&client, key, &value, Duration::from_secs(30));
    }
    nodes[0].kill();
    nodes[0].start();
    let client = connect(&nodes);
    for key in &keys {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match client.get_blocking(key, Consistency::Linearizable) {
                Ok(found) => {
                    assert_eq!(
                        found.as_deref(),
                        Some(&value[..]),
                        "{}",
                        String::from_utf8_lossy(key)
                    );
                    break;
                }
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "no answer after the restart: {e}\n{}",
                        nodes[0].log_text()
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
    assert!(nodes[0].terminate(), "the node did not exit 0");
}

/// One node in `dir` with `settings` ((section, line) pairs) patched into its config, started,
/// and a client once every group has a leader.
fn single_node(dir: &Path, settings: &[(&str, &str)]) -> (Vec<Node>, NetClient) {
    let mut nodes = cluster(dir, &["k"]);
    for (section, line) in settings {
        patch_config(&nodes[0], section, line);
    }
    nodes[0].start();
    let client = connect(&nodes);
    serve_every_group(&client);
    (nodes, client)
}

/// Writes 48 MiB more to `key` at a time until `measure()` is at most `bound`; fails after 30 s
/// naming `what` and the node's log. For space that is reclaimed behind checkpoints, which the
/// writes themselves trigger.
fn write_until_within(
    client: &NetClient,
    key: &[u8],
    node: &Node,
    bound: u64,
    what: &str,
    measure: impl Fn() -> u64,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let measured = measure();
        if measured <= bound {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{measured} {what} (at most {bound} expected)\n{}",
            node.log_text()
        );
        put_48_mib(client, &[key.to_vec()]);
    }
}

/// Puts 48 MiB (768 values of 64 KiB) over `keys`: a dozen of the test cluster's 4 MiB
/// segments, unless compaction recycles them.
fn put_48_mib(client: &NetClient, keys: &[Vec<u8>]) {
    let value = vec![3u8; 64 << 10];
    for i in 0..768 {
        put_until_ok(client, &keys[i % keys.len()], &value, Duration::from_secs(30));
    }
}

/// Segment files in the WAL of node 1's shard 0.
fn wal_segment_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("data-1").join("shard-0").join("wal"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".wal")
        })
        .count()
}

/// With checkpoints on a timer that never fires, the WAL still stops growing: a checkpoint round
/// starts every `sm.checkpoint_log_bytes` written, the log is compacted behind it and its
/// segments are recycled.
#[test]
fn checkpoints_follow_the_log_size_when_the_timer_is_far_off() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, client) = single_node(
        dir.path(),
        &[
            ("sm", "checkpoint_interval_ms = 3600000"),
            ("sm", "checkpoint_log_bytes = 4194304"),
            ("wal", "retain_entries = 5"),
        ],
    );
    let keys: Vec<Vec<u8>> = (0..64).map(|i| format!("big-{i}").into_bytes()).collect();
    put_48_mib(&client, &keys);
    let segments = wal_segment_files(dir.path());
    // Live segments behind the last checkpoint round, the prepared one and up to
    // wal.segments_recycled_max (2) spares: 4 measured; 14 without the trigger.
    assert!(
        segments <= 8,
        "{segments} segment files: the log was not compacted\n{}",
        nodes[0].log_text()
    );
    assert!(nodes[0].terminate(), "the node did not exit 0");
}

/// Overwriting the same keys with values kept in data files leaves dead bytes behind; the
/// shard's upkeep compacts sealed files and checkpoints let them be deleted, so the state
/// machine's files stay near its live size instead of growing with every write.
#[test]
fn overwritten_values_do_not_grow_the_state_machine_files() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, client) = single_node(
        dir.path(),
        &[
            ("sm", "data_file_bytes = 1048576"),
            ("sm", "checkpoint_log_bytes = 4194304"),
        ],
    );
    // 64 keys (4 MiB live), 48 MiB written.
    let keys: Vec<Vec<u8>> = (0..64).map(|i| format!("over-{i}").into_bytes()).collect();
    put_48_mib(&client, &keys);
    let data_bytes = || -> u64 {
        let shard = dir.path().join("data-1").join("shard-0");
        std::fs::read_dir(&shard)
            .unwrap()
            .map(|g| g.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("group-"))
            .flat_map(|g| std::fs::read_dir(g).unwrap())
            .map(|f| f.unwrap())
            .filter(|f| f.file_name().to_string_lossy().starts_with("data-"))
            .map(|f| f.metadata().unwrap().len())
            .sum()
    };
    // Live 4 MiB, plus files awaiting compaction or still listed by a kept checkpoint.
    write_until_within(
        &client,
        &keys[0],
        &nodes[0],
        24 << 20,
        "bytes of data files for 4 MiB of live values",
        data_bytes,
    );
    for key in &keys {
        assert_eq!(
            client
                .get_blocking(key, Consistency::Linearizable)
                .unwrap()
                .map(|v| v.len()),
            Some(64 << 10)
        );
    }
    assert!(nodes[0].terminate(), "the node did not exit 0");
}

/// One group takes every write while the other stays idle with the few entries of its first
/// election in the oldest segment. Keeping `retain_entries` below its checkpoint, the idle group
/// would pin that segment, and with it every later one, forever: the WAL must still stay within
/// `wal.live_segments_max`.
#[test]
fn an_idle_group_does_not_pin_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let (mut nodes, client) = single_node(
        dir.path(),
        &[
            ("sm", "checkpoint_log_bytes = 4194304"),
            ("wal", "retain_entries = 5"),
            ("wal", "live_segments_max = 4"),
        ],
    );
    let groups = client.cluster().groups;
    let keys: Vec<Vec<u8>> = (0..)
        .map(|i| format!("busy-{i}").into_bytes())
        .filter(|k| ringraft_engine::group_of(k, groups) == 0)
        .take(64)
        .collect();
    put_48_mib(&client, &keys);
    // live_segments_max live ones, the prepared one and up to 2 recycling spares.
    write_until_within(
        &client,
        &keys[0],
        &nodes[0],
        7,
        "segment files: the idle group pins the WAL",
        || wal_segment_files(dir.path()) as u64,
    );
    assert!(nodes[0].terminate(), "the node did not exit 0");
}

/// Runs `ringraft` with `args`; panics with its stderr unless it exits 0.
/// Writes a key to every group and waits up to 30 s until `node` serves each locally: it
/// caught up with every group it is a member of.
fn catches_up_on_every_group(client: &NetClient, node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for group in 0..client.cluster().groups {
        let key = (0u32..)
            .map(|i| format!("joined-{i}").into_bytes())
            .find(|k| client.group_of(k) == group)
            .unwrap();
        put_until_ok(client, &key, b"x", Duration::from_secs(30));
        while client
            .get_from_blocking(node.id, &key, Consistency::Local)
            .ok()
            .flatten()
            .is_none()
        {
            assert!(
                Instant::now() < deadline,
                "node {} did not catch up on group {group}:\n{}",
                node.id,
                node.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn ringraft(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_ringraft"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "ringraft {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn a_node_is_replaced_under_load_and_no_acknowledged_write_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), &["k", "k", "k", "k"]);
    for node in &nodes {
        // Node 4 is listed (peers can reach it) but starts outside every group.
        patch_config(node, "cluster", "initial_voters = [1, 2, 3]");
        // Compact right behind checkpoints: node 4 joins by snapshot, then the log.
        patch_config(node, "wal", "retain_entries = 5");
        patch_config(node, "wal", "retain_for_followers_entries = 0");
        patch_config(node, "sm", "checkpoint_interval_ms = 100");
    }
    for node in &mut nodes[..3] {
        node.start();
    }
    let client = connect(&nodes);
    serve_every_group(&client);
    let load = Load::start(&client);
    std::thread::sleep(Duration::from_millis(1000));

    // Replace node 3 by node 4 under load: add 4 as a learner, let it catch up, promote it,
    // remove 3 (if 3 leads a group it hands leadership over first), stop 3.
    nodes[3].start();
    let addr = nodes[0].addr();
    ringraft(&["member", "add", "--addr", &addr, "--node", "4"]);
    catches_up_on_every_group(&client, &nodes[3]);
    assert!(
        nodes[3].log_text().contains("installed a snapshot"),
        "node 4 joined without a snapshot although the log was compacted:\n{}",
        nodes[3].log_text()
    );
    ringraft(&["member", "promote", "--addr", &addr, "--node", "4"]);
    ringraft(&["member", "remove", "--addr", &addr, "--node", "3"]);
    assert!(nodes[2].terminate(), "node 3 did not exit 0");
    std::thread::sleep(Duration::from_millis(1500));
    let history = load.finish();

    // The membership everywhere is {1, 2, 4}.
    let status = ringraft(&["status", "--addr", &nodes[3].addr(), "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&status).unwrap();
    for row in rows.as_array().unwrap() {
        assert_eq!(row["voters"], serde_json::json!([1, 2, 4]), "{row}");
        assert_eq!(row["learners"], serde_json::json!([]), "{row}");
    }
    // Every acknowledged write is on the three remaining nodes.
    assert_acknowledged_writes_on(&client, &history, &[1, 2, 4]);
    for (shared, ops) in history.ops {
        assert!(
            porcupine_rs::check_operations::<Register>(&ops),
            "history of shared-{shared} is not linearizable ({} operations)",
            ops.len()
        );
    }
    for i in [0, 1, 3] {
        let id = nodes[i].id;
        assert!(nodes[i].terminate(), "node {id} did not exit 0");
    }
}

/// A leader that lost both followers keeps the put it cannot commit; the node answers `Timeout`
/// once `limits.request_timeout_ms` has passed (found by the connection's sweeper), long before
/// check-quorum makes it step down.
#[test]
fn a_put_the_leader_cannot_commit_is_answered_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), &["k", "k", "k"]);
    for node in &nodes {
        let text = std::fs::read_to_string(&node.config).unwrap();
        let text = text.replace("election_timeout_ms = 300", "election_timeout_ms = 3000");
        std::fs::write(&node.config, text).unwrap();
        patch_config(node, "limits", "request_timeout_ms = 250");
    }
    for node in &mut nodes {
        node.start();
    }
    let client = connect(&nodes);
    serve_every_group(&client);
    let leader = leader_of(&nodes, 0).expect("group 0 has a leader");
    let key = (0..)
        .map(|i| format!("stuck-{i}").into_bytes())
        .find(|k| client.group_of(k) == 0)
        .unwrap();
    // The client learns who leads group 0, then the leader loses its quorum.
    put_until_ok(&client, &key, b"before", Duration::from_secs(30));
    for node in nodes.iter_mut().filter(|n| n.id != leader) {
        node.kill();
    }
    let began = Instant::now();
    let outcome = client.put_blocking(&key, b"after");
    let waited = began.elapsed();
    match outcome {
        Err(ClientError::Server(ringraft_net::protocol::Failure::Timeout(message))) => {
            assert!(message.contains("request_timeout_ms"), "{message}");
        }
        other => panic!("expected a Timeout answer, got {other:?} after {waited:?}"),
    }
    assert!(
        waited >= Duration::from_millis(250),
        "answered before the timeout: {waited:?}"
    );
}

/// The glommio-native client: every call kind over the executor's own connections, many tasks
/// at once; then the leader is killed -9 under that load: every call ends (ok, or an error that
/// says whether its outcome is unknown), the client finds the new leader, and every write it
/// was told succeeded is there.
#[test]
fn an_executor_client_calls_over_its_own_connections_and_survives_a_killed_leader() {
    use std::rc::Rc;

    let dir = tempfile::tempdir().unwrap();
    let (nodes, client) = three_serving_nodes(dir.path());
    let (acked, nodes) = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let calls = Rc::new(client.on_executor());
            // Every kind of call, from 32 tasks at once.
            let tasks: Vec<_> = (0..32u32)
                .map(|t| {
                    let calls = calls.clone();
                    glommio::spawn_local(async move {
                        let key = format!("exec-{t}").into_bytes();
                        let (v1, v2) = (format!("one-{t}").into_bytes(), format!("two-{t}").into_bytes());
                        calls.put(&key, &v1).await.unwrap();
                        let read = calls.get(&key, Consistency::Linearizable).await.unwrap();
                        assert_eq!(read, Some(v1.clone()));
                        assert_eq!(
                            calls.compare_and_swap(&key, Some(&v1), Some(&v2)).await.unwrap(),
                            Ok(())
                        );
                        assert_eq!(
                            calls.compare_and_swap(&key, Some(&v1), None).await.unwrap(),
                            Err(Some(v2.clone()))
                        );
                        let group = calls.client().group_of(&key);
                        let results = calls
                            .submit(group, vec![ringraft_sm::Command::Delete { key: key.clone() }])
                            .await
                            .unwrap();
                        assert_eq!(results, vec![ringraft_sm::CommandResult::Ok]);
                        assert!(!calls.delete(&key).await.unwrap());
                        assert_eq!(calls.get(&key, Consistency::Linearizable).await.unwrap(), None);
                    })
                })
                .collect();
            for task in tasks {
                task.await;
            }
            // One connection per (node, shard) at most, shared by every task, and opened once
            // although 32 tasks needed it at the same moment.
            let open = calls.connections();
            assert!((1..=3).contains(&open), "{open} connections");
            let attempts = calls.connection_attempts();
            assert!(
                attempts <= 3,
                "{attempts} connection attempts for {open} connections"
            );

            // Load from 16 tasks, then kill -9 the leader of a group under it.
            let stop = Rc::new(std::cell::Cell::new(false));
            let load: Vec<_> = (0..16u64)
                .map(|t| {
                    let (calls, stop) = (calls.clone(), stop.clone());
                    glommio::spawn_local(async move {
                        let mut acked = Vec::new();
                        let mut n = 0u64;
                        while !stop.get() {
                            let key = format!("load-{t}-{n}").into_bytes();
                            match calls.put(&key, &n.to_le_bytes()).await {
                                Ok(()) => acked.push(key),
                                Err(error) => {
                                    // Retries end in GaveUp (carrying the last cause); any
                                    // other error may only be an outcome the client cannot know.
                                    let known = matches!(error, ClientError::GaveUp { .. })
                                        || error.outcome_unknown();
                                    assert!(known, "unexpected error: {error}");
                                }
                            }
                            n += 1;
                        }
                        acked
                    })
                })
                .collect();
            glommio::timer::sleep(Duration::from_millis(800)).await;
            let group = calls.client().group_of(b"load-0-0");
            let victim = leader_of(&nodes, group).expect("group has a leader");
            let mut nodes = nodes;
            nodes[victim as usize - 1].kill();
            // The client finds the new leader: a put to the killed leader's group succeeds.
            let began = Instant::now();
            let key = (0u32..)
                .map(|i| format!("after-{i}").into_bytes())
                .find(|k| calls.client().group_of(k) == group)
                .unwrap();
            loop {
                match calls.put(&key, b"x").await {
                    Ok(()) => break,
                    Err(e) if began.elapsed() > Duration::from_secs(30) => {
                        panic!("no put after the kill: {e}")
                    }
                    Err(_) => glommio::timer::sleep(Duration::from_millis(10)).await,
                }
            }
            glommio::timer::sleep(Duration::from_millis(500)).await;
            stop.set(true);
            let mut acked = vec![key];
            for task in load {
                acked.extend(task.await);
            }
            (acked, nodes)
        })
        .unwrap()
        .join()
        .unwrap();
    // Every acknowledged write is readable (linearizably, through the threaded client).
    let client = connect(&nodes);
    assert!(acked.len() > 100, "only {} puts acknowledged", acked.len());
    for key in &acked {
        let value = client.get_blocking(key, Consistency::Linearizable).unwrap();
        assert!(
            value.is_some(),
            "acknowledged {} is missing",
            String::from_utf8_lossy(key)
        );
    }
}

#[test]
fn sighup_applies_the_log_level_and_refuses_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), &["k"]);
    patch_config(&nodes[0], "node", "log_level = \"warn\"");
    // No RUST_LOG: the config's level decides.
    nodes[0].start_with_log_filter(None);
    let client = connect(&nodes);
    serve_every_group(&client);
    let node = &nodes[0];
    assert!(!node.log_text().contains("INFO"), "{}", node.log_text());

    // The level goes to info: the node says so (at info) and logs at info from then on.
    let text = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(
        &node.config,
        text.replace("log_level = \"warn\"", "log_level = \"info\""),
    )
    .unwrap();
    node.signal(libc::SIGHUP);
    node.wait_for_log("SIGHUP: node.log_level applied");
    assert!(!node.log_text().contains("take effect when the node restarts"));

    // Another setting changed: named as waiting for a restart; the level stays.
    patch_config(node, "raft", "quiesce_after_ms = 5000");
    node.signal(libc::SIGHUP);
    node.wait_for_log("take effect when the node restarts");

    // A file that does not parse changes nothing, and the node goes on serving.
    let good = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(&node.config, "[node\nid = ").unwrap();
    node.signal(libc::SIGHUP);
    node.wait_for_log("nothing changes");
    client.put_blocking(b"after", b"the reloads").unwrap();
    assert_eq!(
        client
            .get_blocking(b"after", Consistency::Linearizable)
            .unwrap()
            .as_deref(),
        Some(&b"the reloads"[..])
    );
    std::fs::write(&node.config, good).unwrap();
    assert!(nodes[0].terminate(), "a clean stop after the reloads");
}

/// The node ids in a node's address book, as `ringraft cluster --json` shows them.
fn book_of(node: &Node) -> Vec<u64> {
    let out = ringraft(&["cluster", "--addr", &node.addr(), "--json"]);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["cluster"], 42, "{info}");
    let members = info["members"].as_array().unwrap();
    members.iter().map(|m| m["id"].as_u64().unwrap()).collect()
}

/// `GET /metrics` from a node's metrics port.
fn metrics_page(port: u16) -> String {
    let Ok(mut http) = TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    http.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = http.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut page = String::new();
    let _ = http.read_to_string(&mut page);
    page
}

#[test]
fn nodes_join_and_leave_the_address_book_by_sighup_without_restarts() {
    let dir = tempfile::tempdir().unwrap();
    // Two shards: each has its own peer connections and ports to add and remove.
    let mut nodes = cluster_with_shards(dir.path(), &["k", "k", "k", "k"], 2);
    let metrics_ports = free_ports(4);
    let mut full = Vec::new();
    for (node, port) in nodes.iter().zip(&metrics_ports) {
        patch_config(node, "node", &format!("metrics_addr = \"127.0.0.1:{port}\""));
        full.push(std::fs::read_to_string(&node.config).unwrap());
        patch_config(node, "cluster", "initial_voters = [1, 2, 3]");
    }
    // Nodes 1-3 start without node 4 in their address book (every listed node votes); node 4
    // knows everyone. The configs they are sent SIGHUP with list node 4 and name the voters.
    for (node, text) in nodes[..3].iter().zip(&mut full) {
        let without: Vec<&str> = text.lines().filter(|l| !l.contains("{ id = 4,")).collect();
        std::fs::write(&node.config, without.join("\n")).unwrap();
        *text = text.replacen("[cluster]\n", "[cluster]\ninitial_voters = [1, 2, 3]\n", 1);
    }
    for node in &mut nodes {
        node.start();
    }
    let client = connect(&nodes[..3]);
    serve_every_group(&client);
    assert_eq!(client.cluster().members.len(), 3);
    // A client that learned the cluster before node 4 joined.
    let early = client.clone();
    // Nobody connects to node 4: the lower id of two dials, and nodes 1-3 do not know it.
    std::thread::sleep(Duration::from_millis(300));
    for node in &nodes {
        assert!(
            !node.log_text().contains("peer connected peer=4"),
            "{}",
            node.log_text()
        );
    }

    // Nor can it join a group: the leaders could not reach it.
    let refused = Command::new(env!("CARGO_BIN_EXE_ringraft"))
        .args(["member", "add", "--addr", &nodes[0].addr(), "--node", "4"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("node 4 is not in this node's address book"),
        "{stderr}"
    );

    // Node 4 goes into every other node's config; SIGHUP: no restart.
    for (node, text) in nodes[..3].iter().zip(&full) {
        std::fs::write(&node.config, text).unwrap();
        node.signal(libc::SIGHUP);
    }
    for node in &nodes[..3] {
        node.wait_for_log("SIGHUP: nodes added to the address book");
        node.wait_for_log("peer connected peer=4");
    }
    // The same file again changes nothing, and nothing waits for a restart.
    for node in &nodes[..3] {
        node.signal(libc::SIGHUP);
    }
    for node in &nodes[..3] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while node.log_text().matches("SIGHUP: re-reading").count() < 2 {
            assert!(
                Instant::now() < deadline,
                "no second reload:\n{}",
                node.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // What the reload says, it says right after that line.
        std::thread::sleep(Duration::from_millis(300));
        let log = node.log_text();
        assert_eq!(log.matches("nodes added to the address book").count(), 1, "{log}");
        assert!(!log.contains("restart"), "{log}");
    }
    // Clients learn node 4 from any node's `CLUSTER` answer; `ringraft cluster` shows it.
    let client = connect(&nodes[..1]);
    assert_eq!(client.cluster().members.len(), 4);
    // Node 4 holds no copy of any group yet: it redirects a local read instead of answering
    // "not found".
    let warm = (0u32..)
        .map(|i| format!("warm-{i}").into_bytes())
        .find(|k| client.group_of(k) == 0)
        .unwrap();
    match client.get_from_blocking(4, &warm, Consistency::Local) {
        Err(ClientError::Server(Failure::NotLeader { .. })) => {}
        other => panic!("node 4 answered a local read of a group it has no copy of: {other:?}"),
    }
    for node in &nodes {
        assert_eq!(book_of(node), [1, 2, 3, 4], "node {}", node.id);
    }
    let table = ringraft(&["cluster", "--addr", &nodes[1].addr()]);
    assert!(
        table.starts_with("cluster 42: 4 groups on 2 shards per node") && table.contains("peer-port"),
        "{table}"
    );
    assert_eq!(table.lines().count(), 2 + 4, "{table}");

    // Node 4 joins every group and serves its replicas.
    let addr = nodes[0].addr();
    ringraft(&["member", "add", "--addr", &addr, "--node", "4"]);
    ringraft(&["member", "promote", "--addr", &addr, "--node", "4"]);
    catches_up_on_every_group(&client, &nodes[3]);
    assert_eq!(
        client.get_from_blocking(4, &warm, Consistency::Local).unwrap(),
        Some(b"warm".to_vec())
    );
    // Idle, every group quiesces on every node, and stays asleep on node 4: a quiesced
    // follower wakes its groups when their leader's node sends no beat for an election
    // timeout, so the others' shards must beat to node 4 too.
    let cluster = client.cluster();
    let per_shard = cluster.groups / cluster.shards;
    let all_asleep = |node: u64, page: &str| {
        (0..cluster.shards).all(|shard| {
            page.contains(&format!(
                "ringraft_groups_asleep{{node=\"{node}\",shard=\"{shard}\"}} {per_shard}\n"
            ))
        })
    };
    for (node, port) in nodes.iter().zip(&metrics_ports) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let page = metrics_page(*port);
            if all_asleep(node.id, &page) {
                break;
            }
            let id = node.id;
            assert!(
                Instant::now() < deadline,
                "node {id}'s groups not asleep within 20 s:\n{page}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for _ in 0..30 {
        // 1.5 s: five election timeouts.
        std::thread::sleep(Duration::from_millis(50));
        let page = metrics_page(metrics_ports[3]);
        assert!(all_asleep(4, &page), "node 4 woke a group:\n{page}");
    }

    // Node 4 leads group 0: the early client, redirected to a node it does not know, learns
    // the cluster again and follows.
    let leader = leader_of(&nodes, 0).expect("group 0 has a leader");
    let leader_addr = nodes[leader as usize - 1].addr();
    ringraft(&["transfer", "--addr", &leader_addr, "--group", "0", "--to", "4"]);
    // The old leader answered once it stepped down; node 4 may still be winning.
    let deadline = Instant::now() + Duration::from_secs(10);
    while leader_of(&nodes[3..], 0) != Some(4) {
        assert!(Instant::now() < deadline, "node 4 did not take group 0 over");
        std::thread::sleep(Duration::from_millis(20));
    }
    let key = (0u32..)
        .map(|i| format!("early-{i}").into_bytes())
        .find(|k| early.group_of(k) == 0)
        .unwrap();
    early.put_blocking(&key, b"via node 4").unwrap();
    assert_eq!(early.leader_of(0), Some(4));
    assert_eq!(early.cluster().members.len(), 4);

    // Node 3 leaves every config. While it is a member of the groups, the others keep it;
    // once removed from them, they forget it without another SIGHUP.
    let others = [0usize, 1, 3];
    for &i in &others {
        let text = std::fs::read_to_string(&nodes[i].config).unwrap();
        let without: Vec<&str> = text.lines().filter(|l| !l.contains("{ id = 3,")).collect();
        let text = without
            .join("\n")
            .replace("initial_voters = [1, 2, 3]", "initial_voters = [1, 2]");
        std::fs::write(&nodes[i].config, text).unwrap();
        nodes[i].signal(libc::SIGHUP);
    }
    for &i in &others {
        nodes[i].wait_for_log("node 3 leaves the address book once it is a member of no group here");
    }
    let leaving = |i: usize, count: u64| {
        let page = metrics_page(metrics_ports[i]);
        (0..cluster.shards).all(|shard| {
            page.contains(&format!(
                "ringraft_nodes_leaving{{node=\"{}\",shard=\"{shard}\"}} {count}\n",
                nodes[i].id
            ))
        })
    };
    for &i in &others {
        assert_eq!(book_of(&nodes[i]), [1, 2, 3, 4], "node {}", nodes[i].id);
        assert!(leaving(i, 1), "{}", metrics_page(metrics_ports[i]));
    }
    ringraft(&["member", "remove", "--addr", &addr, "--node", "3"]);
    for &i in &others {
        // Once per shard: each goes when none of its groups has node 3.
        let deadline = Instant::now() + Duration::from_secs(20);
        while nodes[i].log_text().matches("left the address book").count() < 2 {
            assert!(
                Instant::now() < deadline,
                "node 3 did not leave node {}'s address book:\n{}",
                nodes[i].id,
                nodes[i].log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !nodes[i].log_text().contains("restart"),
            "{}",
            nodes[i].log_text()
        );
        assert!(leaving(i, 0), "{}", metrics_page(metrics_ports[i]));
    }
    assert!(nodes[2].terminate(), "node 3 did not exit 0");
    let client = connect(&nodes[..1]);
    let ids: Vec<u64> = client.cluster().members.iter().map(|m| m.id).collect();
    assert_eq!(ids, [1, 2, 4]);
    for &i in &others {
        assert_eq!(book_of(&nodes[i]), [1, 2, 4], "node {}", nodes[i].id);
    }
    for group in 0..cluster.groups {
        let key = (0u32..)
            .map(|i| format!("after-3-{i}").into_bytes())
            .find(|k| client.group_of(k) == group)
            .unwrap();
        put_until_ok(&client, &key, b"x", Duration::from_secs(30));
    }
    // Node 3, started again with its old config, dials node 4 (the lower id dials) and is
    // refused: it is no longer in node 4's address book.
    nodes[2].start();
    nodes[3].wait_for_log("node 3 is not a member of this cluster");
    nodes[2].kill();
    for &i in &others {
        let id = nodes[i].id;
        assert!(nodes[i].terminate(), "node {id} did not exit 0");
    }
}

fn members_known_to(client: &NetClient) -> Vec<u64> {
    client.cluster().members.iter().map(|m| m.id).collect()
}

#[test]
fn clients_find_a_replaced_cluster_through_their_seeds() {
    // Two nodes of cluster 42 that never meet: node 1 alone, then node 2 alone in its place, as
    // after a cluster was replaced node by node. Clients that learned only node 1 go on through
    // their second seed.
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), &["k", "k"]);
    for (node, other) in [(0, 2), (1, 1)] {
        let text = std::fs::read_to_string(&nodes[node].config).unwrap();
        let alone: String = text
            .lines()
            .filter(|line| !line.contains(&format!("{{ id = {other},")))
            .map(|line| format!("{line}\n"))
            .collect();
        assert_eq!(alone.lines().count() + 1, text.lines().count());
        std::fs::write(&nodes[node].config, alone).unwrap();
    }
    nodes[0].start();
    let client = connect(&nodes);
    let on_executor = connect(&nodes);
    assert_eq!(members_known_to(&client), [1]);
    serve_every_group(&client);

    nodes[0].kill();
    nodes[1].start();
    put_until_ok(&client, b"after", b"replaced", Duration::from_secs(30));
    assert_eq!(members_known_to(&client), [2]);
    assert_eq!(
        client.get_blocking(b"after", Consistency::Linearizable).unwrap(),
        Some(b"replaced".to_vec())
    );

    // The same over an executor's own connections, which ask the seeds over one of their own.
    let known = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let calls = on_executor.on_executor();
            calls.put(b"after-executor", b"replaced").await.unwrap();
            members_known_to(&on_executor)
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(known, [2]);
}
