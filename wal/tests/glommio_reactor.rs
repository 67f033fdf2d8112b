//! The patched glommio reactor (vendor/glommio/RINGRAFT.md) under the WAL's own cycle: one
//! writer appending and waiting for durability, with the kind of timers a shard keeps (a raft
//! tick every few milliseconds, a far deadline).
//!
//! Upstream glommio 0.9 cancels and re-arms its preemption timers on every scheduler pass and
//! submits the sleep's ring link apart from the wait: about eight `io_uring_enter` calls per
//! durable write. The patch keeps a pending timer that fires no later than needed, so a write
//! cycle costs its write, the sleep, and a timer now and then.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use ringraft_wal::{Entry, GlommioWal, SyncMode, WalConfig};

fn config() -> WalConfig {
    WalConfig {
        segment_bytes: 1 << 20,
        batch_bytes_max: 64 * 1024,
        cache_bytes_max: 1 << 20,
        segments_recycled_max: 1,
    }
}

fn on_executor<T: Send + 'static, F>(f: impl FnOnce() -> F + Send + 'static) -> T
where
    F: std::future::Future<Output = T> + 'static,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 << 10) // tests run in parallel: stay within an 8 MiB memlock limit
        .spawn(f)
        .expect("executor")
        .join()
        .expect("join")
}

/// Starts a task that wakes every `period` until `stop`, as a shard's tick does.
fn ticker(period: Duration, stop: Rc<Cell<bool>>) -> glommio::Task<u64> {
    glommio::spawn_local(async move {
        let mut ticks = 0;
        while !stop.get() {
            glommio::timer::sleep(period).await;
            ticks += 1;
        }
        ticks
    })
}

/// Appends one entry at a time to one group, each waiting for durability; returns the
/// `io_uring_enter` calls the executor made per durable append.
async fn kernel_entries_per_durable_append(wal: &GlommioWal, appends: u64) -> f64 {
    let _ = glommio::executor().io_stats(); // reading resets the counters
    for _ in 0..appends {
        let ticket = wal
            .with(|w| {
                let index = w.last_index(1) + 1;
                w.append(
                    1,
                    &[Entry {
                        index,
                        term: 1,
                        entry_type: 0,
                        payload: Bytes::from_static(&[7; 100]),
                    }],
                )
            })
            .expect("append");
        wal.wait_durable(ticket).await.expect("durable");
    }
    let entries = glommio::executor().io_stats().all_rings().kernel_entries();
    entries as f64 / appends as f64
}

#[test]
fn a_durable_append_costs_few_kernel_entries_with_timers_pending() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let per_append = on_executor(move || async move {
        let wal = GlommioWal::open(&path, SyncMode::Dsync, config())
            .await
            .expect("open");
        let stop = Rc::new(Cell::new(false));
        let tick = ticker(Duration::from_millis(10), stop.clone());
        let far = ticker(Duration::from_secs(3600), stop.clone());
        // Warm up: the segment files exist and the first tick is armed.
        kernel_entries_per_durable_append(&wal, 20).await;
        let per_append = kernel_entries_per_durable_append(&wal, 300).await;
        stop.set(true);
        tick.await;
        drop(far); // cancelled: it would sleep for an hour
        wal.close().await.expect("close");
        per_append
    });
    // Patched: the write, the sleep (ring link and wait in one call), and now and then a
    // tick's timer: ~2–3. Upstream: ~8. The bound leaves room for wake-ups by other events.
    assert!(
        per_append < 5.0,
        "{per_append:.2} io_uring_enter calls per durable append"
    );
}

#[test]
fn timers_fire_in_order_after_sleeping_on_a_longer_one() {
    // The executor sleeps with only an hour-long timer armed, until a message from another
    // thread wakes it; then it sleeps for short while. The patch keeps a pending timer only if
    // it fires no later than the one needed: were it to keep the hour-long one, these sleeps
    // would last an hour.
    let (sender, receiver) = glommio::channels::shared_channel::new_bounded::<u64>(1);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let _sleeper = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 << 10)
        .spawn(move || async move {
            let receiver = receiver.connect().await;
            let stop = Rc::new(Cell::new(false));
            let far = ticker(Duration::from_secs(3600), stop.clone());
            assert_eq!(receiver.recv().await, Some(1)); // asleep until then
            let order = Rc::new(std::cell::RefCell::new(Vec::new()));
            let mut tasks = Vec::new();
            for ms in [30u64, 5, 20, 1, 10] {
                let order = order.clone();
                tasks.push(glommio::spawn_local(async move {
                    let asked = Duration::from_millis(ms);
                    let slept_from = Instant::now();
                    glommio::timer::sleep(asked).await;
                    assert!(slept_from.elapsed() >= asked, "woke before its deadline");
                    order.borrow_mut().push(ms);
                }));
            }
            for task in tasks {
                task.await;
            }
            drop(far);
            let order = order.borrow().clone();
            done_tx.send(order).unwrap();
        })
        .expect("executor");
    let sender = std::thread::spawn(move || {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(512 << 10)
            .spawn(move || async move {
                let sender = sender.connect().await; // returns once both ends are connected
                glommio::timer::sleep(Duration::from_millis(200)).await; // the sleeper sleeps
                sender.send(1).await.expect("send");
            })
            .expect("executor")
            .join()
            .expect("sender")
    });
    sender.join().unwrap();
    // A generous bound: the failure it guards against is an hour.
    let order = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("short sleeps outlived 60 s: an hour-long timer was kept");
    assert_eq!(order, vec![1, 5, 10, 20, 30]);
}

#[test]
fn an_idle_executor_sleeps_until_its_timer() {
    // Keeping a pending preemption timer that fires *earlier* than the sleep's own timer would
    // wake the executor every 100 ms (glommio's default preemption period) to no purpose;
    // the patch keeps it only within a millisecond of the timer it needs.
    let entries = on_executor(|| async {
        glommio::timer::sleep(Duration::from_millis(1)).await;
        let _ = glommio::executor().io_stats(); // reading resets the counters
        glommio::timer::sleep(Duration::from_millis(1000)).await;
        glommio::executor().io_stats().all_rings().kernel_entries()
    });
    // Arm the timer, sleep, wake, re-arm the preemption timer: ~3. Waking every 100 ms: ~20.
    assert!(
        entries < 10,
        "{entries} io_uring_enter calls while idle for a second"
    );
}

#[test]
fn an_idle_executor_wakes_for_a_remote_message_with_no_timer_pending() {
    // With no timer at all, the patch cancels any pending preemption timer before sleeping;
    // the executor must still wake for work sent from another thread.
    let (sender, receiver) = glommio::channels::shared_channel::new_bounded::<u64>(4);
    let consumer = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 << 10)
        .spawn(move || async move {
            let receiver = receiver.connect().await;
            let mut sum = 0;
            while let Some(value) = receiver.recv().await {
                sum += value;
            }
            sum
        })
        .expect("executor");
    let producer = LocalExecutorBuilder::new(Placement::Unbound)
        .io_memory(512 << 10)
        .spawn(move || async move {
            let sender = sender.connect().await;
            for value in 1..=10u64 {
                // The consumer, with no timer pending, sleeps between messages.
                glommio::timer::sleep(Duration::from_millis(5)).await;
                sender.send(value).await.expect("send");
            }
        })
        .expect("executor");
    producer.join().expect("producer");
    assert_eq!(consumer.join().expect("consumer"), 55);
}
