//! The Kubernetes platform: a kube-runtime Controller that observes, asks the planner,
//! and acts through server-side apply, Events and status.

mod apply;
mod backups;
mod error;
pub mod events;
pub mod http;
mod leader;
pub mod metrics;
mod observe;
pub mod reconcile;
mod recovery;
mod requests;
mod run;
mod triggers;

pub use error::Error;
pub use run::{RunArgs, require_crd, run};
