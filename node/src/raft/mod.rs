//! Consensus glue over openraft: type configuration, log storage, state machine, network.

pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod types;
