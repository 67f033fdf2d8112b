//! `ringraft-tune` as an operator uses it.

use std::process::Command;

fn tune(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ringraft-tune"))
        .args(args)
        .output()
        .expect("run ringraft-tune")
}

#[test]
fn report_shows_topology_memlock_io_uring_and_a_valid_config() {
    let output = tune(&[]);
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    for section in [
        "# CPU topology",
        "# Locked memory",
        "# io_uring",
        "[shards]",
        "[glommio]",
    ] {
        assert!(text.contains(section), "missing {section}:\n{text}");
    }
    // The whole report is a valid config file (the findings are comments).
    let config = ringraft_tuning::Config::from_toml(&text).unwrap();
    ringraft_tuning::validate(&config, &ringraft_tuning::Topology::detect()).unwrap();
}

#[test]
fn check_prints_the_effective_config_with_overrides() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/local-3-node.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_ringraft-tune"))
        .args(["check", example])
        .env("RINGRAFT_NODE_ID", "2")
        .env("RINGRAFT_DATA_DIR", "/tmp/node2")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let config = ringraft_tuning::Config::from_toml(&String::from_utf8(output.stdout).unwrap()).unwrap();
    assert_eq!(config.node.id, 2);
    assert_eq!(config.node.data_dir.to_str(), Some("/tmp/node2"));
    assert_eq!(
        config.raft.election_timeout_ms, 300,
        "values from the file are kept"
    );
}

#[test]
fn check_rejects_a_bad_file_naming_key_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[wal]\nsegment_bytes = 1000\n[shards]\ncpus = [0, 0]\n").unwrap();
    let output = tune(&["check", path.to_str().unwrap()]);
    assert!(!output.status.success());
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(
        error.contains("wal.segment_bytes") && error.contains("shards.cpus") && error.contains("Fix:"),
        "{error}"
    );
}

#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    // A reader that is already gone, as when the output is piped into `head`.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_ringraft-tune"))
        .stdout(writer)
        .output()
        .expect("run ringraft-tune");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{:?}", output.status);
}
