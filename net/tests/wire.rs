//! The wire formats: golden bytes (any change shows up as a diff of `tests/golden/wire-v1.hex`
//! in review; regenerate deliberately with `RINGRAFT_BLESS=1 cargo test -p ringraft-net --test
//! wire` and bump the version), and property tests that arbitrary bytes never panic a decoder
//! nor make it allocate beyond its limit.

use bytes::Bytes;
use proptest::prelude::*;
use raft::eraftpb::{Entry, Message, MessageType};
use ringraft_engine::{
    Consistency, Envelope, GroupMetrics, GroupStatus, MemberChange, NodeStats, PieceKind, SnapshotPiece,
};
use ringraft_net::frame::{self, kind};
use ringraft_net::handshake::{Hello, Local};
use ringraft_net::protocol::{
    decode_request, decode_response, encode_request, encode_response, Body, ClusterInfo, Failure, Member,
    Request, Response,
};
use ringraft_net::raft_wire;
use ringraft_sm::{Command, CommandResult};

fn dump(name: &str, bytes: &[u8], out: &mut String) {
    out.push_str(&format!("# {name} ({} bytes)\n", bytes.len()));
    for (line, chunk) in bytes.chunks(16).enumerate() {
        out.push_str(&format!("{:04x}:", line * 16));
        for byte in chunk {
            out.push_str(&format!(" {byte:02x}"));
        }
        out.push('\n');
    }
}

fn raft_messages() -> Vec<Envelope> {
    let mut append = Message::default();
    append.set_msg_type(MessageType::MsgAppend);
    append.from = 1;
    append.to = 2;
    append.term = 3;
    append.log_term = 3;
    append.index = 41;
    append.commit = 40;
    for (index, data) in [(42u64, &b"batch-one"[..]), (43, &b"second batch, longer"[..])] {
        let mut entry = Entry {
            index,
            term: 3,
            ..Default::default()
        };
        entry.set_data(Bytes::copy_from_slice(data));
        append.entries.push(entry);
    }
    let mut heartbeat = Message::default();
    heartbeat.set_msg_type(MessageType::MsgHeartbeat);
    heartbeat.from = 1;
    heartbeat.to = 2;
    heartbeat.term = 3;
    vec![
        Envelope {
            group: 4,
            message: append,
        },
        Envelope {
            group: 6,
            message: heartbeat,
        },
    ]
}

fn requests() -> Vec<(u64, Request)> {
    vec![
        (
            1,
            Request::Submit {
                group: 2,
                commands: vec![
                    Command::Put {
                        key: b"k1".to_vec(),
                        value: b"v1".to_vec(),
                    },
                    Command::Delete { key: b"k2".to_vec() },
                    Command::CompareAndSwap {
                        key: b"k3".to_vec(),
                        expected: None,
                        new: Some(b"n".to_vec()),
                    },
                    Command::Get { key: b"k4".to_vec() },
                ],
            },
        ),
        (
            2,
            Request::Get {
                group: 1,
                consistency: Consistency::Local,
                key: b"key".to_vec(),
            },
        ),
        (3, Request::Cluster),
        (4, Request::Status),
        (5, Request::Stats),
        (6, Request::Transfer { group: 3, to: 2 }),
        (7, Request::GroupMetrics),
        (
            8,
            Request::Member {
                group: 3,
                changes: vec![
                    MemberChange::AddVoter(4),
                    MemberChange::AddLearner(5),
                    MemberChange::Remove(1),
                ],
            },
        ),
        (9, Request::GroupMetricsV2),
    ]
}

fn responses() -> Vec<Response> {
    vec![
        Response {
            id: 1,
            outcome: Ok(Body::Results(vec![
                CommandResult::Ok,
                CommandResult::NotFound,
                CommandResult::CasMismatch {
                    current: Some(b"c".to_vec()),
                },
                CommandResult::Value(b"value".to_vec()),
            ])),
        },
        Response {
            id: 2,
            outcome: Err(Failure::NotLeader {
                leader: Some(3),
                address: Some("10.0.0.3:7750".into()),
            }),
        },
        Response {
            id: 3,
            outcome: Ok(Body::Cluster(ClusterInfo {
                cluster: 42,
                groups: 4,
                shards: 2,
                members: vec![Member {
                    id: 1,
                    host: "10.0.0.1".into(),
                    client_port: 7550,
                    peer_port: 7500,
                }],
            })),
        },
        Response {
            id: 4,
            outcome: Ok(Body::Status(vec![GroupStatus {
                node: 1,
                group: 0,
                leader: Some(2),
                term: 5,
                commit: 100,
                applied: 99,
            }])),
        },
        Response {
            id: 5,
            outcome: Ok(Body::Stats(NodeStats {
                proposals: 1,
                commands_proposed: 2,
                entries_applied: 3,
                busy_answers: 4,
                wal_writes: 5,
                wal_bytes_written: 6,
            })),
        },
        Response {
            id: 6,
            outcome: Err(Failure::Busy("queue".into())),
        },
        Response {
            id: 7,
            outcome: Ok(Body::GroupMetrics(vec![GroupMetrics {
                group: 1,
                leader: Some(2),
                is_leader: false,
                term: 3,
                last_index: 10,
                commit: 9,
                applied: 8,
                commit_lag: 1,
                apply_lag: 1,
                queued_commands: 0,
                queued_bytes: 0,
                reads_waiting: 0,
                proposals: 4,
                commands_proposed: 40,
                entries_appended: 10,
                bytes_appended: 1000,
                leader_changes: 1,
                busy_answers: 0,
                voters: vec![1, 2, 3],
                learners: vec![4],
                // Not in body kind 4.
                first_index: 0,
                checkpoint_index: 0,
            }])),
        },
        Response {
            id: 9,
            outcome: Ok(Body::GroupMetricsV2(vec![GroupMetrics {
                group: 1,
                leader: Some(1),
                is_leader: true,
                term: 3,
                last_index: 10,
                commit: 10,
                applied: 10,
                proposals: 4,
                commands_proposed: 40,
                entries_appended: 10,
                bytes_appended: 1000,
                leader_changes: 1,
                voters: vec![1, 2, 3],
                first_index: 6,
                checkpoint_index: 9,
                ..GroupMetrics::default()
            }])),
        },
    ]
}

#[test]
fn wire_bytes_match_the_golden_file() {
    let mut text = String::new();
    let mut out = Vec::new();
    frame::encode(&mut out, kind::RAFT, &raft_wire::encode(&raft_messages()));
    dump(
        "RAFT frame: MsgAppend with two entries, MsgHeartbeat",
        &out,
        &mut text,
    );
    let pieces = [
        PieceKind::Chunk {
            number: 2,
            data: bytes::Bytes::from_static(b"chunk"),
        },
        PieceKind::Done {
            chunks: 3,
            meta: bytes::Bytes::from_static(b"meta"),
        },
        PieceKind::Ack {
            next: 3,
            complete: true,
        },
    ];
    for kind in pieces {
        let piece = SnapshotPiece {
            group: 5,
            from: 1,
            to: 2,
            index: 900,
            term: 4,
            stream: (6 << 24) | 1,
            kind,
        };
        out.clear();
        frame::encode(&mut out, kind::SNAP, &ringraft_net::snap_wire::encode(&piece));
        dump(&format!("SNAP frame: {:?}", piece.kind), &out, &mut text);
    }
    let hello = Hello {
        version: 1,
        cluster: 42,
        node: 1,
        shard: 0,
        nonce: [0xab; 32],
    };
    out.clear();
    frame::encode(&mut out, kind::HELLO, &hello.encode());
    dump("HELLO frame", &out, &mut text);
    let local = Local {
        cluster: 42,
        node: 1,
        shard: 0,
        members: vec![1, 2],
        key: b"cluster key".to_vec(),
    };
    let acceptor = Hello {
        node: 2,
        nonce: [0xcd; 32],
        ..hello
    };
    out.clear();
    frame::encode(&mut out, kind::AUTH, &local.proof(true, &hello, &acceptor));
    dump(
        "AUTH frame (dialer's proof, key \"cluster key\")",
        &out,
        &mut text,
    );
    for (id, request) in requests() {
        out.clear();
        encode_request(&mut out, id, &request);
        dump(&format!("request {id}"), &out, &mut text);
    }
    for response in responses() {
        out.clear();
        encode_response(&mut out, &response);
        dump(&format!("response {}", response.id), &out, &mut text);
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/wire-v1.hex");
    if std::env::var_os("RINGRAFT_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        expected == text,
        "the wire format differs from the golden file:\n{text}"
    );
}

#[test]
fn every_message_round_trips() {
    let payload = Bytes::from(raft_wire::encode(&raft_messages()));
    assert_eq!(raft_wire::decode(&payload).unwrap(), raft_messages());
    for (id, request) in requests() {
        let mut out = Vec::new();
        encode_request(&mut out, id, &request);
        let (frame, _) = frame::decode(&out, 1 << 20).unwrap().unwrap();
        assert_eq!(decode_request(frame.kind, &frame.payload), (id, Ok(request)));
    }
    for response in responses() {
        let mut out = Vec::new();
        encode_response(&mut out, &response);
        let (frame, _) = frame::decode(&out, 1 << 20).unwrap().unwrap();
        assert_eq!(frame.kind, kind::RESPONSE);
        assert_eq!(decode_response(&frame.payload), Ok(response));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic_a_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512), k in any::<u8>()) {
        let _ = frame::decode(&bytes, 1 << 16);
        let _ = raft_wire::decode(&Bytes::from(bytes.clone()));
        let _ = Hello::decode(&bytes);
        let _ = decode_request(k, &bytes);
        let _ = decode_response(&bytes);
    }

    #[test]
    fn a_valid_frame_around_arbitrary_payload_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..512), k in any::<u8>()) {
        let mut out = Vec::new();
        frame::encode(&mut out, k, &payload);
        let (frame, used) = frame::decode(&out, 1 << 16).unwrap().unwrap();
        prop_assert_eq!(used, out.len());
        let _ = raft_wire::decode(&frame.payload);
        let _ = decode_request(frame.kind, &frame.payload);
        let _ = decode_response(&frame.payload);
    }

    #[test]
    fn mutated_valid_messages_never_panic(at in any::<prop::sample::Index>(), to in any::<u8>(), which in 0usize..3) {
        let mut payload = match which {
            0 => raft_wire::encode(&raft_messages()),
            1 => { let mut o = Vec::new(); encode_request(&mut o, 1, &requests()[0].1); o[16..].to_vec() }
            _ => { let mut o = Vec::new(); encode_response(&mut o, &responses()[2]); o[16..].to_vec() }
        };
        let i = at.index(payload.len());
        payload[i] = to;
        let _ = raft_wire::decode(&Bytes::from(payload.clone()));
        let _ = decode_request(kind::SUBMIT, &payload);
        let _ = decode_response(&payload);
    }

    #[test]
    fn a_frame_header_never_admits_more_than_the_limit(head in proptest::collection::vec(any::<u8>(), 16), max in 0u64..1 << 20) {
        let mut bytes = head.clone();
        bytes[0] = b'R';
        bytes[1] = b'F';
        bytes[2] = frame::VERSION;
        if let Ok(header) = frame::parse_header(&bytes.clone().try_into().unwrap(), max) {
            prop_assert!(header.len as u64 <= max);
        }
    }
}

/// Frames carved from one arena: each keeps its own bytes while later frames fill the arena
/// and the arena moves on to new memory (frames of 0 bytes to more than an arena).
#[test]
fn frames_read_from_an_arena_keep_their_bytes() {
    let payloads: Vec<Vec<u8>> = (0..400u32)
        .map(|n| {
            let len = match n % 7 {
                0 => 0,
                1 => frame::ARENA_BYTES + 3,
                _ => (n as usize * 997) % 9000,
            };
            (0..len).map(|i| (i as u32 ^ n.wrapping_mul(31)) as u8).collect()
        })
        .collect();
    let mut stream = Vec::new();
    for (n, payload) in payloads.iter().enumerate() {
        frame::encode(&mut stream, n as u8, payload);
    }
    let mut reader = futures_lite::io::Cursor::new(stream);
    let mut arena = bytes::BytesMut::new();
    let mut kept = Vec::new();
    futures_lite::future::block_on(async {
        for (n, payload) in payloads.iter().enumerate() {
            let frame = frame::read_in(&mut reader, 1 << 20, &mut arena).await.unwrap();
            assert_eq!((frame.kind, &frame.payload[..]), (n as u8, &payload[..]));
            // Every third frame outlives the reading of the others.
            if n % 3 == 0 {
                kept.push((n, frame.payload));
            }
        }
        let end = frame::read_in(&mut reader, 1 << 20, &mut arena).await;
        assert!(matches!(end, Err(frame::FrameError::Closed)), "{end:?}");
    });
    for (n, payload) in kept {
        assert_eq!(&payload[..], &payloads[n][..], "frame {n}");
    }
}

/// A frame whose checksum fails is an error, and the arena serves the next stream afterwards.
#[test]
fn a_corrupt_frame_read_from_an_arena_is_an_error() {
    let mut stream = Vec::new();
    frame::encode(&mut stream, 1, b"first");
    let at = stream.len() - 2;
    stream[at] ^= 0x40;
    let mut arena = bytes::BytesMut::new();
    futures_lite::future::block_on(async {
        let mut reader = futures_lite::io::Cursor::new(stream);
        let bad = frame::read_in(&mut reader, 1 << 20, &mut arena).await;
        assert!(bad.is_err(), "{bad:?}");
        let mut good = Vec::new();
        frame::encode(&mut good, 2, b"second");
        let mut reader = futures_lite::io::Cursor::new(good);
        let frame = frame::read_in(&mut reader, 1 << 20, &mut arena).await.unwrap();
        assert_eq!(&frame.payload[..], b"second");
    });
}

/// A node from before `GROUP_METRICS_V2` refuses it as an unknown request kind and closes the
/// connection (docs/client-protocol.md, "Errors on the connection"): the client asks again the
/// old way. Played here by a socket that answers as such a node did.
#[test]
fn group_metrics_from_a_node_without_v2_come_the_old_way() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let old_node = std::thread::spawn(move || {
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = Vec::new();
            let frame = loop {
                if let Some((frame, _)) = frame::decode(&buf, 1 << 20).unwrap() {
                    break frame;
                }
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).unwrap();
                assert!(n > 0, "the client closed before a whole request");
                buf.extend_from_slice(&chunk[..n]);
            };
            kinds.push(frame.kind);
            let (id, _) = decode_request(frame.kind, &frame.payload);
            let outcome = if frame.kind == kind::GROUP_METRICS {
                let old = responses().into_iter().find(|r| r.id == 7).unwrap();
                old.outcome
            } else {
                // What the old decoder said of a kind it did not know.
                Err(Failure::BadRequest(
                    frame::Malformed(format!("unknown request kind {:#04x}", frame.kind)).to_string(),
                ))
            };
            let mut out = Vec::new();
            encode_response(&mut out, &Response { id, outcome });
            stream.write_all(&out).unwrap();
        }
        kinds
    });
    let config = ringraft_net::client::ClientConfig::new([addr.clone()]);
    let groups = ringraft_net::client::fetch_group_metrics(&addr, &config).unwrap();
    assert_eq!(
        old_node.join().unwrap(),
        [kind::GROUP_METRICS_V2, kind::GROUP_METRICS]
    );
    assert_eq!(groups.len(), 1);
    assert_eq!((groups[0].commit, groups[0].first_index), (9, 0));
}
