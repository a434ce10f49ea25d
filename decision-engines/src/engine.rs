//! The [`DecisionEngine`] trait and what it reports.

use std::collections::HashSet;

use crate::config::{ConfigError, EngineConfig};
use crate::control::Control;
use crate::state::State;

/// A decision engine: a pure function of (state, configuration, its own memory) to
/// intents. See the [crate documentation](crate) for the contract.
///
/// The trait is object-safe and engines are `Send`, so the controller holds them as
/// `Box<dyn DecisionEngine>`, one per domain.
pub trait DecisionEngine: Send {
    /// Take the full configuration. Called once, before any other method.
    fn initialize(&mut self, conf: &EngineConfig) -> Result<(), ConfigError>;

    /// Decide on `state`, recording intents in `control`. Deterministic: the same
    /// sequence of states (with their `now`) gives the same intents. Never reads the
    /// system clock and does no IO. On `Err`, the controller discards `control`.
    fn decide(&mut self, state: &State, control: &mut Control) -> Result<(), EngineError>;

    /// Lay a *partial* configuration over the current one
    /// ([`EngineConfig::merged`]). The merged configuration is validated in full first;
    /// if it is refused, the engine is left exactly as it was.
    fn reconfigure(&mut self, conf: &EngineConfig) -> Result<(), ConfigError>;

    /// The engine's own view of how the domain is doing, for `epumgmt inspect`.
    fn report(&self) -> EngineReport;
}

pub use epu_model::messages::{EngineReport, EngineState};

/// Why a decision could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// `decide` was called before a successful `initialize`.
    #[error("the engine is not initialized")]
    NotInitialized,
    /// The state makes no sense (for example two instances share an id).
    #[error("invalid state: {0}")]
    InvalidState(String),
    /// Anything else (for custom engines).
    #[error("{0}")]
    Other(String),
}

/// Refuse a state in which two instances share an id.
pub fn check_state(state: &State) -> Result<(), EngineError> {
    let mut seen = HashSet::with_capacity(state.instances.len());
    for i in &state.instances {
        if !seen.insert(i.id.as_str()) {
            return Err(EngineError::InvalidState(format!(
                "instance id {:?} appears more than once in domain {:?}",
                i.id, state.domain
            )));
        }
    }
    Ok(())
}
