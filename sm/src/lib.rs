//! `ringraft-sm`: the command batch format (rkyv), the `StateMachine` trait and the built-in
//! direct-IO key-value store.
//!
//! Not built yet: issue 3 fills this crate. It is part of the workspace so the crate map of
//! `ARCHITECTURE.md` holds from the first commit.
