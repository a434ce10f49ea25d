//! The contract every epu service shares: wire types, the bus, config, telemetry,
//! the store, the clock and the one backoff schedule.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod bus;
pub mod clock;
pub mod config;
pub mod failpoint;
pub mod request;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod testing;
pub mod wire;
pub use epu_model as model;
