//! Parsing, defaults, the examples, every validation rule (one test each, asserting the message
//! names the key), environment overrides and the effective-config round trip.

use ringraft_tuning::{validate, AddressBookChange, Config, ConfigErrors, CpuList, Topology};

fn two_cpus() -> Topology {
    Topology::synthetic(2, false, 1)
}

fn parse(text: &str) -> Config {
    Config::from_toml(text).unwrap_or_else(|e| panic!("{e}"))
}

/// Validates `text` on a 2-CPU machine and returns the errors, which must name `key`.
fn errors_naming(text: &str, key: &str) -> ConfigErrors {
    let errors = validate(&parse(text), &two_cpus()).expect_err("the config must be rejected");
    assert!(errors.names(key), "no error names {key}: {errors}");
    let shown = errors.to_string();
    assert!(shown.contains(key) && shown.contains("Fix:"), "{shown}");
    errors
}

#[test]
fn empty_file_gives_the_defaults_and_they_validate() {
    let config = parse("");
    assert_eq!(config, Config::default());
    validate(&config, &two_cpus()).unwrap();
    validate(&config, &Topology::detect()).unwrap();
    assert_eq!(
        config.shards.cpus,
        CpuList::Auto(ringraft_tuning::AutoKeyword::Auto)
    );
    assert_eq!(config.shards.groups_per_shard, 1);
    assert_eq!(config.raft.election_ticks(), 50);
    assert_eq!(config.raft.heartbeat_ticks(), 5);
    assert!(config.raft.pre_vote && config.raft.check_quorum);
}

#[test]
fn every_example_parses_and_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        // The server example is for 16-core SMT machines; the others run anywhere.
        let topology = if path.ends_with("three-servers-16-cores.toml") {
            Topology::synthetic(16, true, 1)
        } else {
            two_cpus()
        };
        validate(&config, &topology).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        seen += 1;
    }
    assert_eq!(seen, 3);
}

#[test]
fn server_example_matches_the_recommendation_for_its_machine() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/three-servers-16-cores.toml");
    let config = Config::load(&path).unwrap();
    let recommended = ringraft_tuning::recommend(
        &Topology::synthetic(16, true, 1),
        ringraft_tuning::Limit::Unlimited,
    );
    assert_eq!(config.shards.cpus, CpuList::List(recommended.cpus));
}

#[test]
fn local_cluster_helper_validates_for_every_node() {
    for id in 1..=3 {
        let config = Config::local_cluster(3, id);
        validate(&config, &two_cpus()).unwrap();
        assert_eq!(config.this_node().unwrap().id, id);
    }
}

#[test]
fn added_and_removed_nodes_are_the_only_cluster_changes_a_running_node_takes() {
    let mut running = Config::local_cluster(3, 1);
    running.cluster.initial_voters = vec![1, 2, 3];
    let four = Config::local_cluster(4, 1).cluster.nodes[3].clone();
    let mut new = running.clone();
    assert_eq!(
        running.address_book_change(&new),
        Ok(AddressBookChange::default())
    );
    new.cluster.nodes.push(four.clone());
    new.wal.segment_bytes *= 2; // outside `cluster`: not this function's concern
    let change = running.address_book_change(&new).unwrap();
    assert_eq!((change.added, change.removed), (vec![four.clone()], vec![]));

    let refused = |change: &dyn Fn(&mut Config), says: &str| {
        let mut other = new.clone();
        change(&mut other);
        let why = running.address_book_change(&other).expect_err(says);
        assert!(why.contains(says), "{why:?} does not say {says:?}");
    };
    refused(
        &|c| c.cluster.nodes[1].client_port += 1,
        "node 2's address changes",
    );
    refused(
        &|c| c.cluster.nodes.retain(|n| n.id != 1),
        "this node (1) is no longer listed",
    );
    refused(&|c| c.cluster.id = 9, "cluster.id changes from 1 to 9");
    refused(&|c| c.cluster.key = Some("k".into()), "cluster.key changes");
    refused(
        &|c| c.cluster.initial_voters = vec![1, 2, 3, 4],
        "initial voters change",
    );
    // A removed node leaves the initial voters with it, and only it.
    refused(
        &|c| c.cluster.nodes.retain(|n| n.id != 2),
        "initial voters change",
    );
    let mut without_two = new.clone();
    without_two.cluster.nodes.retain(|n| n.id != 2);
    without_two.cluster.initial_voters = vec![1, 3];
    let change = running.address_book_change(&without_two).unwrap();
    assert_eq!((change.added, change.removed), (vec![four], vec![2]));
    refused(
        &|c| {
            c.cluster.nodes.retain(|n| n.id != 2);
            c.cluster.initial_voters = vec![1];
        },
        "initial voters change",
    );
    // Left empty, the initial voters are every listed node: adding one changes them, removing
    // one changes them only by itself.
    running.cluster.initial_voters.clear();
    new.cluster.initial_voters.clear();
    let why = running.address_book_change(&new).unwrap_err();
    assert!(why.contains("list the original voters"), "{why}");
    let mut fewer = running.clone();
    fewer.cluster.nodes.retain(|n| n.id != 3);
    assert_eq!(running.address_book_change(&fewer).unwrap().removed, vec![3]);
}

#[test]
fn effective_config_round_trips() {
    let mut config = Config::local_cluster(3, 2);
    config.shards.cpus = CpuList::List(vec![1]);
    config.cluster.key = Some("secret".into());
    assert_eq!(parse(&config.to_toml()), config);
    assert!(config.to_toml().contains("cpus = [1]"));
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let error = Config::from_toml("[wal]\nsegmnt_bytes = 4096\n").unwrap_err();
    assert_eq!(error.key, "segmnt_bytes");
    assert!(error.to_string().contains("line 2"), "{error}");
    let error = Config::from_toml("[wall]\n").unwrap_err();
    assert_eq!(error.key, "wall");
}

#[test]
fn wrong_type_is_an_error_saying_what_is_expected() {
    let error = Config::from_toml("[shards]\ncpus = \"all\"\n").unwrap_err();
    assert!(error.problem.contains("\"auto\""), "{error}");
    let error = Config::from_toml("[wal]\nsync_mode = \"sometimes\"\n").unwrap_err();
    assert!(error.problem.contains("dsync"), "{error}");
}

#[test]
fn load_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, "[raft]\ntick_interval = 5\n").unwrap();
    let error = Config::load(&path).unwrap_err().to_string();
    assert!(
        error.contains("node.toml") && error.contains("tick_interval"),
        "{error}"
    );
}

#[test]
fn environment_overrides_node_id_and_data_dir() {
    let mut config = Config::local_cluster(3, 1);
    config
        .apply_env(|name| match name {
            "RINGRAFT_NODE_ID" => Some("3".into()),
            "RINGRAFT_DATA_DIR" => Some("/tmp/n3".into()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (config.node.id, config.node.data_dir.to_str().unwrap()),
        (3, "/tmp/n3")
    );
    let error = config
        .apply_env(|name| (name == "RINGRAFT_NODE_ID").then(|| "three".into()))
        .unwrap_err();
    assert_eq!(error.key, "node.id");
    assert!(error.problem.contains("RINGRAFT_NODE_ID"));
}

#[test]
fn cpu_not_online_is_rejected() {
    errors_naming("[shards]\ncpus = [0, 5]\n", "shards.cpus");
}

#[test]
fn cpu_listed_twice_is_rejected() {
    let errors = errors_naming("[shards]\ncpus = [1, 1]\n", "shards.cpus");
    assert!(errors.to_string().contains("listed twice"));
}

#[test]
fn empty_cpu_list_is_rejected() {
    errors_naming("[shards]\ncpus = []\n", "shards.cpus");
}

#[test]
fn node_missing_from_cluster_is_rejected() {
    errors_naming("[node]\nid = 9\n", "node.id");
}

#[test]
fn node_id_zero_is_rejected() {
    errors_naming("[node]\nid = 0\n[cluster]\nnodes = [{ id = 0, host = \"127.0.0.1\", peer_port = 1000, client_port = 2000 }]\n", "node.id");
}

#[test]
fn duplicate_node_ids_are_rejected() {
    errors_naming(
        "[cluster]\nnodes = [{ id = 1, host = \"127.0.0.1\", peer_port = 1000, client_port = 2000 }, \
         { id = 1, host = \"127.0.0.2\", peer_port = 1000, client_port = 2000 }]\n",
        "cluster.nodes",
    );
}

#[test]
fn colliding_ports_are_rejected() {
    // Two shards: node 1 uses peer ports 7400-7401, node 2's client ports start at 7401.
    let errors = errors_naming(
        "[shards]\ncpus = [0, 1]\n[cluster]\nnodes = [{ id = 1, host = \"127.0.0.1\", peer_port = 7400, client_port = 7500 }, \
         { id = 2, host = \"127.0.0.1\", peer_port = 7600, client_port = 7401 }]\n",
        "cluster.nodes",
    );
    assert!(errors.to_string().contains("collide"), "{errors}");
    // The same ports on different hosts are fine.
    let config = parse(
        "[cluster]\nnodes = [{ id = 1, host = \"127.0.0.1\", peer_port = 7400, client_port = 7500 }, \
         { id = 2, host = \"127.0.0.2\", peer_port = 7400, client_port = 7500 }]\n",
    );
    validate(&config, &two_cpus()).unwrap();
}

#[test]
fn ports_past_65535_are_rejected() {
    errors_naming(
        "[shards]\ncpus = [0, 1]\n[cluster]\nnodes = [{ id = 1, host = \"127.0.0.1\", peer_port = 65535, client_port = 7500 }]\n",
        "cluster.nodes",
    );
}

#[test]
fn a_limit_of_zero_is_rejected_naming_the_key() {
    for (section, key) in [
        ("shards", "groups_per_shard"),
        ("batching", "entry_commands_max"),
        ("wal", "cache_bytes"),
        ("wal", "live_segments_max"),
        ("sm", "checkpoint_interval_ms"),
        ("sm", "checkpoint_log_bytes"),
        ("sm", "data_file_bytes"),
        ("raft", "max_inflight_msgs"),
        ("raft", "max_uncommitted_bytes"),
        ("glommio", "ring_depth"),
        ("limits", "key_bytes_max"),
        ("limits", "client_queue_depth"),
        ("limits", "group_queue_bytes_max"),
        ("limits", "peer_queue_messages"),
        ("limits", "request_timeout_ms"),
    ] {
        errors_naming(&format!("[{section}]\n{key} = 0\n"), &format!("{section}.{key}"));
    }
}

#[test]
fn segment_size_not_a_multiple_of_4k_is_rejected() {
    errors_naming("[wal]\nsegment_bytes = 67108865\n", "wal.segment_bytes");
}

#[test]
fn wal_batch_not_fitting_a_segment_is_rejected() {
    errors_naming(
        "[wal]\nsegment_bytes = 1048576\nbatch_bytes_max = 1048576\n",
        "wal.batch_bytes_max",
    );
    errors_naming("[wal]\nbatch_bytes_max = 2097153\n", "wal.batch_bytes_max");
}

#[test]
fn entry_larger_than_a_wal_batch_is_rejected() {
    errors_naming("[wal]\nbatch_bytes_max = 1048576\n", "batching.entry_bytes_max");
}

#[test]
fn tick_longer_than_election_timeout_is_rejected() {
    errors_naming(
        "[raft]\ntick_interval_ms = 1000\nelection_timeout_ms = 500\n",
        "raft.tick_interval_ms",
    );
}

#[test]
fn heartbeat_not_below_election_timeout_is_rejected() {
    errors_naming(
        "[raft]\nheartbeat_interval_ms = 500\n",
        "raft.heartbeat_interval_ms",
    );
}

#[test]
fn largest_command_not_fitting_an_entry_is_rejected() {
    errors_naming("[limits]\nvalue_bytes_max = 2000000\n", "limits.value_bytes_max");
}

#[test]
fn frame_smaller_than_an_entry_is_rejected() {
    errors_naming("[limits]\nframe_bytes_max = 1048576\n", "limits.frame_bytes_max");
}

#[test]
fn raft_message_larger_than_a_frame_is_rejected() {
    errors_naming(
        "[raft]\nmax_size_per_msg_bytes = 16000000\n",
        "raft.max_size_per_msg_bytes",
    );
}

#[test]
fn non_loopback_listen_without_cluster_key_is_rejected() {
    errors_naming("[node]\nlisten_host = \"0.0.0.0\"\n", "cluster.key");
    let config = parse("[node]\nlisten_host = \"0.0.0.0\"\n[cluster]\nkey = \"k\"\n");
    validate(&config, &two_cpus()).unwrap();
}

#[test]
fn ring_depth_above_io_uring_limit_is_rejected() {
    errors_naming("[glommio]\nring_depth = 65536\n", "glommio.ring_depth");
}

#[test]
fn spinning_needs_pinned_shards_and_a_bounded_time() {
    let errors = errors_naming(
        "[shards]\npin = false\n[glommio]\nspin_before_park_us = 200\n",
        "glommio.spin_before_park_us",
    );
    assert!(errors.to_string().contains("shards.pin"), "{errors}");
    errors_naming(
        "[glommio]\nspin_before_park_us = 10001\n",
        "glommio.spin_before_park_us",
    );
    let pinned = parse("[glommio]\nspin_before_park_us = 10000\n");
    validate(&pinned, &two_cpus()).unwrap();
    assert_eq!(pinned.glommio.spin_before_park_us, 10_000);
}

#[test]
fn explicit_io_memory_must_be_whole_blocks_of_the_minimum() {
    errors_naming("[glommio]\nio_memory_bytes = 1000\n", "glommio.io_memory_bytes");
    validate(&parse("[glommio]\nio_memory_bytes = 16777216\n"), &two_cpus()).unwrap();
}

#[test]
fn all_problems_are_reported_at_once() {
    let errors = validate(
        &parse("[wal]\nsegment_bytes = 5\n[limits]\nclient_queue_depth = 0\n"),
        &two_cpus(),
    )
    .unwrap_err();
    assert!(
        errors.names("wal.segment_bytes") && errors.names("limits.client_queue_depth"),
        "{errors}"
    );
}
