//! The consensus operator: keeps ConsensusClusters in their declared shape.
//!
//! `plan` decides (pure), `resources` describes the objects a cluster is made of (pure),
//! and each platform observes and acts: `k8s` on Kubernetes, `local` with member processes
//! on this machine (development and end-to-end tests).

pub mod fault;
pub mod k8s;
pub mod local;
pub mod membership;
pub mod plan;
pub mod platform;
pub mod resources;
pub mod signal;
