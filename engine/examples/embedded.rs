//! Embeds a 3-node ringraft cluster in one process and uses it from plain threads.
//!
//! `cargo run --release -p ringraft-engine --example embedded`

use std::time::{Duration, Instant};

use ringraft_engine::{Consistency, Engine, EngineError};
use ringraft_tuning::{Config, CpuList};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("ringraft-embedded-{}", std::process::id()));
    let configs: Vec<Config> = (1..=3)
        .map(|id| {
            let mut config = Config::local_cluster(3, id);
            config.node.data_dir = dir.join(format!("node{id}"));
            config.shards.cpus = CpuList::List(vec![0]); // one shard per node
            config.shards.pin = false; // three nodes share this machine's CPUs
            config.shards.groups_per_shard = 4;
            config
        })
        .collect();
    let (engines, client) = Engine::start_in_process(configs)?;

    // Wait for every group to elect a leader: a write to each succeeds.
    let started = Instant::now();
    for group in 0..client.groups() {
        loop {
            match client.submit_blocking(
                group,
                vec![ringraft_sm::Command::Get {
                    key: b"ping".to_vec(),
                }],
            ) {
                Ok(_) => break,
                Err(EngineError::NotLeader { .. }) if started.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
    println!(
        "{} groups have leaders after {:?}",
        client.groups(),
        started.elapsed()
    );

    // Four plain threads, each writing its own keys and reading them back.
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let client = client.clone();
            std::thread::spawn(move || -> Result<u32, EngineError> {
                for i in 0..1000u32 {
                    let key = format!("thread{t}/key{i}");
                    client.put_blocking(key.as_bytes(), &i.to_le_bytes())?;
                }
                let value =
                    client.get_blocking(format!("thread{t}/key999").as_bytes(), Consistency::Linearizable)?;
                Ok(u32::from_le_bytes(value.expect("written").try_into().unwrap()))
            })
        })
        .collect();
    for (t, thread) in threads.into_iter().enumerate() {
        let last = thread.join().expect("thread")?;
        println!("thread {t}: wrote 1000 keys, read back key999 = {last}");
    }
    match client.compare_and_swap_blocking(b"thread0/key0", Some(&0u32.to_le_bytes()), Some(b"swapped"))? {
        Ok(()) => println!("compare-and-swap: swapped"),
        Err(current) => println!("compare-and-swap: mismatch, current {current:?}"),
    }
    for status in engines[0].status() {
        println!("{status:?}");
    }
    for engine in engines {
        engine.shutdown()?;
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
