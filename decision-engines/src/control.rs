//! What an engine decides: intents that the controller carries out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What to launch. The default is the domain's own deployable with no extra variables.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// The unique-instance key the instance is launched for; the controller must carry
    /// it into the instance record ([`Instance::unique_key`](crate::Instance::unique_key)).
    #[serde(default)]
    pub unique_key: Option<String>,
    /// Launch variables, added to (and overriding) the domain's deployable variables.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
}

impl LaunchSpec {
    /// A spec for one unique instance.
    pub fn unique(key: impl Into<String>, vars: BTreeMap<String, String>) -> Self {
        LaunchSpec {
            unique_key: Some(key.into()),
            vars,
        }
    }
}

/// One launch intent: `count` instances of `spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchIntent {
    /// How many.
    pub count: u32,
    /// What.
    pub spec: LaunchSpec,
}

/// The intents of one decision, in the order the engine made them.
///
/// The controller carries out destroys and launches, logs the reasons with the
/// decision, and before the next decision shows the launched instances (REQUESTING) and
/// the destroyed ones (TERMINATING) in the [`State`](crate::State).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    launches: Vec<LaunchIntent>,
    destroys: Vec<String>,
    reasons: Vec<String>,
}

impl Control {
    /// No intents.
    pub fn new() -> Self {
        Control::default()
    }

    /// Launch `count` instances of `spec`. A count of zero records nothing.
    pub fn launch(&mut self, count: u32, spec: LaunchSpec) {
        if count > 0 {
            self.launches.push(LaunchIntent { count, spec });
        }
    }

    /// Destroy these instances (by id). An id already recorded is not repeated.
    pub fn destroy(&mut self, ids: Vec<String>) {
        for id in ids {
            if !self.destroys.contains(&id) {
                self.destroys.push(id);
            }
        }
    }

    /// Explain the decision; the controller logs it with the intents.
    pub fn reason(&mut self, reason: impl Into<String>) {
        self.reasons.push(reason.into());
    }

    /// Launch intents, in order.
    pub fn launches(&self) -> &[LaunchIntent] {
        &self.launches
    }

    /// Ids to destroy, in order, without duplicates.
    pub fn destroys(&self) -> &[String] {
        &self.destroys
    }

    /// Reasons, in order.
    pub fn reasons(&self) -> &[String] {
        &self.reasons
    }

    /// Total instances to launch over all launch intents.
    pub fn launch_count(&self) -> u32 {
        self.launches
            .iter()
            .fold(0u32, |n, l| n.saturating_add(l.count))
    }

    /// No launch and no destroy (reasons alone do not count).
    pub fn is_empty(&self) -> bool {
        self.launches.is_empty() && self.destroys.is_empty()
    }
}
