//! The `ConsensusCluster` and `ConsensusBackup` APIs: group `consensus.dev`, version `v1alpha1`.
//!
//! The Rust types are the source of truth. `crdgen` renders them into the CRD under
//! `manifests/crds/`, and `make test` fails when the two disagree.

mod backup;
mod duration;
pub mod quantity;
mod reference;
mod spec;
mod status;
mod validate;

pub use backup::*;
pub use duration::{DurationError, parse_duration};
pub use reference::reference_markdown;
pub use spec::*;
pub use status::*;
pub use validate::{SpecProblem, parse_schedule, validate_spec};

/// Field manager the operator uses for server-side apply of the objects it owns.
pub const FIELD_MANAGER: &str = "consensus-operator";
/// Asks for a recovery from quorum loss now, whatever `spec.recovery` says: its value is the
/// time of the request (RFC 3339, UTC), which must be after the loss began, so a request
/// left on the resource never recovers from a later loss nobody looked at.
pub const RECOVER_ANNOTATION: &str = "consensus.dev/recover";
/// Field manager for status patches, kept apart so spec and status ownership never collide.
pub const STATUS_FIELD_MANAGER: &str = "consensus-operator-status";
