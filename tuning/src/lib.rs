//! `ringraft-tuning`: configuration, validation, CPU topology and pinning, memlock.
//!
//! Not built yet: issue 4 fills this crate. Until then each crate keeps its own limits struct
//! with defaults and reasons (e.g. `ringraft_wal::WalConfig`), which this crate will map onto.
