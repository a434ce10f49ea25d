//! What the provisioner stores, and the one rule by which a node record changes.
//!
//! # Store layout
//!
//! One tree, [`TREE`], so a launch and its nodes are written in one atomic batch:
//!
//! | key | value |
//! |---|---|
//! | `launch/<launch_id>` | [`StoredLaunch`]: the request, its token, its node ids |
//! | `node/<node_id>` | [`StoredNode`]: the [`NodeRecord`] plus private data |
//! | `meta/enabled` | `true` / `false` (`terminate_all` / `enable`) |
//!
//! # The rule
//!
//! [`apply`]: an update's *facts* (IaaS id, addresses) are recorded whenever they are
//! new; its *state* only if it is later than the current one. A duplicate or
//! out-of-order state is dropped.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use epu_core::wire::Service;
use epu_model::messages::{Deployable, FailReason, NodeRecord, ProvisionRequest};
use epu_model::NodeState;
use serde::{Deserialize, Serialize};

/// The provisioner's store tree.
pub const TREE: &str = "provisioner";
/// Key of the enabled flag.
pub const META_ENABLED: &str = "meta/enabled";
/// Key of the change feed's head: the last revision given to a record's change.
pub const META_REVISION: &str = "meta/revision";
/// Key of the highest revision of a pruned record.
pub const META_COMPACTED: &str = "meta/compacted";
/// Largest `count` of one `provision`.
pub const MAX_COUNT: i64 = 100_000;

pub fn node_key(node_id: &str) -> String {
    format!("node/{node_id}")
}

pub fn launch_key(launch_id: &str) -> String {
    format!("launch/{launch_id}")
}

/// A node as stored: the public record and what only the provisioner needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredNode {
    pub record: NodeRecord,
    /// Where `instance_info` goes.
    pub subscriber: Service,
    /// The driver's second identity of the instance (local: process start time).
    #[serde(default)]
    pub incarnation: Option<String>,
}

impl StoredNode {
    /// A node whose `instance_info` goes to the controller, no incarnation known.
    pub fn for_controller(record: NodeRecord) -> Self {
        StoredNode {
            record,
            subscriber: Service::Controller,
            incarnation: None,
        }
    }
}

/// A launch as stored, before the IaaS is called.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredLaunch {
    pub launch_id: String,
    pub domain: String,
    /// The idempotency token (EC2 `ClientToken`), the same on every retry and re-drive.
    pub token: String,
    pub deployable: Deployable,
    pub node_ids: Vec<String>,
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    pub subscriber: Service,
    pub requested_at: DateTime<Utc>,
}

/// A change to one node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Update {
    pub node_id: String,
    pub state: Option<NodeState>,
    pub reason: Option<FailReason>,
    pub detail: Option<String>,
    pub iaas_id: Option<String>,
    pub incarnation: Option<String>,
    pub addresses: Option<Vec<String>>,
}

impl Update {
    pub fn state(node_id: &str, state: NodeState) -> Self {
        Update {
            node_id: node_id.to_string(),
            state: Some(state),
            ..Update::default()
        }
    }

    pub fn failed(node_id: &str, reason: FailReason, detail: impl Into<String>) -> Self {
        Update {
            node_id: node_id.to_string(),
            state: Some(NodeState::Failed),
            reason: Some(reason),
            detail: Some(detail.into()),
            ..Update::default()
        }
    }

    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// What [`apply`] changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Applied {
    pub state: bool,
    pub facts: bool,
}

impl Applied {
    pub fn any(self) -> bool {
        self.state || self.facts
    }
}

/// Applies `u` to `node` at time `now` (see the module docs).
pub fn apply(node: &mut StoredNode, u: &Update, now: DateTime<Utc>) -> Applied {
    let mut applied = Applied::default();
    let rec = &mut node.record;
    if let Some(id) = &u.iaas_id {
        // The first id wins: a second instance for the same node is a zombie, not a
        // replacement.
        if rec.iaas_id.is_none() {
            rec.iaas_id = Some(id.clone());
            node.incarnation = u.incarnation.clone();
            applied.facts = true;
        }
    }
    if let Some(addrs) = &u.addresses {
        if !addrs.is_empty() && *addrs != rec.addresses {
            rec.addresses = addrs.clone();
            applied.facts = true;
        }
    }
    if let Some(state) = u.state {
        if state > rec.state {
            rec.state = state;
            rec.state_times.insert(state, now);
            if u.reason.is_some() {
                rec.reason = u.reason;
            }
            if u.detail.is_some() {
                rec.reason_detail = u.detail.clone();
            }
            applied.state = true;
        }
    }
    applied
}

/// A node waits for its launch: no instance yet, nobody asked it to go.
pub fn awaits_launch(rec: &NodeRecord) -> bool {
    rec.iaas_id.is_none() && rec.state < NodeState::Pending
}

fn valid_id(what: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {id:?} is not valid: use 1 to 128 characters of A-Z a-z 0-9 - _ . : (not starting with '.')"
        ))
    }
}

fn valid_var_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphabetic() || b == b'_' => {}
        _ => return false,
    }
    name.len() <= 128 && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks a `provision` request beyond what its types check. The error is the
/// `bad_request` message.
pub fn validate_request(req: &ProvisionRequest) -> Result<(), String> {
    validate_shape(req)?;
    validate_deployable(req)
}

/// The checks without which no node can be recorded: the launch id, the domain,
/// the count and node ids, the var names. A request failing them is answered
/// `bad_request` and leaves nothing behind.
pub fn validate_shape(req: &ProvisionRequest) -> Result<(), String> {
    valid_id("launch_id", &req.launch_id)?;
    if req.domain.trim().is_empty() {
        return Err("domain must not be empty".into());
    }
    if req.count < 1 {
        return Err(format!("count must be at least 1, got {}", req.count));
    }
    if req.count > MAX_COUNT {
        return Err(format!(
            "count must be at most {MAX_COUNT} per launch, got {}",
            req.count
        ));
    }
    if !req.node_ids.is_empty() {
        if req.node_ids.len() as i64 != req.count {
            return Err(format!(
                "node_ids has {} ids but count is {}",
                req.node_ids.len(),
                req.count
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for id in &req.node_ids {
            valid_id("node id", id)?;
            if !seen.insert(id) {
                return Err(format!("node id {id:?} appears twice"));
            }
        }
    }
    for name in req.vars.keys() {
        if !valid_var_name(name) {
            return Err(format!(
                "var name {name:?} is not valid: use letters, digits and '_', not starting with a digit"
            ));
        }
    }
    if let Some(sub) = &req.subscriber {
        parse_subscriber(sub)?;
    }
    Ok(())
}

/// The checks of what the request asks to launch (its deployable). A request of
/// good shape failing them is a refusal the provisioner records (its nodes
/// REJECTED with REQUEST_REFUSED), so the requester learns it from `instance_info`.
pub fn validate_deployable(req: &ProvisionRequest) -> Result<(), String> {
    match &req.deployable {
        Deployable::Local(l) => {
            if l.command.trim().is_empty() {
                return Err("deployable.command must not be empty".into());
            }
        }
        Deployable::Ec2(e) => {
            if e.image.trim().is_empty() {
                return Err("deployable.image must not be empty".into());
            }
            if e.instance_type.trim().is_empty() {
                return Err("deployable.instance_type must not be empty".into());
            }
            for key in e.tags.keys() {
                if key.starts_with("epu:") {
                    return Err(format!(
                        "deployable.tags: {key:?} is reserved (the provisioner sets epu:* tags)"
                    ));
                }
            }
            if let Some(t) = &e.user_data {
                let ctx = crate::driver::TemplateContext {
                    node_id: Some("n"),
                    run: "r",
                    domain: "d",
                    launch_id: "l",
                    heartbeat: "",
                    vars: Some(&req.vars),
                };
                crate::driver::render_template(t, &ctx)
                    .map_err(|e| format!("deployable.user_data: {e}"))?;
            }
        }
        Deployable::Sim(s) => {
            if let Some(b) = s.boot_secs {
                if !b.is_finite() || !(0.0..=1.0e7).contains(&b) {
                    return Err(format!("deployable.boot_secs must be ≥ 0, got {b}"));
                }
            }
            if let Some(f) = s.failure_rate {
                if !(0.0..=1.0).contains(&f) {
                    return Err(format!("deployable.failure_rate must be in 0..=1, got {f}"));
                }
            }
        }
    }
    Ok(())
}

/// The service `instance_info` goes to: a service name (`controller`).
pub fn parse_subscriber(s: &str) -> Result<Service, String> {
    s.parse::<Service>().map_err(|_| {
        format!(
            "subscriber {s:?} is not a service: use \"controller\" (the default) or leave it out"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use epu_model::messages::{Ec2Deployable, LocalDeployable, SimDeployable};

    fn node(state: NodeState) -> StoredNode {
        StoredNode::for_controller(
            epu_testkit::records::node("d", "n")
                .run("r")
                .launch("l")
                .state(state)
                .at(DateTime::<Utc>::UNIX_EPOCH)
                .build(),
        )
    }

    #[test]
    fn states_only_move_forward_but_facts_always_land() {
        let now = Utc::now();
        let mut n = node(NodeState::Requesting);
        let a = apply(&mut n, &Update::state("n", NodeState::Running), now);
        assert!(a.state);
        assert_eq!(n.record.state, NodeState::Running);
        assert_eq!(n.record.state_times.get(&NodeState::Running), Some(&now));
        // Duplicate and out of order: dropped.
        assert!(!apply(&mut n, &Update::state("n", NodeState::Running), now).any());
        assert!(!apply(&mut n, &Update::state("n", NodeState::Pending), now).any());
        // Terminating first, then the launch result arrives: id kept, state kept.
        let mut t = node(NodeState::Terminating);
        let late = Update {
            iaas_id: Some("i-1".into()),
            incarnation: Some("77".into()),
            ..Update::state("n", NodeState::Requested)
        };
        let a = apply(&mut t, &late, now);
        assert_eq!(
            a,
            Applied {
                state: false,
                facts: true
            }
        );
        assert_eq!(t.record.iaas_id.as_deref(), Some("i-1"));
        assert_eq!(t.incarnation.as_deref(), Some("77"));
        assert_eq!(t.record.state, NodeState::Terminating);
        // A second id never replaces the first.
        let other = Update {
            iaas_id: Some("i-2".into()),
            ..Update::default()
        };
        assert!(!apply(&mut t, &other, now).any());
        assert_eq!(t.record.iaas_id.as_deref(), Some("i-1"));
        // Failure carries its reason.
        let f = Update::failed("n", FailReason::IaasFull, "no capacity");
        assert!(apply(&mut t, &f, now).state);
        assert_eq!(t.record.reason, Some(FailReason::IaasFull));
        assert_eq!(t.record.reason_detail.as_deref(), Some("no capacity"));
    }

    fn req(deployable: Deployable, count: i64) -> ProvisionRequest {
        ProvisionRequest {
            launch_id: "l1".into(),
            domain: "d".into(),
            count,
            node_ids: vec![],
            deployable,
            vars: BTreeMap::new(),
            subscriber: None,
            check_only: false,
        }
    }

    fn local() -> Deployable {
        Deployable::Local(LocalDeployable {
            command: "sleep".into(),
            args: vec!["60".into()],
            env: BTreeMap::new(),
            cwd: None,
        })
    }

    fn ec2(image: &str, user_data: Option<&str>, reserved_tag: bool) -> Deployable {
        let mut tags = BTreeMap::new();
        if reserved_tag {
            tags.insert("epu:run".to_string(), "x".to_string());
        }
        Deployable::Ec2(Ec2Deployable {
            image: image.into(),
            instance_type: "t3.micro".into(),
            key_name: None,
            subnet: None,
            security_groups: vec![],
            iam_profile: None,
            user_data: user_data.map(str::to_string),
            tags,
        })
    }

    #[test]
    fn shape_errors_leave_nothing_deployable_errors_are_refusals() {
        // (case, request, a shape error?, a deployable error?)
        let mut dup = req(local(), 2);
        dup.node_ids = vec!["a".into(), "a".into()];
        let mut bad_sub = req(local(), 1);
        bad_sub.subscriber = Some("nobody".into());
        let empty_command = req(
            Deployable::Local(LocalDeployable {
                command: " ".into(),
                args: vec![],
                env: BTreeMap::new(),
                cwd: None,
            }),
            1,
        );
        let table: Vec<(&str, ProvisionRequest, bool, bool)> = vec![
            ("good", req(local(), 2), false, false),
            ("count 0", req(local(), 0), true, false),
            ("duplicate node ids", dup, true, false),
            ("unknown subscriber", bad_sub, true, false),
            ("empty command", empty_command, false, true),
            (
                "reserved tag",
                req(ec2("ami-1", None, true), 1),
                false,
                true,
            ),
            (
                "unknown template variable",
                req(ec2("ami-1", Some("{{nope}}"), false), 1),
                false,
                true,
            ),
        ];
        for (case, r, shape, deployable) in table {
            assert_eq!(validate_shape(&r).is_err(), shape, "{case}");
            assert_eq!(validate_deployable(&r).is_err(), deployable, "{case}");
            assert_eq!(validate_request(&r).is_err(), shape || deployable, "{case}");
        }
    }

    #[test]
    fn requests_are_checked() {
        assert!(validate_request(&req(local(), 2)).is_ok());
        assert!(validate_request(&req(local(), -1))
            .expect_err("negative")
            .contains("count"));
        assert!(validate_request(&req(local(), 0)).is_err());
        assert!(validate_request(&req(local(), MAX_COUNT + 1)).is_err());
        let mut r = req(local(), 2);
        r.node_ids = vec!["a".into(), "a".into()];
        assert!(validate_request(&r).expect_err("dup").contains("twice"));
        r.node_ids = vec!["a".into()];
        assert!(validate_request(&r).is_err());
        r.node_ids = vec!["a".into(), "../etc".into()];
        assert!(validate_request(&r).is_err());
        let mut r = req(local(), 1);
        r.launch_id = "".into();
        assert!(validate_request(&r).is_err());
        let mut r = req(local(), 1);
        r.subscriber = Some("somewhere".into());
        assert!(validate_request(&r)
            .expect_err("sub")
            .contains("subscriber"));
        assert!(validate_request(&req(ec2(" ", None, false), 1))
            .expect_err("image")
            .contains("image"));
        assert!(validate_request(&req(ec2("ami-1", Some("{{nope}}"), false), 1)).is_err());
        assert!(validate_request(&req(ec2("ami-1", Some("{{node_id}}"), false), 1)).is_ok());
        let sim = Deployable::Sim(SimDeployable {
            boot_secs: Some(-1.0),
            failure_rate: None,
        });
        assert!(validate_request(&req(sim, 1)).is_err());
    }
}
