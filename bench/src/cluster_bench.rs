//! The cluster benchmark. Three ways to get a cluster ([`Target`]): node processes on loopback
//! talking TCP (the default: this executable re-run as `ringraft-bench node`, which is
//! `ringraft run`), a whole cluster inside this process with channels between nodes (`inproc`),
//! or an existing cluster (`--connect`). Client executors each keep a number of puts in flight
//! (closed loop); over TCP each has its own client connections. fsync is on: every acknowledged
//! put is in a quorum's synced WALs.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use ringraft_engine::{Client, Consistency, Engine, EngineError, NodeStats, Session};
use ringraft_net::client::{fetch_stats, ClientConfig, NetClient};
use ringraft_net::executor_client::ExecutorClient;
use ringraft_sm::Command;
use ringraft_tuning::{Config, CpuList, IoMemory};
use serde::Serialize;

use crate::workload::{latency_ns, Distribution, KeyChooser, Op, Pacer, Workload};
use crate::write_key;

/// Where the cluster comes from.
#[derive(Clone, Debug)]
pub enum Target {
    /// Nodes in this process, messages through channels.
    InProcess,
    /// One process per node on 127.0.0.1 (`exe node --config FILE`), TCP between them.
    Processes { exe: PathBuf },
    /// A cluster started elsewhere: client addresses (`host:port`) to learn it from.
    Connect(Vec<String>),
}

#[derive(Clone, Debug)]
pub struct ClusterBenchOptions {
    pub target: Target,
    pub dir: PathBuf,
    pub nodes: u64,
    pub shards: usize,
    pub groups_per_shard: u64,
    pub clients: u64,
    pub in_flight: u64,
    pub key_bytes: usize,
    pub value_bytes: usize,
    pub keys: u64,
    pub duration: Duration,
    pub warmup: Duration,
    pub workload: Workload,
    pub distribution: Distribution,
    pub read_consistency: Consistency,
    /// Open loop at this many requests per second (all clients together); closed loop if None.
    pub rate: Option<f64>,
    /// End the measured window after this many acknowledged operations (or at `duration`,
    /// whichever comes first).
    pub ops: Option<u64>,
    /// The nodes' `glommio.spin_before_park_us` (refused by the config check unless shards
    /// are pinned).
    pub spin_us: u64,
}

/// Keys are part of the JSON output (docs/bench-output.md).
#[derive(Clone, Debug, Serialize)]
pub struct ClusterResult {
    pub transport: String,
    pub workload: Workload,
    pub distribution: Distribution,
    pub read_consistency: String,
    /// Open loop at this rate (latency counted from each request's intended start); `null`
    /// for closed loop.
    pub target_rate_per_s: Option<f64>,
    pub nodes: u64,
    pub shards_per_node: usize,
    pub groups: u64,
    pub clients: u64,
    pub in_flight: u64,
    pub key_bytes: usize,
    pub value_bytes: usize,
    pub duration_s: f64,
    pub ops: u64,
    pub ops_per_s: f64,
    pub latency_us_p50: f64,
    pub latency_us_p99: f64,
    pub latency_us_p999: f64,
    pub latency_us_max: f64,
    pub commands_per_entry_mean: f64,
    /// WAL writes (each one sync) per second, summed over every node.
    pub syncs_per_s: f64,
    /// Peak RSS: of this process (inproc), else the largest of the node processes.
    pub rss_bytes_max: u64,
    /// Per node process (empty when the nodes are not this machine's children): CPU used
    /// during the measured window, in percent of one CPU.
    pub node_cpu_percent: Vec<f64>,
    /// Per node process: peak RSS.
    pub node_rss_bytes_max: Vec<u64>,
    /// Requests answered with an error (Busy, NotLeader during elections, ...).
    pub errors: u64,
    /// Node 1's effective configuration (TOML) as the benchmark generated it: CPUs, limits,
    /// WAL and raft settings. `null` for an existing cluster.
    pub node_config: Option<String>,
    /// Every acknowledged operation's latency in nanoseconds (for --hist-out and --plot).
    #[serde(skip)]
    pub histogram: Histogram<u64>,
}

/// Registered IO memory of each client executor (it only waits on channels and timers).
const CLIENT_IO_MEMORY_BYTES: u64 = 128 << 10;

/// CPUs for `shards` shards of a node on this machine: those taking the data device's
/// completion interrupts first, since a shard elsewhere is woken across CPUs after every WAL
/// write (one shard on the test VM: ~22% more puts on the interrupt's CPU; see
/// `ringraft_tuning::device_interrupt_cpus`).
fn shard_cpus(shards: usize, online: usize, dir: &Path) -> Vec<usize> {
    let first = ringraft_tuning::device_interrupt_cpus(dir).unwrap_or_default();
    cpus_interrupts_first(shards, online, &first)
}

/// `shards` CPUs out of `0..online`: `first` (those of them online) in order, then the rest,
/// wrapping around when there are more shards than CPUs.
fn cpus_interrupts_first(shards: usize, online: usize, first: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = first.iter().copied().filter(|&cpu| cpu < online).collect();
    order.extend((0..online).filter(|cpu| !first.contains(cpu)));
    (0..shards).map(|s| order[s % order.len()]).collect()
}

/// Where client executors run: off the CPUs of pinned shards while other CPUs are left (one
/// node, fewer shards than CPUs), so that no shard shares its CPU with load generation;
/// anywhere otherwise.
fn client_placement(o: &ClusterBenchOptions) -> Placement {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shards = (o.nodes == 1).then(|| shard_cpus(o.shards, online, &o.dir));
    let Some(free) = cpus_left_for_clients(shards.as_deref(), online) else {
        return Placement::Unbound;
    };
    match glommio::CpuSet::online() {
        Ok(set) => {
            let set = set.filter(|l| free.contains(&l.cpu));
            if set.is_empty() {
                Placement::Unbound
            } else {
                Placement::Fenced(set)
            }
        }
        Err(_) => Placement::Unbound,
    }
}

/// The CPUs out of `0..online` that no shard uses, given the shards' CPUs when they are pinned
/// (as many shards as CPUs or more are not: see `configs_in_process`); `None`: anywhere.
fn cpus_left_for_clients(shards: Option<&[usize]>, online: usize) -> Option<Vec<usize>> {
    let shards = shards.filter(|s| s.len() < online)?;
    let free: Vec<usize> = (0..online).filter(|cpu| !shards.contains(cpu)).collect();
    (!free.is_empty()).then_some(free)
}

fn configs_in_process(o: &ClusterBenchOptions) -> Result<Vec<Config>, String> {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    // The nodes' arenas share the locked-memory limit with the client executors: size them
    // from what the clients leave.
    let memlock = ringraft_tuning::raise_memlock().map_err(|e| format!("cannot read RLIMIT_MEMLOCK: {e}"))?;
    let clients_locked = o.clients * ringraft_tuning::RINGS_PER_EXECUTOR * CLIENT_IO_MEMORY_BYTES;
    let limit = match memlock.effective() {
        ringraft_tuning::Limit::Unlimited => ringraft_tuning::Limit::Unlimited,
        ringraft_tuning::Limit::Bytes(bytes) => {
            ringraft_tuning::Limit::Bytes(bytes.saturating_sub(clients_locked))
        }
    };
    let auto = ringraft_tuning::IoMemory::Auto(ringraft_tuning::AutoKeyword::Auto);
    let plan = ringraft_tuning::plan_io_memory(&auto, limit, o.nodes * o.shards as u64)
        .map_err(|e| e.to_string())?;
    if let Some(warning) = &plan.warning {
        eprintln!("warning: {warning}");
    }
    Ok((1..=o.nodes)
        .map(|id| {
            let mut config = Config::local_cluster(o.nodes, id);
            config.node.data_dir = o.dir.join("cluster").join(format!("node{id}"));
            config.shards.cpus = CpuList::List(shard_cpus(o.shards, online, &o.dir));
            // Several nodes (or more shards than CPUs) on one machine share CPUs: no pinning.
            config.shards.pin = o.nodes == 1 && o.shards <= online;
            config.shards.groups_per_shard = o.groups_per_shard;
            config.glommio.io_memory_bytes = ringraft_tuning::IoMemory::Bytes(plan.per_shard_bytes);
            config.glommio.spin_before_park_us = o.spin_us;
            config
        })
        .collect())
}

/// A client of whichever kind the target needs.
#[derive(Clone)]
enum BenchClient {
    InProcess(Client),
    Tcp(NetClient),
}

/// What the tasks of one client executor send through: an in-process client's [`Session`]
/// (answers a shard loop at a time, woken once per loop) or the network client's calls over
/// this executor's own connections (no thread hand-offs per request).
enum LoadClient {
    InProcess(Session),
    Tcp(ExecutorClient),
}

impl LoadClient {
    fn new(client: BenchClient, in_flight: u64) -> LoadClient {
        match client {
            BenchClient::InProcess(c) => LoadClient::InProcess(c.session(in_flight as usize)),
            BenchClient::Tcp(c) => LoadClient::Tcp(c.on_executor()),
        }
    }

    async fn put(&self, key: &[u8], value: &[u8]) -> Result<(), String> {
        match self {
            LoadClient::InProcess(c) => c.put(key, value).await.map_err(|e| e.to_string()),
            LoadClient::Tcp(c) => c.put(key, value).await.map_err(|e| e.to_string()),
        }
    }

    async fn get(&self, key: &[u8], consistency: Consistency) -> Result<(), String> {
        match self {
            LoadClient::InProcess(c) => c
                .get(key, consistency)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            LoadClient::Tcp(c) => c
                .get(key, consistency)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    }

    /// Sets `key` to `value` if it is absent (a mismatch is an answer, not an error).
    async fn compare_and_swap(&self, key: &[u8], value: &[u8]) -> Result<(), String> {
        match self {
            LoadClient::InProcess(c) => c
                .compare_and_swap(key, None, Some(value))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            LoadClient::Tcp(c) => c
                .compare_and_swap(key, None, Some(value))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    }
}

impl BenchClient {
    fn groups(&self) -> u64 {
        match self {
            BenchClient::InProcess(c) => c.groups(),
            BenchClient::Tcp(c) => c.cluster().groups,
        }
    }

    /// A read of `key` (a key of `group`: the network server checks that keys belong to their
    /// group) through the group's log: succeeds once the group has a leader.
    fn probe(&self, group: u64, key: &[u8]) -> Result<(), (bool, String)> {
        let commands = vec![Command::Get { key: key.to_vec() }];
        match self {
            BenchClient::InProcess(c) => match c.submit_blocking(group, commands) {
                Ok(_) => Ok(()),
                Err(e @ (EngineError::NotLeader { .. } | EngineError::Busy(_))) => Err((true, e.to_string())),
                Err(e) => Err((false, e.to_string())),
            },
            BenchClient::Tcp(c) => c
                .submit_blocking(group, commands)
                .map(|_| ())
                .map_err(|e| (true, e.to_string())),
        }
    }
}

/// Waits until every group answers a write-path request. Thousands of groups electing at once
/// on a small machine take a while: the deadline grows with the group count.
///
/// Groups are probed from `PROBE_THREADS` threads at once, and one pass over candidate keys
/// finds a key for every group: probing 10,000 groups one at a time, each with its own search
/// for a key, took minutes of the benchmark's start (the search alone ~50M hashes).
fn wait_for_leaders(client: &BenchClient) -> Result<(), String> {
    const PROBE_THREADS: u64 = 8;
    let groups = client.groups();
    let deadline = Instant::now() + Duration::from_secs(30) + Duration::from_millis(20 * groups);
    let keys = keys_of_every_group(groups);
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for first in 0..PROBE_THREADS.min(groups) {
            let (keys, failed) = (&keys, &failed);
            scope.spawn(move || {
                for group in (first..groups).step_by(PROBE_THREADS as usize) {
                    loop {
                        if failed.lock().unwrap().is_some() {
                            return;
                        }
                        match client.probe(group, &keys[group as usize]) {
                            Ok(()) => break,
                            Err((true, _)) if Instant::now() < deadline => {
                                std::thread::sleep(Duration::from_millis(20))
                            }
                            Err((_, error)) => {
                                let message = format!("group {group} did not elect a leader: {error}");
                                failed.lock().unwrap().get_or_insert(message);
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap() {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// A key of each of `groups` groups (`warmup-{i}`, the first that hashes there), found in one
/// pass.
fn keys_of_every_group(groups: u64) -> Vec<Vec<u8>> {
    let mut keys: Vec<Option<Vec<u8>>> = vec![None; groups as usize];
    let mut missing = groups;
    for i in 0u64.. {
        if missing == 0 {
            break;
        }
        let key = format!("warmup-{i}").into_bytes();
        let slot = &mut keys[ringraft_engine::group_of(&key, groups) as usize];
        if slot.is_none() {
            *slot = Some(key);
            missing -= 1;
        }
    }
    keys.into_iter()
        .map(|k| k.expect("every group has a key"))
        .collect()
}

/// A node process started by the benchmark.
pub(crate) struct NodeProcess {
    pub(crate) id: u64,
    child: std::process::Child,
    pub(crate) log: PathBuf,
    pub(crate) client_addr: String,
    config: PathBuf,
}

impl NodeProcess {
    /// (user + system CPU seconds, peak RSS bytes) from /proc.
    fn usage(&self) -> (f64, u64) {
        let pid = self.child.id();
        let cpu = ringraft_net::metrics::cpu_seconds(&format!("/proc/{pid}/stat"));
        let rss = crate::wal_bench::peak_rss_bytes(&format!("/proc/{pid}/status"));
        (cpu, rss)
    }

    /// `exe node --config FILE`, stderr appended to `log`.
    fn spawn(
        exe: &std::path::Path,
        config: &std::path::Path,
        log: &std::path::Path,
    ) -> Result<std::process::Child, String> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
        std::process::Command::new(exe)
            .args(["node", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))
    }

    /// SIGKILL (a crash), waiting until it is gone.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the node again with its config and data.
    pub(crate) fn restart(&mut self, exe: &std::path::Path) -> Result<(), String> {
        self.child = NodeProcess::spawn(exe, &self.config, &self.log)?;
        Ok(())
    }

    /// SIGTERM, then wait for a clean exit.
    pub(crate) fn stop(mut self) -> Result<(), String> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    return Err(format!(
                        "node {} exited with {status}; see {}",
                        self.id,
                        self.log.display()
                    ))
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!("node {} did not stop within 30 s; killed", self.id));
                }
            }
        }
    }
}

/// Writes each node's config and starts `exe node --config FILE` for it.
fn start_processes(o: &ClusterBenchOptions, exe: &std::path::Path) -> Result<Vec<NodeProcess>, String> {
    start_processes_with(o, exe, &|_| {})
}

/// [`start_processes`], with `tweak` applied to every node's config.
pub(crate) fn start_processes_with(
    o: &ClusterBenchOptions,
    exe: &std::path::Path,
    tweak: &dyn Fn(&mut Config),
) -> Result<Vec<NodeProcess>, String> {
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    let root = o.dir.join("cluster");
    std::fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    // A peer and a client port range per node, every port distinct.
    let bases = ringraft_net::ports::local_port_ranges(2 * o.nodes as usize, o.shards as u16)?;
    let nodes: Vec<_> = (1..=o.nodes)
        .zip(bases.chunks(2))
        .map(|(id, ports)| ringraft_tuning::NodeAddress {
            id,
            host: std::net::IpAddr::from([127, 0, 0, 1]),
            peer_port: ports[0],
            client_port: ports[1],
        })
        .collect();
    let mut processes = Vec::new();
    for address in &nodes {
        let mut config = Config::local_cluster(o.nodes, address.id);
        config.cluster.nodes = nodes.clone();
        config.node.data_dir = root.join(format!("node{}", address.id));
        config.node.log_level = "warn".into();
        config.shards.cpus = CpuList::List(shard_cpus(o.shards, online, &o.dir));
        config.shards.pin = o.nodes == 1 && o.shards <= online;
        config.shards.groups_per_shard = o.groups_per_shard;
        config.glommio.io_memory_bytes = IoMemory::Auto(ringraft_tuning::AutoKeyword::Auto);
        config.glommio.spin_before_park_us = o.spin_us;
        tweak(&mut config);
        let path = root.join(format!("node{}.toml", address.id));
        std::fs::write(&path, config.to_toml())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let log = root.join(format!("node{}.log", address.id));
        std::fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let child = NodeProcess::spawn(exe, &path, &log)?;
        processes.push(NodeProcess {
            id: address.id,
            child,
            log,
            client_addr: format!("127.0.0.1:{}", address.client_port),
            config: path,
        });
    }
    Ok(processes)
}

/// Connects, retrying for `wait` (nodes that were just started need a moment to listen).
pub(crate) fn net_client(seeds: &[String], wait: Duration) -> Result<NetClient, String> {
    let deadline = Instant::now() + wait;
    loop {
        match NetClient::connect(ClientConfig::new(seeds.iter().cloned())) {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() > deadline => return Err(format!("cannot reach the cluster: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Where the counters of every node come from.
enum Nodes<'a> {
    InProcess(&'a [Engine]),
    Remote(Vec<String>),
}

impl Nodes<'_> {
    fn stats(&self) -> Result<NodeStats, String> {
        let mut total = NodeStats::default();
        match self {
            Nodes::InProcess(engines) => engines.iter().for_each(|e| total.add(e.stats())),
            Nodes::Remote(addrs) => {
                for addr in addrs {
                    let stats = fetch_stats(addr, &ClientConfig::new([addr.clone()]))
                        .map_err(|e| format!("stats from {addr}: {e}"))?;
                    total.add(stats);
                }
            }
        }
        Ok(total)
    }
}

/// Starts (or connects to) the cluster, runs one load per entry of `rates` on it (`None`:
/// closed loop), stops it. One result per load.
pub fn run(o: ClusterBenchOptions, rates: &[Option<f64>]) -> Result<Vec<ClusterResult>, String> {
    let loads = |nodes: &Nodes<'_>, clients: &[BenchClient], processes: &[NodeProcess]| {
        rates
            .iter()
            .map(|&rate| {
                if let Some(rate) = rate {
                    eprintln!("open loop at {rate:.0} requests/s:");
                }
                load(
                    &ClusterBenchOptions { rate, ..o.clone() },
                    nodes,
                    clients,
                    processes,
                )
            })
            .collect::<Result<Vec<_>, String>>()
    };
    match &o.target {
        Target::InProcess => {
            let _ = std::fs::remove_dir_all(o.dir.join("cluster"));
            let configs = configs_in_process(&o)?;
            let node_config = configs[0].to_toml();
            let (engines, client) = Engine::start_in_process(configs).map_err(|e| e.to_string())?;
            let clients = vec![BenchClient::InProcess(client); o.clients as usize];
            let outcome = loads(&Nodes::InProcess(&engines), &clients, &[]);
            let mut shutdown = Ok(());
            for engine in engines {
                if let Err(error) = engine.shutdown() {
                    shutdown = Err(error);
                }
            }
            let _ = std::fs::remove_dir_all(o.dir.join("cluster"));
            let mut results = outcome?;
            shutdown?;
            for result in &mut results {
                result.transport = "inproc".into();
                result.node_config = Some(node_config.clone());
                result.rss_bytes_max = crate::wal_bench::rss_bytes_max();
            }
            Ok(results)
        }
        Target::Processes { exe } => {
            let _ = std::fs::remove_dir_all(o.dir.join("cluster"));
            let mut processes = start_processes(&o, exe)?;
            let seeds: Vec<String> = processes.iter().map(|p| p.client_addr.clone()).collect();
            let outcome = (|| {
                // Nodes open every group's state machine before they listen: thousands of
                // groups take a while on a small machine.
                let wait = Duration::from_secs(30)
                    + Duration::from_millis(10 * o.groups_per_shard * o.shards as u64);
                let clients = (0..o.clients)
                    .map(|_| net_client(&seeds, wait).map(BenchClient::Tcp))
                    .collect::<Result<Vec<_>, _>>()?;
                loads(&Nodes::Remote(seeds.clone()), &clients, &processes)
            })();
            // A node that died explains a failed run better than the client's symptom.
            let outcome = outcome.map_err(|error| {
                let mut processes_note = String::new();
                for process in &mut processes {
                    if let Ok(Some(status)) = process.child.try_wait() {
                        // The log's end says why (the file may not outlive this run's
                        // directory).
                        let log = std::fs::read_to_string(&process.log).unwrap_or_default();
                        let lines: Vec<&str> = log.lines().collect();
                        let tail = lines[lines.len().saturating_sub(5)..].join("\n    ");
                        processes_note.push_str(&format!(
                            "\nnode {} exited ({status}); its log: {}\n    {tail}",
                            process.id,
                            process.log.display()
                        ));
                    }
                }
                format!("{error}{processes_note}")
            });
            let mut stopped = Ok(());
            for process in processes {
                if let Err(e) = process.stop() {
                    stopped = stopped.and(Err(e));
                }
            }
            let mut results = outcome?;
            stopped?;
            let node_config = std::fs::read_to_string(o.dir.join("cluster").join("node1.toml")).ok();
            for result in &mut results {
                result.node_config = node_config.clone();
            }
            let _ = std::fs::remove_dir_all(o.dir.join("cluster"));
            Ok(results)
        }
        Target::Connect(seeds) => {
            let first = net_client(seeds, Duration::from_secs(2))?;
            let info = first.cluster().clone();
            let addrs: Vec<String> = info
                .members
                .iter()
                .filter_map(|m| info.address(m.id, 0))
                .collect();
            let mut clients = vec![BenchClient::Tcp(first)];
            for _ in 1..o.clients {
                clients.push(BenchClient::Tcp(net_client(seeds, Duration::from_secs(2))?));
            }
            let mut results = loads(&Nodes::Remote(addrs), &clients, &[])?;
            for result in &mut results {
                result.transport = "connect".into();
                result.nodes = info.members.len() as u64;
                result.shards_per_node = info.shards as usize;
            }
            Ok(results)
        }
    }
}

/// Histogram bounds of every latency recorded here: 1 ns to 60 s, 3 significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// One client task: draws operations and keys, paces itself in open loop, records latency.
#[allow(clippy::too_many_arguments)]
async fn client_task(
    client: Rc<LoadClient>,
    spec: LoadSpec,
    chooser: KeyChooser,
    seed: u64,
    mut pacer: Option<Pacer>,
    shared: Rc<TaskShared>,
) {
    let value = vec![0x5au8; spec.value_bytes];
    let mut k = Vec::with_capacity(spec.key_bytes);
    let mut rng = seed | 1;
    let mut draw = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // Closed loop: the next request leaves as the last answer is taken, so that answer's clock
    // reading starts the next one (one clock read per request; they were ~3% of a client's CPU).
    let mut answered_at: Option<Instant> = None;
    while !shared.stop.load(Ordering::Relaxed) {
        let intended = match pacer.as_mut() {
            Some(pacer) => {
                let at = pacer.next_intended();
                let now = Instant::now();
                if at > now {
                    glommio::timer::sleep(at - now).await;
                }
                at
            }
            None => answered_at.take().unwrap_or_else(Instant::now),
        };
        write_key(chooser.index(draw()), spec.key_bytes, &mut k);
        let result = match spec.workload.pick(draw()) {
            Op::Put => client.put(&k, &value).await,
            Op::Get => client.get(&k, spec.consistency).await,
            // Set if absent; a mismatch is a correct answer, not an error.
            Op::CompareAndSwap => client.compare_and_swap(&k, &value).await,
        };
        let done = Instant::now();
        if shared.measuring.load(Ordering::Relaxed) {
            match result {
                Ok(()) => {
                    shared.acked.fetch_add(1, Ordering::Relaxed);
                    let latency = latency_ns(intended, done);
                    // Saturates at the bounds (60 s) instead of failing.
                    shared.histogram.borrow_mut().saturating_record(latency);
                    shared.window.borrow_mut().saturating_record(latency);
                }
                Err(_) => {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if result.is_err() {
            glommio::timer::sleep(Duration::from_millis(1)).await;
        } else {
            answered_at = Some(done);
        }
    }
}

/// What the tasks of one client executor share.
struct TaskShared {
    stop: Arc<AtomicBool>,
    measuring: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    /// The whole measured window.
    histogram: RefCell<Histogram<u64>>,
    /// Since the last progress line.
    window: RefCell<Histogram<u64>>,
}

/// The workload part of the options, copied into every client executor.
#[derive(Clone, Copy, Debug)]
struct LoadSpec {
    workload: Workload,
    consistency: Consistency,
    key_bytes: usize,
    value_bytes: usize,
}

fn load(
    o: &ClusterBenchOptions,
    nodes: &Nodes<'_>,
    clients: &[BenchClient],
    processes: &[NodeProcess],
) -> Result<ClusterResult, String> {
    wait_for_leaders(&clients[0])?;
    let acked = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let (windows_tx, windows) = flume::unbounded::<Histogram<u64>>();
    let spec = LoadSpec {
        workload: o.workload,
        consistency: o.read_consistency,
        key_bytes: o.key_bytes,
        value_bytes: o.value_bytes,
    };
    // Built once: the zipfian constants take a pass over every key.
    let chooser = KeyChooser::new(o.keys, o.distribution);
    let senders = clients.len() as u64 * o.in_flight;
    // Open loop: every task sends at rate / tasks, the tasks spread over one interval.
    let interval = o.rate.map(|rate| Duration::from_secs_f64(senders as f64 / rate));
    let schedule_start = Instant::now() + Duration::from_millis(20);
    let placement = client_placement(o);
    let mut executors = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        let c = c as u64;
        let (client, measuring, stop, errors, acked, windows_tx) = (
            client.clone(),
            measuring.clone(),
            stop.clone(),
            errors.clone(),
            acked.clone(),
            windows_tx.clone(),
        );
        let in_flight = o.in_flight;
        let chooser = chooser.clone();
        let handle = LocalExecutorBuilder::new(placement.clone())
            .name(&format!("ringraft-bench-client-{c}"))
            .io_memory(CLIENT_IO_MEMORY_BYTES as usize)
            .spawn(move || async move {
                let shared = Rc::new(TaskShared {
                    stop,
                    measuring,
                    acked,
                    errors,
                    histogram: RefCell::new(latency_histogram()),
                    window: RefCell::new(latency_histogram()),
                });
                // Hands the last second's latencies to the progress line.
                let reporter = {
                    let shared = shared.clone();
                    glommio::spawn_local(async move {
                        while !shared.stop.load(Ordering::Relaxed) {
                            glommio::timer::sleep(Duration::from_millis(250)).await;
                            let window =
                                std::mem::replace(&mut *shared.window.borrow_mut(), latency_histogram());
                            let _ = windows_tx.send(window);
                        }
                    })
                };
                let client = Rc::new(LoadClient::new(client, in_flight));
                let mut tasks = Vec::new();
                for t in 0..in_flight {
                    let sender = c * in_flight + t;
                    let pacer = interval.map(|interval| {
                        let offset = interval.mul_f64(sender as f64 / senders as f64);
                        Pacer::new(schedule_start, interval, offset)
                    });
                    let seed = (c << 32) ^ (t << 16) ^ 0x9E37_79B9;
                    tasks.push(glommio::spawn_local(client_task(
                        client.clone(),
                        spec,
                        chooser.clone(),
                        seed,
                        pacer,
                        shared.clone(),
                    )));
                }
                for task in tasks {
                    task.await;
                }
                reporter.await;
                let histogram = shared.histogram.borrow().clone();
                histogram
            })
            .map_err(|e| format!("cannot start a client executor: {e}"))?;
        executors.push(handle);
    }
    drop(windows_tx);
    std::thread::sleep(o.warmup);
    let before = nodes.stats()?;
    let usage_before: Vec<(f64, u64)> = processes.iter().map(NodeProcess::usage).collect();
    let _ = windows.drain();
    measuring.store(true, Ordering::Relaxed);
    let start = Instant::now();
    // A progress line per second on stderr: acknowledged operations, p99 and errors in that
    // second.
    let mut last = (0u64, 0u64);
    let done = || start.elapsed() >= o.duration || o.ops.is_some_and(|n| acked.load(Ordering::Relaxed) >= n);
    let mut next_line = Duration::from_secs(1);
    let mut so_far = latency_histogram();
    while !done() {
        // Fine steps, so an --ops bound ends the window promptly.
        std::thread::sleep(Duration::from_millis(10));
        if start.elapsed() < next_line && !done() {
            continue;
        }
        next_line += Duration::from_secs(1);
        let now = (acked.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
        let mut window = latency_histogram();
        for part in windows.drain() {
            let _ = window.add(&part);
        }
        let _ = so_far.add(&window);
        eprintln!(
            "  {:>5.1} s  {:>9} ops  p99 {:>8.0} us (so far {:>8.0} us)  {:>5} errors",
            start.elapsed().as_secs_f64(),
            now.0 - last.0,
            window.value_at_quantile(0.99) as f64 / 1000.0,
            so_far.value_at_quantile(0.99) as f64 / 1000.0,
            now.1 - last.1
        );
        last = now;
    }
    measuring.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    let after = nodes.stats()?;
    let usage_after: Vec<(f64, u64)> = processes.iter().map(NodeProcess::usage).collect();
    stop.store(true, Ordering::Relaxed);
    let mut histogram = latency_histogram();
    for handle in executors {
        let part = handle
            .join()
            .map_err(|e| format!("client executor failed: {e:?}"))?;
        histogram.add(&part).map_err(|e| e.to_string())?;
    }
    let ops = histogram.len();
    let proposals = after.proposals - before.proposals;
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let node_cpu_percent: Vec<f64> = usage_before
        .iter()
        .zip(&usage_after)
        .map(|(b, a)| (a.0 - b.0) / elapsed * 100.0)
        .collect();
    let node_rss_bytes_max: Vec<u64> = usage_after.iter().map(|u| u.1).collect();
    Ok(ClusterResult {
        transport: "tcp".into(),
        workload: o.workload,
        distribution: o.distribution,
        read_consistency: match o.read_consistency {
            Consistency::Linearizable => "linearizable".into(),
            Consistency::Local => "local".into(),
            Consistency::Lease => "lease".into(),
        },
        target_rate_per_s: o.rate,
        nodes: o.nodes,
        shards_per_node: o.shards,
        groups: clients[0].groups(),
        clients: o.clients,
        in_flight: o.in_flight,
        key_bytes: o.key_bytes,
        value_bytes: o.value_bytes,
        duration_s: elapsed,
        ops,
        ops_per_s: ops as f64 / elapsed,
        histogram: histogram.clone(),
        node_config: None,
        latency_us_p50: us(0.5),
        latency_us_p99: us(0.99),
        latency_us_p999: us(0.999),
        latency_us_max: histogram.max() as f64 / 1000.0,
        commands_per_entry_mean: if proposals == 0 {
            0.0
        } else {
            (after.commands_proposed - before.commands_proposed) as f64 / proposals as f64
        },
        syncs_per_s: (after.wal_writes - before.wal_writes) as f64 / elapsed,
        rss_bytes_max: node_rss_bytes_max.iter().copied().max().unwrap_or(0),
        node_cpu_percent,
        node_rss_bytes_max,
        errors: errors.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::{cpus_interrupts_first, cpus_left_for_clients, keys_of_every_group};

    #[test]
    fn every_group_gets_a_key_of_its_own() {
        for groups in [1, 3, 1000] {
            let keys = keys_of_every_group(groups);
            assert_eq!(keys.len() as u64, groups);
            for (group, key) in keys.iter().enumerate() {
                assert_eq!(ringraft_engine::group_of(key, groups), group as u64);
            }
        }
    }

    #[test]
    fn clients_run_where_pinned_shards_leave_cpus() {
        // One shard on CPU 1 of 2 (its disk interrupts there): clients on CPU 0.
        assert_eq!(cpus_left_for_clients(Some(&[1]), 2), Some(vec![0]));
        assert_eq!(cpus_left_for_clients(Some(&[0, 2]), 4), Some(vec![1, 3]));
        // As many shards as CPUs (not pinned), several nodes, one CPU: anywhere.
        assert_eq!(cpus_left_for_clients(Some(&[0, 1]), 2), None);
        assert_eq!(cpus_left_for_clients(None, 2), None);
        assert_eq!(cpus_left_for_clients(Some(&[0]), 1), None);
    }

    #[test]
    fn shards_go_to_the_interrupted_cpus_first_then_the_rest_wrapping() {
        assert_eq!(cpus_interrupts_first(1, 2, &[1]), vec![1]);
        assert_eq!(cpus_interrupts_first(3, 2, &[1]), vec![1, 0, 1]);
        assert_eq!(cpus_interrupts_first(4, 4, &[2, 3]), vec![2, 3, 0, 1]);
        // Unknown or offline interrupt CPUs change nothing.
        assert_eq!(cpus_interrupts_first(2, 2, &[]), vec![0, 1]);
        assert_eq!(cpus_interrupts_first(2, 2, &[5]), vec![0, 1]);
    }
}
