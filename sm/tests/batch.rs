//! The batch format: round trip, golden bytes, validation of bytes from disk or network.

use proptest::prelude::*;
use ringraft_sm::{
    command_size_estimate, encode_batch, encode_batch_vec, ArchivedCommand, BatchBuilder, BatchView, Command,
    CommandLimits, SmError, BATCH_HEADER_BYTES, BATCH_SLACK_BYTES,
};

fn sample() -> Vec<Command> {
    vec![
        Command::Put {
            key: b"user:1".to_vec(),
            value: b"alice".to_vec(),
        },
        Command::Delete {
            key: b"user:2".to_vec(),
        },
        Command::CompareAndSwap {
            key: b"n".to_vec(),
            expected: None,
            new: Some(vec![1]),
        },
        Command::CompareAndSwap {
            key: b"n".to_vec(),
            expected: Some(vec![1]),
            new: None,
        },
        Command::Get {
            key: b"user:1".to_vec(),
        },
    ]
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ") + "\n")
        .collect()
}

#[test]
fn batch_bytes_match_the_golden_file() {
    let actual = hex(&encode_batch(sample()));
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/batch-v1.hex");
    if std::env::var_os("RINGRAFT_BLESS").is_some() {
        std::fs::write(&path, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap();
    assert!(
        expected == actual,
        "the batch format changed (bump BATCH_VERSION, re-bless):\n{actual}"
    );
}

/// The raft entry path encodes into a `Vec` after the header in place: byte for byte the same
/// payload, with any size estimate (too small: the `Vec` grows).
#[test]
fn the_vec_encoding_matches_the_golden_file_too() {
    let commands = sample();
    let estimate: usize = commands.iter().map(command_size_estimate).sum();
    for estimate in [estimate, 0, 10 * estimate] {
        assert_eq!(
            encode_batch_vec(sample(), estimate),
            encode_batch(sample()).to_vec()
        );
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/batch-v1.hex");
    let expected = std::fs::read_to_string(&path).unwrap();
    assert_eq!(hex(&encode_batch_vec(sample(), estimate)), expected);
}

#[test]
fn round_trip_reads_in_place() {
    let bytes = encode_batch(sample());
    let view = BatchView::new(&bytes).unwrap();
    assert!(!view.copied(), "an aligned payload is read where it lies");
    let commands = &view.batch().commands;
    assert_eq!(commands.len(), 5);
    match &commands[0] {
        ArchivedCommand::Put { key, value } => assert_eq!(
            (key.as_slice(), value.as_slice()),
            (&b"user:1"[..], &b"alice"[..])
        ),
        other => panic!("{other:?}"),
    }
    let back: Vec<Command> =
        rkyv::deserialize::<Vec<Command>, rkyv::rancor::Error>(&view.batch().commands).unwrap();
    assert_eq!(back, sample());
}

#[test]
fn misaligned_payload_is_copied_then_validated() {
    let bytes = encode_batch(sample());
    let mut shifted = vec![0u8; bytes.len() + 1];
    shifted[1..].copy_from_slice(&bytes);
    let view = BatchView::new(&shifted[1..]).unwrap();
    assert!(view.copied());
    assert_eq!(view.batch().commands.len(), 5);
}

#[test]
fn damaged_batches_are_errors() {
    let bytes = encode_batch(sample()).to_vec();
    let error = |mutate: &dyn Fn(&mut Vec<u8>)| {
        let mut copy = bytes.clone();
        mutate(&mut copy);
        match BatchView::new(&copy) {
            Err(SmError::BadBatch(reason)) => reason,
            other => panic!("expected BadBatch, got {other:?}"),
        }
    };
    assert!(error(&|b| b[0] = b'X').contains("magic"));
    assert!(error(&|b| b[2] = 9).contains("version 9"));
    assert!(error(&|b| *b.last_mut().unwrap() ^= 1).contains("crc32c"));
    assert!(error(&|b| b.truncate(20)).contains("header says"));
    assert!(error(&|b| b.truncate(3)).contains("shorter"));
}

#[test]
fn a_valid_crc_over_a_bad_archive_is_still_refused() {
    // Someone computed the crc over garbage: bytecheck must catch what the crc cannot.
    let mut bytes = encode_batch(sample()).to_vec();
    let len = bytes.len();
    for b in &mut bytes[16 + 8..len - 4] {
        *b = 0xff;
    }
    let crc = crc32c::crc32c(&bytes[16..]);
    bytes[8..12].copy_from_slice(&crc.to_le_bytes());
    assert!(matches!(BatchView::new(&bytes), Err(SmError::BadBatch(_))));
}

#[test]
fn oversized_commands_are_refused_at_the_api() {
    let limits = CommandLimits {
        key_bytes_max: 4,
        value_bytes_max: 8,
    };
    let mut builder = BatchBuilder::new(limits);
    builder
        .push(Command::Put {
            key: b"k".to_vec(),
            value: vec![0; 8],
        })
        .unwrap();
    match builder.push(Command::Put {
        key: b"toolong".to_vec(),
        value: vec![],
    }) {
        Err(SmError::TooLarge {
            what: "key",
            key: "limits.key_bytes_max",
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let cas = Command::CompareAndSwap {
        key: b"k".to_vec(),
        expected: Some(vec![0; 9]),
        new: None,
    };
    assert!(matches!(
        builder.push(cas),
        Err(SmError::TooLarge {
            key: "limits.value_bytes_max",
            ..
        })
    ));
    assert_eq!(builder.len(), 1, "refused commands are not added");
    let bytes = builder.finish();
    assert_eq!(BatchView::new(&bytes).unwrap().batch().commands.len(), 1);
    assert!(builder.is_empty());
}

fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..70)
}

fn any_command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (any_bytes(), any_bytes()).prop_map(|(key, value)| Command::Put { key, value }),
        any_bytes().prop_map(|key| Command::Delete { key }),
        any_bytes().prop_map(|key| Command::Get { key }),
        (
            any_bytes(),
            proptest::option::of(any_bytes()),
            proptest::option::of(any_bytes())
        )
            .prop_map(|(key, expected, new)| Command::CompareAndSwap { key, expected, new }),
    ]
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = BatchView::new(&bytes);
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_header_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512), count in 0u32..8) {
        let mut bytes = vec![b'R', b'B', 1, 0];
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        bytes.extend_from_slice(&count.to_le_bytes());
        bytes.extend_from_slice(&body);
        let _ = BatchView::new(&bytes);
    }

    /// The estimates bound the archive, so the entry path's buffer, sized from them, never
    /// regrows (a regrowth copies the whole entry): every kind of command, any sizes, many of them.
    #[test]
    fn size_estimates_bound_the_encoding(commands in proptest::collection::vec(any_command(), 0..800)) {
        let estimate: usize = commands.iter().map(command_size_estimate).sum();
        let encoded = encode_batch_vec(commands, estimate);
        prop_assert!(encoded.len() <= BATCH_HEADER_BYTES + estimate + BATCH_SLACK_BYTES);
        prop_assert_eq!(encoded.capacity(), encoded.len());
    }

    #[test]
    fn every_encoded_batch_validates(keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..20)) {
        let commands: Vec<Command> = keys.into_iter().map(|k| Command::Put { value: k.clone(), key: k }).collect();
        let bytes = encode_batch(commands.clone());
        let view = BatchView::new(&bytes).unwrap();
        prop_assert_eq!(view.batch().commands.len(), commands.len());
        let estimate = commands.iter().map(command_size_estimate).sum();
        prop_assert_eq!(encode_batch_vec(commands, estimate), bytes.to_vec());
    }
}
