//! Durable storage of a member: the Raft log (write-ahead log) and its hard state (vote).

pub mod hard_state;
pub mod wal;
