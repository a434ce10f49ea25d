//! The vocabulary every epu part shares: node lifecycle states, worker health, and
//! the bodies of every message. Pure data: no IO, no async, serde only.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod health;
pub mod lifecycle;
pub mod messages;

pub use lifecycle::{Health, NodeState, ParseStateError};
