//! Engines by name.

use std::collections::BTreeMap;
use std::fmt;

use crate::config::{ConfigError, EngineConfig};
use crate::engine::DecisionEngine;
use crate::npreserving::NPreservingEngine;
use crate::queuelen::QueueLenEngine;

/// Makes a fresh, unconfigured engine.
pub type EngineFactory = Box<dyn Fn() -> Box<dyn DecisionEngine> + Send + Sync>;

/// Engine names → factories. The controller looks up a domain's `engine` name here.
///
/// `Registry` is `Send + Sync`, so one registry can be shared by all domains.
#[derive(Default)]
pub struct Registry {
    factories: BTreeMap<String, EngineFactory>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("engines", &self.names())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// A registry with the built-in engines: `npreserving` and `queuelen`.
    pub fn with_builtins() -> Self {
        let mut factories: BTreeMap<String, EngineFactory> = BTreeMap::new();
        factories.insert(
            crate::npreserving::NAME.to_owned(),
            Box::new(|| Box::new(NPreservingEngine::new())),
        );
        factories.insert(
            crate::queuelen::NAME.to_owned(),
            Box::new(|| Box::new(QueueLenEngine::new())),
        );
        Registry { factories }
    }

    /// Add an engine under `name`. A name already taken is refused.
    pub fn register<F>(&mut self, name: impl Into<String>, factory: F) -> Result<(), RegistryError>
    where
        F: Fn() -> Box<dyn DecisionEngine> + Send + Sync + 'static,
    {
        let name = name.into();
        if name.trim().is_empty() {
            return Err(RegistryError::InvalidName(name));
        }
        if self.factories.contains_key(&name) {
            return Err(RegistryError::DuplicateName(name));
        }
        self.factories.insert(name, Box::new(factory));
        Ok(())
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.factories.contains_key(name)
    }

    /// The registered names, sorted.
    pub fn names(&self) -> Vec<&str> {
        self.factories.keys().map(String::as_str).collect()
    }

    /// Make the engine `name` and initialize it with `conf`.
    pub fn create(
        &self,
        name: &str,
        conf: &EngineConfig,
    ) -> Result<Box<dyn DecisionEngine>, RegistryError> {
        let factory = self
            .factories
            .get(name)
            .ok_or_else(|| RegistryError::UnknownEngine {
                name: name.to_owned(),
                known: self.factories.keys().cloned().collect(),
            })?;
        let mut engine = factory();
        engine
            .initialize(conf)
            .map_err(|source| RegistryError::Config {
                engine: name.to_owned(),
                source,
            })?;
        Ok(engine)
    }
}

/// Registry errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// No engine of that name.
    #[error("unknown decision engine {name:?}; known engines: {}", known.join(", "))]
    UnknownEngine {
        /// The name asked for.
        name: String,
        /// The registered names.
        known: Vec<String>,
    },
    /// The name is already registered.
    #[error("a decision engine named {0:?} is already registered")]
    DuplicateName(String),
    /// The name is empty.
    #[error("invalid decision engine name {0:?}")]
    InvalidName(String),
    /// The engine refused its configuration.
    #[error("decision engine {engine:?}: {source}")]
    Config {
        /// The engine's name.
        engine: String,
        /// Why.
        #[source]
        source: ConfigError,
    },
}
