//! `consensus-node`: a Raft member (openraft) with a durable write-ahead log, an MVCC
//! key-value store with etcd's semantics, and etcd's v3 gRPC API.

pub mod allocator;
pub mod api;
pub mod backup;
pub mod failpoint;
pub mod health;
pub mod kv;
pub mod lease;
pub mod member;
pub mod metrics;
pub mod proto;
pub mod raft;
pub mod restore;
pub mod server;
pub mod storage;
