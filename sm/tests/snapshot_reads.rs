//! A snapshot chunk reads the values held in data files several at a time (at most
//! `snapshot_reads_in_flight`), checks each, and keeps them out of the read cache.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use ringraft_sm::{
    encode_batch, BatchView, ChunkStart, Command, KvConfig, KvStore, MemSmDisk, SmDisk, SmError, StateMachine,
};

/// Polls until done: the disk below waits once per read.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            return output;
        }
    }
}

/// Waits once (as a device would), then is ready.
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: std::pin::Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            Poll::Ready(())
        } else {
            self.0 = true;
            context.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

/// An in-memory disk whose reads wait once, counting how many are in flight at a time.
#[derive(Clone, Default)]
struct CountingDisk {
    inner: MemSmDisk,
    in_flight: Rc<Cell<usize>>,
    most: Rc<Cell<usize>>,
    reads: Rc<Cell<usize>>,
}

impl SmDisk for CountingDisk {
    type Buffer = Vec<u8>;
    fn alloc_buffer(&self, len: usize) -> Vec<u8> {
        self.inner.alloc_buffer(len)
    }
    async fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list().await
    }
    async fn len(&self, name: &str) -> io::Result<u64> {
        self.inner.len(name).await
    }
    async fn read_at(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.in_flight.set(self.in_flight.get() + 1);
        self.most.set(self.most.get().max(self.in_flight.get()));
        self.reads.set(self.reads.get() + 1);
        YieldOnce(false).await;
        self.in_flight.set(self.in_flight.get() - 1);
        self.inner.read_at(name, offset, len).await
    }
    async fn write_at(&self, name: &str, offset: u64, buffer: Vec<u8>) -> io::Result<()> {
        self.inner.write_at(name, offset, buffer).await
    }
    async fn sync(&self, name: &str) -> io::Result<()> {
        self.inner.sync(name).await
    }
    async fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.inner.rename(from, to).await
    }
    async fn remove(&self, name: &str) -> io::Result<()> {
        self.inner.remove(name).await
    }
}

fn config(reads_in_flight: usize) -> KvConfig {
    KvConfig {
        inline_value_bytes_max: 8,
        cache_bytes_max: 1 << 20,
        data_file_bytes_max: 64 << 10,
        write_buffer_bytes: 4096,
        snapshot_chunk_bytes: 1 << 20,
        snapshot_reads_in_flight: reads_in_flight,
        hash_seed: Some(7),
        ..KvConfig::default()
    }
}

fn value(k: u32) -> Vec<u8> {
    format!("value-{k:05}-").repeat(20).into_bytes()
}

/// 500 keys with 240-byte values (in data files, most of them sealed), checkpointed, and a
/// fresh store on the same disk (nothing cached).
fn store(disk: &CountingDisk, reads_in_flight: usize) -> KvStore<CountingDisk> {
    let mut store = block_on(KvStore::open(disk.clone(), config(reads_in_flight))).unwrap();
    for k in 0..500u32 {
        let bytes = encode_batch(vec![Command::Put {
            key: format!("key-{k}").into_bytes(),
            value: value(k),
        }]);
        block_on(store.apply(
            k as u64 + 1,
            BatchView::new(&bytes).unwrap().batch(),
            &mut Vec::new(),
        ))
        .unwrap();
    }
    block_on(store.checkpoint()).unwrap();
    drop(store);
    block_on(KvStore::open(disk.clone(), config(reads_in_flight))).unwrap()
}

/// Streams the whole snapshot of `source` into a fresh store; returns it.
fn stream(source: &mut KvStore<CountingDisk>) -> Result<KvStore<MemSmDisk>, SmError> {
    let mut target = block_on(KvStore::open(MemSmDisk::new(), config(1))).unwrap();
    let snapshot = source.snapshot()?;
    let mut number = 0;
    while let Some(chunk) = block_on(source.snapshot_chunk(&snapshot, number))? {
        block_on(target.restore_chunk(&chunk)).unwrap();
        number += 1;
    }
    block_on(target.restore_finish()).unwrap();
    Ok(target)
}

#[test]
fn a_chunk_reads_its_values_several_at_a_time_and_every_value_arrives() {
    for window in [1, 4, 32] {
        let disk = CountingDisk::default();
        let mut source = store(&disk, window);
        disk.most.set(0);
        disk.reads.set(0);
        let mut target = stream(&mut source).unwrap();
        assert_eq!(
            disk.most.get(),
            window,
            "reads in flight at most, window {window}"
        );
        assert!(disk.reads.get() >= 450, "{} reads", disk.reads.get());
        for k in (0..500u32).step_by(7) {
            let read = block_on(target.read(format!("key-{k}").as_bytes())).unwrap();
            assert_eq!(read, Some(value(k)), "key-{k}");
        }
        // The values streamed were not cached: a client read goes to the disk.
        disk.reads.set(0);
        block_on(source.read(b"key-3")).unwrap();
        assert_eq!(disk.reads.get(), 1, "window {window}");
    }
}

#[test]
fn a_bad_value_among_those_read_together_fails_the_chunk_naming_it() {
    let disk = CountingDisk::default();
    let mut source = store(&disk, 32);
    // Flip a bit inside one value in the oldest (sealed) data file.
    let name = disk
        .inner
        .names()
        .into_iter()
        .filter(|n| n.starts_with("data"))
        .min()
        .expect("a data file");
    disk.inner.flip_bit(&name, 1000, 2);
    match stream(&mut source) {
        Err(SmError::Corrupt { file, .. }) => assert_eq!(file, name),
        Err(other) => panic!("expected Corrupt, got {other}"),
        Ok(_) => panic!("the corrupt value went unnoticed"),
    }
}

#[test]
fn a_chunk_job_holds_the_snapshot_while_the_store_moves_on() {
    let disk = CountingDisk::default();
    let mut source = store(&disk, 8);
    let mut target = block_on(KvStore::open(MemSmDisk::new(), config(1))).unwrap();
    let snapshot = source.snapshot().unwrap();
    let mut index = 500;
    let mut number = 0;
    loop {
        let job = match source.snapshot_chunk_job(&snapshot, number).unwrap() {
            ChunkStart::End => break,
            ChunkStart::Job(job) => job,
            ChunkStart::Inline => panic!("the store produces jobs"),
        };
        // Before the job runs, every key is overwritten (new records in new data files),
        // checkpointed twice and the store's upkeep runs: the old files are garbage but for
        // the snapshot.
        for k in 0..500u32 {
            index += 1;
            let bytes = encode_batch(vec![Command::Put {
                key: format!("key-{k}").into_bytes(),
                value: format!("newer-{index}").repeat(30).into_bytes(),
            }]);
            block_on(source.apply(index, BatchView::new(&bytes).unwrap().batch(), &mut Vec::new())).unwrap();
        }
        block_on(source.checkpoint()).unwrap();
        block_on(source.maintain(u64::MAX)).unwrap();
        block_on(source.checkpoint()).unwrap();
        block_on(source.maintain(u64::MAX)).unwrap();
        let chunk = block_on(job).unwrap();
        block_on(target.restore_chunk(&chunk)).unwrap();
        number += 1;
    }
    assert!(number >= 1);
    block_on(target.restore_finish()).unwrap();
    for k in 0..500u32 {
        let read = block_on(target.read(format!("key-{k}").as_bytes())).unwrap();
        assert_eq!(read, Some(value(k)), "key-{k} as it was when the snapshot began");
    }
}
