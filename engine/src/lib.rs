//! `ringraft-engine`: shards, the raft driver, batching, apply, the embedded API and the node
//! binary.
//!
//! Not built yet: issue 5 fills this crate.
