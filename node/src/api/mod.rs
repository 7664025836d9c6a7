//! gRPC services: the etcd v3 API on the client port, the Raft transport on the peer port.

pub mod admin;
pub mod authority;
pub mod cluster;
pub mod election;
pub mod errors;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod ownership;
pub mod peer;
pub mod quota;
pub mod watch;

use prost::Message;
use tonic::Status;

use crate::member::Node;
use crate::raft::types::{Applied, Command};

/// Adds the member's identity to a header the apply layer filled with the revision only.
pub fn finish_header(node: &Node, header: &mut Option<crate::proto::etcdserverpb::ResponseHeader>) {
    let revision = header.as_ref().map_or(0, |h| h.revision);
    *header = Some(node.header(revision));
}

/// Proposes a write and decodes the etcd response the apply layer produced.
pub async fn propose<T: Message + Default>(node: &Node, command: Command) -> Result<T, Status> {
    match node.write(command).await? {
        Applied::Response(bytes) => {
            T::decode(bytes.as_slice()).map_err(|e| Status::internal(format!("etcdserver: {e}")))
        }
        Applied::Error(e) => Err(e.into()),
        Applied::Nothing => Err(Status::internal("etcdserver: write produced no response")),
    }
}
