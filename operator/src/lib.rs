//! The consensus operator: keeps ConsensusClusters in their declared shape.
//!
//! `plan` decides (pure), `resources` describes the objects a cluster is made of (pure),
//! and each platform observes and acts: `k8s` on Kubernetes.

pub mod k8s;
pub mod plan;
pub mod resources;
