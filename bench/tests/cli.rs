//! The benchmark's command line: argument validation gives clear errors, and the JSON keys stay
//! stable (a short real run on a temporary directory, with tiny limits).

use std::process::Command;

/// Tests that start clusters take turns: on a 2-core machine a catch-up run next to an open-loop
/// sweep starves the sweep below the rate it must reach.
static CLUSTERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_cluster_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    CLUSTERS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringraft-bench"))
}

fn stderr_of(args: &[&str]) -> String {
    let output = bench().args(args).output().expect("run ringraft-bench");
    assert!(!output.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn help_explains_every_wal_option() {
    let output = bench().args(["wal", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for option in [
        "--dir",
        "--groups",
        "--writers",
        "--payload-bytes",
        "--duration-s",
        "--sync-mode",
        "--json",
        "--no-probe",
    ] {
        assert!(help.contains(option), "help lacks {option}:\n{help}");
    }
}

#[test]
fn bad_arguments_are_clear_errors() {
    assert!(stderr_of(&["wal", "--writers", "0"]).contains("--writers"));
    assert!(stderr_of(&["wal", "--duration-s", "0"]).contains("--duration-s"));
    assert!(stderr_of(&["wal", "--sync-mode", "sometimes"]).contains("dsync"));
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().to_str().unwrap();
    let error = stderr_of(&[
        "wal",
        "--dir",
        dir,
        "--no-probe",
        "--payload-bytes",
        "2000000",
        "--batch-kib",
        "64",
    ]);
    assert!(error.contains("--payload-bytes"), "{error}");
    let error = stderr_of(&[
        "wal",
        "--dir",
        dir,
        "--no-probe",
        "--segment-mib",
        "1",
        "--batch-kib",
        "2048",
    ]);
    assert!(error.contains("wal.batch_bytes_max"), "{error}");
    let error = stderr_of(&["wal", "--dir", dir, "--no-probe", "--cpu", "4096"]);
    assert!(error.contains("not an online CPU"), "{error}");
    let error = stderr_of(&[
        "wal",
        "--dir",
        dir,
        "--no-probe",
        "--unpinned",
        "--spin-us",
        "100",
    ]);
    assert!(error.contains("--spin-us needs a pinned executor"), "{error}");
    let error = stderr_of(&["wal", "--dir", dir, "--no-probe", "--unpinned", "--cpu", "0"]);
    assert!(error.contains("--unpinned") && error.contains("--cpu"), "{error}");
    let error = stderr_of(&[
        "wal",
        "--dir",
        dir,
        "--no-probe",
        "--cpu",
        "0",
        "--spin-us",
        "10001",
    ]);
    assert!(error.contains("--spin-us"), "{error}");
    assert!(stderr_of(&["cluster", "--zipf-theta", "1.5"]).contains("--zipf-theta"));
    assert!(stderr_of(&["cluster", "--rate", "0"]).contains("--rate"));
    assert!(stderr_of(&["cluster", "--workload", "everything"]).contains("read-heavy"));
    let error = stderr_of(&["cluster", "--rate", "10", "--sweep-rates", "5,10"]);
    assert!(error.contains("--sweep-rates"), "{error}");
    let error = stderr_of(&["compare", "/nonexistent/a.json", "/nonexistent/b.json"]);
    assert!(error.contains("cannot read /nonexistent/a.json"), "{error}");
    let error = stderr_of(&["cluster", "--connect", "127.0.0.1:1", "--transport", "inproc"]);
    assert!(
        error.contains("--transport") && error.contains("--connect"),
        "{error}"
    );
    let error = stderr_of(&[
        "cluster",
        "--dir",
        dir,
        "--connect",
        "127.0.0.1:1",
        "--duration-s",
        "0.1",
    ]);
    assert!(error.contains("cannot reach the cluster"), "{error}");
}

/// Runs the command, requires success and one JSON object on stdout.
fn json_of(command: &mut Command) -> serde_json::Value {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON object on stdout")
}

fn keys(value: &serde_json::Value) -> Vec<String> {
    let mut keys: Vec<String> = value.as_object().expect("object").keys().cloned().collect();
    keys.sort();
    keys
}

#[test]
fn wal_json_keys_are_stable() {
    let dir = tempfile::tempdir().unwrap();
    let json = json_of(
        bench()
            .args(["wal", "--dir", dir.path().to_str().unwrap(), "--json"])
            .args([
                "--duration-s",
                "0.3",
                "--warmup-s",
                "0.1",
                "--writers",
                "4",
                "--groups",
                "2",
            ])
            .args([
                "--probe-seconds",
                "0.05",
                "--probe-file-mib",
                "4",
                "--segment-mib",
                "1",
                "--batch-kib",
                "64",
            ]),
    );
    assert_eq!(keys(&json), ["command", "disk", "machine", "wal", "wal_runs"]);
    for size in ["4k", "64k", "1m"] {
        let method = &json["disk"][format!("durable_method_{size}")];
        assert!(method == "dsync" || method == "fdatasync", "{method}");
    }
    assert_eq!(
        keys(&json["disk"]),
        [
            "durable_method_1m",
            "durable_method_4k",
            "durable_method_64k",
            "file_bytes",
            "seconds_per_test",
            "sequential_mb_per_s",
            "write_1m_latency_us_p50",
            "write_1m_latency_us_p99",
            "write_1m_mb_per_s",
            "write_1m_rounds_per_s",
            "write_4k_latency_us_p50",
            "write_4k_latency_us_p99",
            "write_4k_rounds_per_s",
            "write_64k_latency_us_p50",
            "write_64k_latency_us_p99",
            "write_64k_mb_per_s",
            "write_64k_rounds_per_s",
        ]
    );
    assert_eq!(
        keys(&json["wal"]),
        [
            "cpu",
            "disk",
            "disk_after",
            "duration_s",
            "entries",
            "entries_per_s",
            "entries_per_sync_mean",
            "groups",
            "io_memory_bytes",
            "latency_p50_vs_probe_4k_p50",
            "latency_us_max",
            "latency_us_p50",
            "latency_us_p99",
            "latency_us_p999",
            "mb_per_s",
            "mb_per_s_vs_probe_1m",
            "payload_bytes",
            "recovery_mb_per_s",
            "recovery_s",
            "rss_bytes_max",
            "segment_files",
            "spin_before_park_us",
            "sync_mode",
            "syncs_per_s",
            "write_bytes_mean",
            "writers",
        ]
    );
    assert_eq!(
        keys(&json["machine"]),
        [
            "cpu_model",
            "cpus_online",
            "date_unix_s",
            "disk",
            "disk_interrupt_cpus",
            "kernel",
            "memory_bytes",
            "ringraft_version"
        ]
    );
    assert_eq!(
        json["wal_runs"].as_array().unwrap().len(),
        2,
        "both sync modes by default"
    );
    let wal = &json["wal"];
    assert!(wal["entries"].as_u64().unwrap() > 0, "the run made progress");
    assert!(wal["entries_per_sync_mean"].as_f64().unwrap() >= 1.0);
    assert_eq!(
        wal["disk"], json["disk"],
        "the wal object carries the same run's probe"
    );
    // Probed again after the run; the ratios are against both probes' mean.
    let after = &wal["disk_after"];
    assert!(after.is_object(), "no probe after the run: {after}");
    let mean = |key: &str| (json["disk"][key].as_f64().unwrap() + after[key].as_f64().unwrap()) / 2.0;
    let p50 = wal["latency_us_p50"].as_f64().unwrap() / mean("write_4k_latency_us_p50");
    assert!((wal["latency_p50_vs_probe_4k_p50"].as_f64().unwrap() - p50).abs() < 1e-9);
    let bandwidth = wal["mb_per_s"].as_f64().unwrap() / mean("write_1m_mb_per_s");
    assert!((wal["mb_per_s_vs_probe_1m"].as_f64().unwrap() - bandwidth).abs() < 1e-9);
}

#[test]
fn sm_json_keys_are_stable() {
    let dir = tempfile::tempdir().unwrap();
    let json = json_of(
        bench()
            .args(["sm", "--dir", dir.path().to_str().unwrap(), "--json"])
            .args([
                "--duration-s",
                "0.3",
                "--checkpoint-interval-s",
                "0.1",
                "--batch-commands",
                "64",
                "--keys",
                "1000",
            ]),
    );
    assert_eq!(keys(&json), ["command", "machine", "sm"]);
    assert_eq!(
        keys(&json["sm"]),
        [
            "batch_commands",
            "batches_per_s",
            "checkpoint_ms_max",
            "checkpoints",
            "commands_per_s",
            "duration_s",
            "key_bytes",
            "keys",
            "mixed_commands_per_s",
            "reads_per_s",
            "rss_bytes_max",
            "snapshot_ms",
            "value_bytes",
        ]
    );
    assert!(json["sm"]["commands_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        json["sm"]["checkpoints"].as_u64().unwrap() >= 1,
        "checkpoints ran"
    );
}

#[test]
fn cluster_json_keys_are_stable() {
    let _turn = one_cluster_at_a_time();
    // In-process (one node) and the default: three node processes over TCP.
    for (transport, nodes) in [("inproc", "1"), ("tcp", "3")] {
        let dir = tempfile::tempdir().unwrap();
        let output = bench()
            .args([
                "cluster",
                "--dir",
                dir.path().to_str().unwrap(),
                "--json",
                "--no-probe",
            ])
            .args(["--transport", transport, "--nodes", nodes])
            .args(["--duration-s", "0.5", "--warmup-s", "0.2", "--clients", "1"])
            .args(["--in-flight", "4", "--keys", "100"])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{transport}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let json: serde_json::Value =
            serde_json::from_slice(&output.stdout).expect("one JSON object on stdout");
        assert_eq!(
            keys(&json),
            ["cluster", "command", "disk", "machine", "syncs_to_probe_ratio"]
        );
        assert_eq!(
            keys(&json["cluster"]),
            [
                "clients",
                "commands_per_entry_mean",
                "distribution",
                "duration_s",
                "errors",
                "groups",
                "in_flight",
                "key_bytes",
                "latency_us_max",
                "latency_us_p50",
                "latency_us_p99",
                "latency_us_p999",
                "node_config",
                "node_cpu_percent",
                "node_rss_bytes_max",
                "nodes",
                "ops",
                "ops_per_s",
                "read_consistency",
                "rss_bytes_max",
                "shards_per_node",
                "syncs_per_s",
                "target_rate_per_s",
                "transport",
                "value_bytes",
                "workload",
            ]
        );
        assert_eq!(json["cluster"]["transport"], transport);
        let config = json["cluster"]["node_config"]
            .as_str()
            .expect("the node config is recorded");
        assert!(config.contains("[shards]") && config.contains("cpus"), "{config}");
        assert!(
            json["cluster"]["ops"].as_u64().unwrap() > 0,
            "{transport}: puts were acknowledged"
        );
        let per_node = json["cluster"]["node_cpu_percent"].as_array().unwrap().len();
        assert_eq!(per_node, if transport == "tcp" { 3 } else { 0 });
    }
}

/// An open-loop sweep with a mixed zipfian workload in process, its histogram and plot, and a
/// comparison of two results.
#[test]
fn sweep_plot_histogram_and_compare() {
    let _turn = one_cluster_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (plot, hist) = (d.join("lat.svg"), d.join("lat.hdr"));
    let output = bench()
        .args(["cluster", "--dir", d.to_str().unwrap(), "--json", "--no-probe"])
        .args([
            "--transport",
            "inproc",
            "--nodes",
            "1",
            "--clients",
            "1",
            "--in-flight",
            "4",
        ])
        .args(["--duration-s", "0.5", "--warmup-s", "0.2", "--keys", "1000"])
        .args([
            "--workload",
            "mixed",
            "--distribution",
            "zipfian",
            "--sweep-rates",
            "200,400",
        ])
        .args([
            "--plot",
            plot.to_str().unwrap(),
            "--hist-out",
            hist.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        keys(&json),
        [
            "cluster",
            "command",
            "disk",
            "machine",
            "sweep",
            "sweep_best_rate_per_s",
            "sweep_p99_bound_ms",
            "syncs_to_probe_ratio"
        ]
    );
    let sweep = json["sweep"].as_array().unwrap();
    assert_eq!(sweep.len(), 2);
    for (run, rate) in sweep.iter().zip([200.0, 400.0]) {
        assert_eq!(run["target_rate_per_s"].as_f64(), Some(rate));
        assert_eq!(run["workload"], "mixed");
        assert_eq!(run["distribution"]["kind"], "zipfian");
        // An open loop never sends faster than its rate (give or take the window's edges). It
        // may fall behind when the machine cannot keep up: this run shares a loaded 2-core CI
        // machine with the other tests of this file (a WAL run and a disk probe among them),
        // and once measured 90 ops/s at 200/s that way.
        let ops = run["ops_per_s"].as_f64().unwrap();
        assert!(ops > 0.0 && ops < rate * 1.5, "{ops} ops/s at {rate}/s");
    }
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));
    assert!(
        std::fs::read_to_string(&hist).unwrap().contains("HISTFAAA"),
        "a V2 deflate histogram"
    );

    let (a, b) = (d.join("a.json"), d.join("b.json"));
    std::fs::write(&a, &output.stdout).unwrap();
    let mut other = json.clone();
    other["cluster"]["ops_per_s"] = serde_json::json!(json["cluster"]["ops_per_s"].as_f64().unwrap() * 2.0);
    std::fs::write(&b, other.to_string()).unwrap();
    let output = bench()
        .args(["compare", a.to_str().unwrap(), b.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(output.status.success());
    let table = String::from_utf8_lossy(&output.stdout);
    let line = table
        .lines()
        .find(|l| l.starts_with("cluster.ops_per_s "))
        .expect(&table);
    assert!(line.trim_end().ends_with("2.00"), "{line}");
}

#[test]
fn scale_runs_each_shard_and_group_count() {
    let _turn = one_cluster_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let output = bench()
        .args([
            "scale",
            "--dir",
            dir.path().to_str().unwrap(),
            "--json",
            "--no-probe",
        ])
        .args([
            "--transport",
            "inproc",
            "--nodes",
            "1",
            "--clients",
            "1",
            "--in-flight",
            "4",
        ])
        .args(["--duration-s", "0.3", "--warmup-s", "0.1", "--keys", "100"])
        .args(["--shards-list", "1,2", "--groups-list", "2,3"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(keys(&json), ["command", "machine", "scale"]);
    let runs: Vec<(u64, u64)> = json["scale"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["shards_per_node"].as_u64().unwrap(),
                r["groups"].as_u64().unwrap(),
            )
        })
        .collect();
    // 3 groups do not divide over 2 shards: skipped.
    assert_eq!(runs, [(1, 2), (1, 3), (2, 2)]);
    assert!(json["scale"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["ops"].as_u64().unwrap() > 0));
}

#[test]
fn an_op_count_bounds_the_measured_window() {
    let _turn = one_cluster_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let output = bench()
        .args([
            "cluster",
            "--dir",
            dir.path().to_str().unwrap(),
            "--json",
            "--no-probe",
        ])
        .args([
            "--transport",
            "inproc",
            "--nodes",
            "1",
            "--clients",
            "1",
            "--in-flight",
            "4",
        ])
        .args([
            "--warmup-s",
            "0.1",
            "--keys",
            "100",
            "--ops",
            "200",
            "--duration-s",
            "60",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let ops = json["cluster"]["ops"].as_u64().unwrap();
    let seconds = json["cluster"]["duration_s"].as_f64().unwrap();
    assert!(ops >= 200, "{ops} ops");
    assert!(
        seconds < 60.0,
        "ended by the op count, not the duration ({seconds} s)"
    );
}

#[test]
fn catch_up_scenario_reports_a_snapshot_catch_up() {
    let _turn = one_cluster_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let json = json_of(
        bench()
            .args(["catch-up", "--dir", dir.path().to_str().unwrap(), "--json"])
            .args([
                "--writers",
                "4",
                "--baseline-s",
                "1",
                "--down-s",
                "2",
                "--retain-entries",
                "20",
            ]),
    );
    assert_eq!(keys(&json), ["catch_up", "command", "machine"]);
    assert_eq!(
        keys(&json["catch_up"]),
        [
            "baseline_ops_per_s",
            "catch_up_ops_per_s",
            "catch_up_s",
            "dip_ratio",
            "down_s",
            "entries_behind",
            "retain_entries",
            "snapshot_installed",
            "value_bytes",
            "writers"
        ]
    );
    let result = &json["catch_up"];
    assert!(result["baseline_ops_per_s"].as_f64().unwrap() > 0.0);
    assert!(result["entries_behind"].as_u64().unwrap() > 20, "{result}");
    assert_eq!(result["snapshot_installed"], true, "{result}");
}
