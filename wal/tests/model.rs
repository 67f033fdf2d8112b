//! Property test: random interleavings of appends, overwrites, hard states, compactions,
//! resets, group commits and crashes (some in the middle of a write) across groups. After every
//! recovery the WAL must hold exactly what a model holds at a batch boundary: every synced
//! append, nothing partially written, no overwritten tail coming back.

mod common;

use common::*;
use proptest::prelude::*;
use ringraft_wal::{HardState, MemDisk, Ticket, Wal};

#[derive(Clone, Debug)]
enum Op {
    /// Append one entry to `group`, `back` entries before the end (0 = plain append).
    Append {
        group: u64,
        back: u64,
        term: u64,
        len: usize,
    },
    HardState {
        group: u64,
        term: u64,
        commit: u64,
    },
    /// Compact through `last - keep`.
    Compact {
        group: u64,
        keep: u64,
    },
    Reset {
        group: u64,
        gap: u64,
    },
    /// Perform all IO (everything appended becomes durable).
    Drive,
    /// Issue the next write without syncing, then lose power.
    CrashDuringWrite,
    /// Lose power with nothing in flight.
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0..4u64, prop_oneof![4 => Just(0u64), 1 => 1..4u64], 1..4u64, prop_oneof![3 => 0..120usize, 1 => 120..2500usize])
            .prop_map(|(group, back, term, len)| Op::Append { group, back, term, len }),
        2 => (0..4u64, 0..5u64, 0..50u64).prop_map(|(group, term, commit)| Op::HardState { group, term, commit }),
        2 => (0..4u64, 0..6u64).prop_map(|(group, keep)| Op::Compact { group, keep }),
        1 => (0..4u64, 0..5u64).prop_map(|(group, gap)| Op::Reset { group, gap }),
        4 => Just(Op::Drive),
        1 => Just(Op::CrashDuringWrite),
        1 => Just(Op::Crash),
    ]
}

/// The model: the state after applying, in order, every op whose ticket is at most `t`.
struct Model {
    base: State,
    ops: Vec<(Ticket, ModelOp)>,
}

#[derive(Clone, Debug)]
enum ModelOp {
    Append {
        group: u64,
        index: u64,
        term: u64,
        entry_type: u8,
        payload: Vec<u8>,
    },
    HardState {
        group: u64,
        hard_state: HardState,
    },
    Compact {
        group: u64,
        through: u64,
    },
    Reset {
        group: u64,
        index: u64,
        term: u64,
    },
}

fn apply(state: &mut State, op: &ModelOp) {
    match op {
        ModelOp::Append {
            group,
            index,
            term,
            entry_type,
            payload,
        } => {
            let log = state.entry(*group).or_default();
            log.entries.truncate((*index - log.first) as usize);
            log.entries.push((*term, *entry_type, payload.clone()));
        }
        ModelOp::HardState { group, hard_state } => state.entry(*group).or_default().hard_state = *hard_state,
        ModelOp::Compact { group, through } => {
            let log = state.entry(*group).or_default();
            let drop = (*through + 1 - log.first) as usize;
            log.snapshot_term = log.entries[drop - 1].0;
            log.entries.drain(..drop);
            log.first = *through + 1;
        }
        ModelOp::Reset { group, index, term } => {
            let log = state.entry(*group).or_default();
            log.entries.clear();
            log.first = index + 1;
            log.snapshot_term = *term;
        }
    }
}

impl Model {
    fn at(&self, ticket: Ticket) -> State {
        let mut state = self.base.clone();
        for (t, op) in &self.ops {
            if *t <= ticket {
                apply(&mut state, op);
            }
        }
        state.retain(|_, g| *g != GroupState::default());
        state
    }
}

fn run(ops: Vec<Op>, seed: u64) -> Result<(), TestCaseError> {
    let disk = MemDisk::new(seed);
    let config = small_config();
    let mut wal = open(&disk, &config);
    let mut model = Model {
        base: State::new(),
        ops: Vec::new(),
    };
    let mut in_flight = false;
    for op in ops {
        if in_flight && !matches!(op, Op::Crash | Op::CrashDuringWrite) {
            continue; // a write is half done: only a crash may follow
        }
        match op {
            Op::Append {
                group,
                back,
                term,
                len,
            } => {
                let last = wal.last_index(group);
                let first = wal.first_index(group);
                let index = (last + 1).saturating_sub(back).max(first);
                let term = wal.term(group, index - 1).unwrap_or(0).max(1) + term - 1;
                let payload = payload_for(group, index, term, len);
                let e = entry(index, term, &payload);
                let ticket = wal.append(group, std::slice::from_ref(&e)).unwrap();
                model.ops.push((
                    ticket,
                    ModelOp::Append {
                        group,
                        index,
                        term,
                        entry_type: e.entry_type,
                        payload,
                    },
                ));
            }
            Op::HardState { group, term, commit } => {
                let hard_state = HardState {
                    term,
                    vote: group + 1,
                    commit,
                };
                let ticket = wal.set_hard_state(group, hard_state).unwrap();
                model.ops.push((ticket, ModelOp::HardState { group, hard_state }));
            }
            Op::Compact { group, keep } => {
                let last = wal.last_index(group);
                let through = last.saturating_sub(keep);
                if through >= wal.first_index(group) {
                    let ticket = wal.compact(group, through).unwrap();
                    model.ops.push((ticket, ModelOp::Compact { group, through }));
                }
            }
            Op::Reset { group, gap } => {
                let index = wal.last_index(group) + gap;
                let term = 3;
                let ticket = wal.reset(group, index, term).unwrap();
                model.ops.push((ticket, ModelOp::Reset { group, index, term }));
            }
            Op::Drive => drive(&mut wal, &disk),
            Op::CrashDuringWrite | Op::Crash => {
                if matches!(op, Op::CrashDuringWrite) && !in_flight {
                    in_flight = write_without_sync(&mut wal, &disk);
                }
                let durable = wal.durable_ticket();
                let allowed = if in_flight {
                    vec![model.at(durable), model.at(Ticket(durable.0 + 1))]
                } else {
                    vec![model.at(durable)]
                };
                drop(wal);
                disk.crash();
                wal = open(&disk, &config);
                let recovered = state_of(&wal, &disk);
                prop_assert!(
                    allowed.contains(&recovered),
                    "recovered state matches no batch boundary\nrecovered: {recovered:?}\nallowed: {allowed:?}"
                );
                model = Model {
                    base: recovered,
                    ops: Vec::new(),
                };
                in_flight = false;
            }
        }
        if !in_flight {
            prop_assert_eq!(state_of(&wal, &disk), model.at(wal.last_ticket()));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn recovery_matches_the_model_at_a_batch_boundary(ops in proptest::collection::vec(op(), 1..120), seed in any::<u64>()) {
        run(ops, seed)?;
    }
}

#[test]
fn long_history_recycles_segments_and_stays_consistent() {
    // Many rounds with compaction keep the chain short: segments are recycled, not accumulated.
    let disk = MemDisk::new(42);
    let config = small_config();
    let mut wal: Wal<MemDisk> = open(&disk, &config);
    for round in 0..400u64 {
        for group in 0..3 {
            let index = wal.last_index(group) + 1;
            wal.append(group, &[entry(index, 1, &payload_for(group, index, 1, 300))])
                .unwrap();
        }
        drive(&mut wal, &disk);
        if round % 10 == 9 {
            for group in 0..3 {
                wal.compact(group, wal.last_index(group) - 2).unwrap();
            }
        }
    }
    drive(&mut wal, &disk);
    let stats = wal.stats();
    assert!(stats.segments_live <= 4, "{stats:?}");
    let files = disk.names().iter().filter(|n| n.ends_with(".wal")).count();
    assert!(
        files <= stats.segments_live + stats.segments_ready + config.segments_recycled_max + 1,
        "{files} files"
    );
    let before = state_of(&wal, &disk);
    drop(wal);
    assert_eq!(state_of(&open(&disk, &config), &disk), before);
}

#[test]
fn a_group_that_never_compacts_pins_the_oldest_segment_and_is_reported() {
    let disk = MemDisk::new(43);
    let config = small_config();
    let mut wal: Wal<MemDisk> = open(&disk, &config);
    for _ in 0..60u64 {
        for group in [1, 2] {
            let index = wal.last_index(group) + 1;
            wal.append(group, &[entry(index, 1, &[9; 300])]).unwrap();
        }
        drive(&mut wal, &disk);
        // Group 1 keeps up with compaction; group 2 never compacts.
        let last = wal.last_index(1);
        wal.compact(1, last - 1).unwrap();
    }
    drive(&mut wal, &disk);
    let live = wal.stats().segments_live;
    assert!(live > 3, "group 2 keeps every segment alive: {live}");
    let pins = wal.pinning_groups();
    assert_eq!(pins.len(), 1, "{pins:?}");
    assert_eq!(pins[0].0, 2);
    // Compacting group 2 through the reported index releases that segment: the next one pins.
    let through = pins[0].1;
    let free_before = wal.stats().segments_free;
    wal.compact(2, through).unwrap();
    drive(&mut wal, &disk);
    assert!(wal.stats().segments_free > free_before, "{:?}", wal.stats());
    assert!(wal
        .pinning_groups()
        .iter()
        .all(|&(group, index)| group == 2 && index > through));
    // Over several oldest segments: one pin per group, through its newest entry there; and
    // compacting through it releases them all at once.
    let live = wal.stats().segments_live;
    let pins = wal.pinning_groups_of(live - 1);
    let pin_2 = pins.iter().find(|p| p.0 == 2).expect("group 2 pins").1;
    assert!(pin_2 > wal.pinning_groups()[0].1, "{pins:?}");
    assert!(
        wal.pinning_groups_of(live + 5) == pins,
        "never the current segment"
    );
    for &(group, index) in &pins {
        wal.compact(group, index).unwrap();
    }
    drive(&mut wal, &disk);
    assert_eq!(wal.stats().segments_live, 1, "{:?}", wal.stats());
    // Compacting everything but the tail releases all but the newest segments.
    let last = wal.last_index(2);
    wal.compact(2, last - 1).unwrap();
    drive(&mut wal, &disk);
    assert!(wal.stats().segments_live <= 2, "{:?}", wal.stats());
    // What still pins is only retained (uncompacted) entries.
    for (group, index) in wal.pinning_groups() {
        assert!(
            index >= wal.first_index(group),
            "group {group} pins at compacted index {index}"
        );
    }
}
