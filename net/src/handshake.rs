//! The peer handshake (sans-IO; the transport does the reads and writes). Specified in
//! `docs/wire-format.md`.
//!
//! 1. The dialer sends `HELLO` (protocol version, cluster id, node id, shard, 32-byte random
//!    nonce). The acceptor checks version, cluster id, that the node id is a cluster member other
//!    than itself and that the shard is its own; on any mismatch it closes.
//! 2. The acceptor answers with its own `HELLO`; the dialer checks it the same way, and that the
//!    node id is the one it dialed.
//! 3. Each side sends `AUTH`: HMAC-SHA256 under the cluster key over a role byte (1 dialer,
//!    2 acceptor) and both `HELLO` payloads, dialer's first. Each verifies the other's proof in
//!    constant time. Fresh nonces on both sides make a recorded proof useless later; the role
//!    byte stops a proof being reflected back.
//!
//! Nothing a peer sends reaches raft before both proofs verified. Without a configured key (only
//! allowed on loopback) the HMAC runs with an empty key: it still checks identities, not secrets.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::frame::{Cursor, Malformed};

/// Peer protocol version carried in `HELLO`.
pub const PROTOCOL_VERSION: u16 = 1;
pub const HELLO_BYTES: usize = 64;
pub const PROOF_BYTES: usize = 32;
const DOMAIN: &[u8] = b"ringraft peer auth v1";

/// One side's `HELLO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub cluster: u64,
    pub node: u64,
    pub shard: u64,
    pub nonce: [u8; 32],
}

impl Hello {
    /// A `HELLO` with a fresh random nonce.
    pub fn new(cluster: u64, node: u64, shard: u64) -> Hello {
        let mut nonce = [0u8; 32];
        getrandom::getrandom(&mut nonce).expect("the OS random source works");
        Hello {
            version: PROTOCOL_VERSION,
            cluster,
            node,
            shard,
            nonce,
        }
    }

    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut out = [0u8; HELLO_BYTES];
        out[0..2].copy_from_slice(&self.version.to_le_bytes());
        out[8..16].copy_from_slice(&self.cluster.to_le_bytes());
        out[16..24].copy_from_slice(&self.node.to_le_bytes());
        out[24..32].copy_from_slice(&self.shard.to_le_bytes());
        out[32..64].copy_from_slice(&self.nonce);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Hello, Malformed> {
        let mut c = Cursor::new(bytes);
        let version = c.u16("version")?;
        c.bytes(6, "reserved")?;
        let hello = Hello {
            version,
            cluster: c.u64("cluster id")?,
            node: c.u64("node id")?,
            shard: c.u64("shard")?,
            nonce: c.bytes(32, "nonce")?.try_into().unwrap(),
        };
        c.finish("hello")?;
        Ok(hello)
    }
}

/// Why a handshake failed. Each is logged and the connection closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("malformed hello: {0}")]
    Malformed(#[from] Malformed),
    #[error("peer speaks protocol version {0}, this node {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("peer belongs to cluster {theirs}, this node to cluster {ours}")]
    Cluster { ours: u64, theirs: u64 },
    #[error("node {0} is not a member of this cluster")]
    UnknownNode(u64),
    #[error("peer claims node id {0}, which is this node's own")]
    SelfConnection(u64),
    #[error("expected node {expected}, peer says it is node {got}")]
    WrongNode { expected: u64, got: u64 },
    #[error("peer shard {theirs} connected to shard {ours} (shards talk only to the same shard)")]
    Shard { ours: u64, theirs: u64 },
    #[error("peer's authentication failed (wrong cluster key?)")]
    Auth,
    #[error("unexpected frame kind {0:#04x} during the handshake")]
    UnexpectedFrame(u8),
}

/// What one side knows before the handshake.
#[derive(Clone, Debug)]
pub struct Local {
    pub cluster: u64,
    pub node: u64,
    pub shard: u64,
    pub members: Vec<u64>,
    pub key: Vec<u8>,
}

impl Local {
    /// Checks the other side's `HELLO`; `expected` is the node a dialer dialed.
    pub fn check(&self, bytes: &[u8], expected: Option<u64>) -> Result<Hello, HandshakeError> {
        let hello = Hello::decode(bytes)?;
        if hello.version != PROTOCOL_VERSION {
            return Err(HandshakeError::Version(hello.version));
        }
        if hello.cluster != self.cluster {
            return Err(HandshakeError::Cluster {
                ours: self.cluster,
                theirs: hello.cluster,
            });
        }
        if hello.node == self.node {
            return Err(HandshakeError::SelfConnection(hello.node));
        }
        if !self.members.contains(&hello.node) {
            return Err(HandshakeError::UnknownNode(hello.node));
        }
        if let Some(expected) = expected {
            if hello.node != expected {
                return Err(HandshakeError::WrongNode {
                    expected,
                    got: hello.node,
                });
            }
        }
        if hello.shard != self.shard {
            return Err(HandshakeError::Shard {
                ours: self.shard,
                theirs: hello.shard,
            });
        }
        Ok(hello)
    }

    fn mac(&self, role: u8, dialer: &Hello, acceptor: &Hello) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(DOMAIN);
        mac.update(&[role]);
        mac.update(&dialer.encode());
        mac.update(&acceptor.encode());
        mac
    }

    /// This side's proof. `dialing` says which role this side plays.
    pub fn proof(&self, dialing: bool, dialer: &Hello, acceptor: &Hello) -> [u8; PROOF_BYTES] {
        let role = if dialing { 1 } else { 2 };
        self.mac(role, dialer, acceptor).finalize().into_bytes().into()
    }

    /// Verifies the other side's proof (constant time).
    pub fn verify(
        &self,
        dialing: bool,
        dialer: &Hello,
        acceptor: &Hello,
        proof: &[u8],
    ) -> Result<(), HandshakeError> {
        let role = if dialing { 2 } else { 1 };
        self.mac(role, dialer, acceptor)
            .verify_slice(proof)
            .map_err(|_| HandshakeError::Auth)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(node: u64, key: &str) -> Local {
        Local {
            cluster: 7,
            node,
            shard: 0,
            members: vec![1, 2, 3],
            key: key.as_bytes().to_vec(),
        }
    }

    /// Runs both sides; returns the dialer's and acceptor's verdicts on each other.
    fn run(dialer: &Local, acceptor: &Local) -> (Result<(), HandshakeError>, Result<(), HandshakeError>) {
        let d_hello = Hello::new(dialer.cluster, dialer.node, dialer.shard);
        let a_hello = Hello::new(acceptor.cluster, acceptor.node, acceptor.shard);
        let seen_by_acceptor = match acceptor.check(&d_hello.encode(), None) {
            Ok(h) => h,
            Err(e) => return (Ok(()), Err(e)),
        };
        let seen_by_dialer = match dialer.check(&a_hello.encode(), Some(acceptor.node)) {
            Ok(h) => h,
            Err(e) => return (Err(e), Ok(())),
        };
        let d_proof = dialer.proof(true, &d_hello, &seen_by_dialer);
        let a_proof = acceptor.proof(false, &seen_by_acceptor, &a_hello);
        (
            dialer.verify(true, &d_hello, &seen_by_dialer, &a_proof),
            acceptor.verify(false, &seen_by_acceptor, &a_hello, &d_proof),
        )
    }

    #[test]
    fn same_key_authenticates_both_ways() {
        assert_eq!(run(&local(1, "secret"), &local(2, "secret")), (Ok(()), Ok(())));
        assert_eq!(run(&local(1, ""), &local(2, "")), (Ok(()), Ok(())));
    }

    #[test]
    fn wrong_key_is_refused_by_both() {
        let (d, a) = run(&local(1, "secret"), &local(2, "guess"));
        assert_eq!((d, a), (Err(HandshakeError::Auth), Err(HandshakeError::Auth)));
    }

    #[test]
    fn identities_are_checked() {
        let mut other_cluster = local(1, "k");
        other_cluster.cluster = 8;
        assert_eq!(
            run(&other_cluster, &local(2, "k")).1,
            Err(HandshakeError::Cluster { ours: 7, theirs: 8 })
        );
        assert_eq!(
            run(&local(9, "k"), &local(2, "k")).1,
            Err(HandshakeError::UnknownNode(9))
        );
        assert_eq!(
            run(&local(2, "k"), &local(2, "k")).1,
            Err(HandshakeError::SelfConnection(2))
        );
        let mut other_shard = local(1, "k");
        other_shard.shard = 1;
        assert_eq!(
            run(&other_shard, &local(2, "k")).1,
            Err(HandshakeError::Shard { ours: 0, theirs: 1 })
        );
        let mut old = Hello::new(7, 1, 0).encode();
        old[0] = 0;
        assert_eq!(local(2, "k").check(&old, None), Err(HandshakeError::Version(0)));
        let hello = Hello::new(7, 3, 0).encode();
        assert_eq!(
            local(1, "k").check(&hello, Some(2)),
            Err(HandshakeError::WrongNode { expected: 2, got: 3 })
        );
    }

    #[test]
    fn a_proof_cannot_be_replayed_or_reflected() {
        let (d, a) = (local(1, "k"), local(2, "k"));
        let d_hello = Hello::new(7, 1, 0);
        let a_hello = Hello::new(7, 2, 0);
        let d_proof = d.proof(true, &d_hello, &a_hello);
        // Reflected: the acceptor's own proof is not accepted as the dialer's.
        let a_proof = a.proof(false, &d_hello, &a_hello);
        assert_eq!(
            a.verify(false, &d_hello, &a_hello, &a_proof),
            Err(HandshakeError::Auth)
        );
        // Replayed against a fresh acceptor nonce.
        let fresh = Hello::new(7, 2, 0);
        assert_eq!(
            a.verify(false, &d_hello, &fresh, &d_proof),
            Err(HandshakeError::Auth)
        );
        assert_eq!(a.verify(false, &d_hello, &a_hello, &d_proof), Ok(()));
    }
}
