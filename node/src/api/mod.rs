//! gRPC services: the etcd v3 API on the client port, the Raft transport on the peer port.

pub mod authority;
pub mod cluster;
pub mod errors;
pub mod kv;
pub mod maintenance;
pub mod peer;
pub mod watch;
