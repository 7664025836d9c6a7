//! The consensus operator: keeps ConsensusClusters in their declared shape.
//!
//! `plan` decides (pure), `resources` describes the objects a cluster is made of (pure),
//! and each platform observes and acts.

pub mod plan;
pub mod resources;
