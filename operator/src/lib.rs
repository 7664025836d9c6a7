//! The consensus operator: a pure planner shared by its platforms (Kubernetes, and local
//! processes for development and end-to-end tests).

pub mod local;
pub mod plan;
pub mod signal;
