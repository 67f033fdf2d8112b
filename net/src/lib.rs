//! `ringraft-net`: the wire format, the TCP peer transport, the client protocol, the client
//! library and the `ringraft` node binary.
//!
//! **Owns**: every byte that crosses a socket. Frames ([`frame`]: magic, version, kind, length,
//! crc32c; spec in `docs/wire-format.md`), the peer handshake ([`handshake`]: cluster id, node
//! id, shard, HMAC-SHA256 over fresh nonces with the cluster key), raft message batches
//! ([`raft_wire`]: entry data at 16-byte offsets, read in place), the client protocol
//! ([`protocol`]; spec in `docs/client-protocol.md`), the transport ([`TcpTransport`], the
//! engine's `Transport` seam) and the per-shard client server, and the client library
//! ([`client`], and [`executor_client`] for callers on a glommio executor).
//!
//! **Invariants**: a frame's length is checked against `limits.frame_bytes_max` before its
//! payload is allocated; nothing a peer sends reaches raft before its handshake authenticated
//! it, and a message whose sender is not that peer is dropped; every send queue is bounded
//! (a full one drops and tells raft, which resends); bad bytes from a peer or client close that
//! connection only; shard `s` talks only to shard `s` of other nodes.

pub mod client;
pub mod coarse;
pub mod executor_client;
pub mod frame;
pub mod handshake;
pub mod metrics;
pub mod node;
mod peer;
pub mod ports;
pub mod protocol;
pub mod raft_wire;
mod server;
pub mod snap_wire;

pub use crate::peer::TcpTransport;
