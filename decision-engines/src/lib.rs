//! Decision engines for the EPU controller: the [`DecisionEngine`] trait, the
//! [`State`] an engine decides from, the [`Control`] it records intents in, the
//! [`Registry`] of engines by name, and the built-in engines
//! [`npreserving`] and [`queuelen`].
//!
//! # The contract
//!
//! An engine is a plain, **synchronous** Rust value: a pure function of
//! (state, configuration, clock, its own memory) → intents. It does no IO, never reads
//! the system clock (time is [`State::now`]), needs no async runtime, and knows nothing
//! of AMQP. Given the same sequence of states it makes the same decisions, so engines
//! are tested and simulated without a broker or a real clock.
//!
//! The controller (the shell around the engine):
//! 1. creates the engine by name from the [`Registry`] with the domain's configuration
//!    ([`Registry::create`] = make + [`initialize`](DecisionEngine::initialize));
//! 2. on each tick builds a [`State`]: the instances with their lifecycle state,
//!    health and busyness, the backlog reading (ready messages *plus* jobs held by busy
//!    workers, as the sensor aggregator computes it), and the domain's
//!    [`LaunchFailures`] (fed with [`LaunchFailures::observe`] on every node update);
//! 3. calls [`decide`](DecisionEngine::decide) with a fresh [`Control`] and, if it
//!    returns `Ok`, carries out the intents: destroys, then launches, logging the
//!    reasons with them;
//! 4. **shows its own intents in the next state**: an instance it asked to launch
//!    appears at least as REQUESTING (carrying the spec's
//!    [`unique_key`](LaunchSpec::unique_key)), one it asked to destroy as TERMINATING.
//!    Engines count booting instances as capacity and do not remember what they asked
//!    for, so a shell that does not do this makes them launch twice;
//! 5. passes operator reconfigurations (partial maps) to
//!    [`reconfigure`](DecisionEngine::reconfigure); when that succeeds it persists
//!    `old.merged(partial)` ([`EngineConfig::merged`]), which is exactly the
//!    configuration the engine now runs with;
//! 6. shows [`report`](DecisionEngine::report) in `epumgmt inspect`.
//!
//! Engines choose victims, never the shell. Unhealthy instances — health MISSING,
//! ZOMBIE or PROCESS_ERROR, or state RUNNING_FAILED — are destroyed and replaced by
//! the built-in engines (see [`Instance::needs_termination`]).
//!
//! # Writing your own engine
//!
//! Implement [`DecisionEngine`] and register a factory under a name; the controller
//! then accepts that name in a domain's policy. The helpers on [`EngineConfig`] parse
//! keys leniently and produce errors that name the key.
//!
//! ```
//! use decision_engines::{
//!     ConfigError, Control, DecisionEngine, EngineConfig, EngineError, EngineReport,
//!     EngineState, Instance, LaunchSpec, NodeState, Registry, State,
//! };
//! use serde_json::json;
//!
//! /// Keeps `size` instances, ignoring health (a toy).
//! #[derive(Default)]
//! struct Fixed {
//!     conf: EngineConfig,
//!     size: Option<u32>,
//! }
//!
//! impl Fixed {
//!     fn parse(conf: &EngineConfig) -> Result<u32, ConfigError> {
//!         conf.ensure_known_keys(&["size"])?;
//!         conf.require_u32("size")
//!     }
//! }
//!
//! impl DecisionEngine for Fixed {
//!     fn initialize(&mut self, conf: &EngineConfig) -> Result<(), ConfigError> {
//!         self.size = Some(Self::parse(conf)?);
//!         self.conf = conf.clone();
//!         Ok(())
//!     }
//!
//!     fn decide(&mut self, state: &State, control: &mut Control) -> Result<(), EngineError> {
//!         let size = self.size.ok_or(EngineError::NotInitialized)?;
//!         let live = state.instances.iter().filter(|i| i.state.is_live()).count() as u32;
//!         if live < size {
//!             control.reason(format!("{live} live, want {size}"));
//!             control.launch(size - live, LaunchSpec::default());
//!         }
//!         Ok(())
//!     }
//!
//!     fn reconfigure(&mut self, partial: &EngineConfig) -> Result<(), ConfigError> {
//!         let merged = self.conf.merged(partial);
//!         let size = Self::parse(&merged)?; // validate first: on error nothing changes
//!         self.size = Some(size);
//!         self.conf = merged;
//!         Ok(())
//!     }
//!
//!     fn report(&self) -> EngineReport {
//!         EngineReport::new(EngineState::Stable, json!({ "size": self.size }))
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut registry = Registry::with_builtins();
//! registry.register("fixed", || Box::new(Fixed::default()))?;
//!
//! let conf = EngineConfig::from_json(json!({ "size": "3" }))?; // strings are fine
//! let mut engine = registry.create("fixed", &conf)?;
//!
//! let now = "2024-05-01T12:00:00Z".parse()?;
//! let state = State::new("workers", now)
//!     .with_instance(Instance::new("n-1", NodeState::Running, now));
//! let mut control = Control::new();
//! engine.decide(&state, &mut control)?;
//! assert_eq!(control.launch_count(), 2);
//!
//! // A bad reconfigure is refused, names the key, and changes nothing.
//! let err = engine
//!     .reconfigure(&EngineConfig::new().with("size", -1))
//!     .unwrap_err();
//! assert_eq!(err.key, "size");
//! assert_eq!(
//!     err.to_string(),
//!     r#"invalid value for "size": expected a non-negative integer, got -1"#
//! );
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod backoff;
pub mod config;
pub mod control;
pub mod engine;
pub mod npreserving;
pub mod queuelen;
pub mod registry;
pub mod state;

pub use backoff::Backoff;
pub use config::{ConfigError, ConfigErrorKind, EngineConfig};
pub use control::{Control, LaunchIntent, LaunchSpec};
pub use engine::{DecisionEngine, EngineError, EngineReport, EngineState};
pub use npreserving::{NPreservingConfig, NPreservingEngine};
pub use queuelen::{QueueLenConfig, QueueLenEngine};
pub use registry::{EngineFactory, Registry, RegistryError};
pub use state::{
    victim_order, Health, Instance, LaunchFailures, NodeState, ParseStateError, Reading,
    SensorReadings, State,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn engines_are_send_and_object_safe() {
        assert_send::<Box<dyn DecisionEngine>>();
        assert_send::<NPreservingEngine>();
        assert_send::<QueueLenEngine>();
        assert_send_sync::<Registry>();
    }
}
