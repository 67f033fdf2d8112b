//! `ringraft-net`: framing, peer transport, client protocol and client library.
//!
//! Not built yet: issue 6 fills this crate.
