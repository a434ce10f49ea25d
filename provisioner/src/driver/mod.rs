//! The IaaS seam: one trait, [`IaasDriver`], and the drivers behind it.
//!
//! * [`local::LocalDriver`] — workers are OS processes on this machine (the embedded
//!   default).
//! * [`sim::SimDriver`] — virtual instances on the provisioner's clock, for scale tests
//!   and the simulator.
//! * `ec2::Ec2Driver` — EC2 or an EC2-compatible API (feature `ec2`). Only that module
//!   knows the AWS SDK.
//!
//! [`drivers_from_config`] builds the drivers a config turns on.
//!
//! A driver knows nothing of node records, the store or the bus: it launches, terminates
//! and lists instances, and (where it can) tells the provisioner at once when one exits.
//! The provisioner owns every decision.
//!
//! # The contract
//!
//! * [`IaasDriver::launch`] is idempotent per [`LaunchRequest::token`]: asked again with a
//!   token it has already seen (after a provisioner crash), a driver returns the instances
//!   it launched then and launches nothing new. EC2 does this with `ClientToken`; the local
//!   driver finds the processes that carry the node ids; the sim driver remembers tokens.
//! * Every instance carries the run, the launch and (once known) the node, so that
//!   [`IaasDriver::list`] can find all instances of a run, including the ones the store
//!   does not know (zombies).
//! * Errors are [`IaasError`]s with a [`IaasErrorKind`]; the provisioner retries the
//!   retryable kinds with `epu_core::backoff::retry`. Drivers never retry on their own.

mod from_config;
pub mod local;
pub mod sim;

#[cfg(feature = "ec2")]
pub mod ec2;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use epu_core::wire::RunName;
use epu_model::messages::{Deployable, FailReason};
use tokio::sync::mpsc;

pub use from_config::drivers_from_config;

/// What to launch: one batch (one launch) of nodes with one idempotency token.
#[derive(Clone, Debug)]
pub struct LaunchRequest {
    pub run: RunName,
    pub launch_id: String,
    /// The idempotency token of the launch (EC2 `ClientToken`), stored before the call.
    pub token: String,
    pub domain: String,
    /// The nodes to launch, in order (a retry asks again for those still without an
    /// instance).
    pub node_ids: Vec<String>,
    pub deployable: Deployable,
    pub vars: BTreeMap<String, String>,
}

/// Where an instance is in its life, as the IaaS says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// Accepted, booting.
    Pending,
    /// Up.
    Running,
    /// Going away or stopped: it still exists and must be terminated.
    Stopping,
    /// Gone (still listed by some IaaSes for a while).
    Terminated,
}

impl InstanceState {
    /// The IaaS's word, as `describe_iaas` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Terminated => "terminated",
        }
    }
}

/// Why an instance died, when the IaaS tells (the sim driver's failures).
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceFailure {
    pub reason: FailReason,
    pub detail: String,
}

/// One instance a launch produced.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchedInstance {
    pub node_id: String,
    pub iaas_id: String,
    /// A second identity that tells a recycled `iaas_id` apart (the local driver: the
    /// process start time from `/proc/<pid>/stat`); `None` where ids are never reused.
    pub incarnation: Option<String>,
    pub state: InstanceState,
    pub addresses: Vec<String>,
}

/// The result of a launch: the instances, and the nodes that failed one by one (a
/// whole-batch failure is an `Err` instead).
#[derive(Clone, Debug, Default)]
pub struct LaunchOutcome {
    pub instances: Vec<LaunchedInstance>,
    pub failed: Vec<(String, IaasError)>,
}

/// One instance as [`IaasDriver::list`] sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct ListedInstance {
    pub iaas_id: String,
    pub incarnation: Option<String>,
    /// The node tag (`epu:node`), when the instance carries one.
    pub node_id: Option<String>,
    /// The launch tag (`epu:launch`), when the instance carries one.
    pub launch_id: Option<String>,
    pub state: InstanceState,
    pub addresses: Vec<String>,
    pub failure: Option<InstanceFailure>,
}

impl ListedInstance {
    /// Not terminated: it exists and costs.
    pub fn is_alive(&self) -> bool {
        self.state != InstanceState::Terminated
    }
}

/// An instance the provisioner asks about: its id and incarnation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct InstanceRef {
    pub node_id: String,
    pub iaas_id: String,
    pub incarnation: Option<String>,
}

/// What a terminate call achieved for one instance.
#[derive(Clone, Debug, PartialEq)]
pub enum TerminateOutcome {
    /// The instance is gone (or never existed any more).
    Gone,
    /// Termination is under way; an event or a later `list` says when it is done.
    Stopping,
}

/// Something a driver noticed on its own, sent at once.
#[derive(Clone, Debug, PartialEq)]
pub enum DriverEvent {
    /// The instance (a local worker process) is gone.
    Exited {
        node_id: String,
        iaas_id: String,
        incarnation: Option<String>,
        /// "exit code 3", "killed by signal 9", …
        detail: String,
    },
}

/// The IaaS classes of error. Retryable: throttling, timeouts, and the IaaS being
/// unavailable (5xx); the others fail the nodes with their [`FailReason`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IaasErrorKind {
    /// Out of capacity or over an instance limit (`InsufficientInstanceCapacity`,
    /// `InstanceLimitExceeded`, …).
    Capacity,
    /// Rate limited (`RequestLimitExceeded`).
    Throttled,
    /// Credentials refused or not allowed (`AuthFailure`, `UnauthorizedOperation`).
    Auth,
    /// The request is wrong (`InvalidAMIID.NotFound`, `InvalidParameterValue`, a local
    /// command that does not exist).
    BadRequest,
    /// The call timed out or the connection did.
    Timeout,
    /// The IaaS answered with a server error or could not be reached.
    Unavailable,
    /// The instance does not exist (`InvalidInstanceID.NotFound`).
    NotFound,
    /// The provisioner gave the call up (every node of the launch was terminated).
    Cancelled,
    /// Anything else.
    Other,
}

impl IaasErrorKind {
    /// The `class` label of the IaaS error metric.
    pub fn label(self) -> &'static str {
        match self {
            IaasErrorKind::Capacity => "capacity",
            IaasErrorKind::Throttled => "throttled",
            IaasErrorKind::Auth => "auth",
            IaasErrorKind::BadRequest => "bad_request",
            IaasErrorKind::Timeout => "timeout",
            IaasErrorKind::Unavailable => "unavailable",
            IaasErrorKind::NotFound => "not_found",
            IaasErrorKind::Cancelled => "cancelled",
            IaasErrorKind::Other => "other",
        }
    }

    /// Worth another try after a backoff.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            IaasErrorKind::Throttled | IaasErrorKind::Timeout | IaasErrorKind::Unavailable
        )
    }

    /// The reason a node fails with when a launch ends in this error.
    pub fn fail_reason(self) -> FailReason {
        match self {
            IaasErrorKind::Capacity => FailReason::IaasFull,
            IaasErrorKind::Throttled => FailReason::IaasRateLimited,
            IaasErrorKind::Auth => FailReason::IaasAuth,
            IaasErrorKind::BadRequest => FailReason::IaasBadRequest,
            IaasErrorKind::Timeout => FailReason::IaasTimeout,
            IaasErrorKind::Unavailable
            | IaasErrorKind::NotFound
            | IaasErrorKind::Cancelled
            | IaasErrorKind::Other => FailReason::IaasError,
        }
    }
}

impl fmt::Display for IaasErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A classified IaaS error. The message is the IaaS's own (never credentials).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{kind} error{}: {message}", code_suffix(.code))]
pub struct IaasError {
    pub kind: IaasErrorKind,
    /// The IaaS's error code (`InsufficientInstanceCapacity`), when it gave one.
    pub code: Option<String>,
    pub message: String,
}

fn code_suffix(code: &Option<String>) -> String {
    match code {
        Some(c) => format!(" ({c})"),
        None => String::new(),
    }
}

impl IaasError {
    pub fn new(kind: IaasErrorKind, message: impl Into<String>) -> Self {
        IaasError {
            kind,
            code: None,
            message: message.into(),
        }
    }

    /// An error from an IaaS error code, classified by [`classify_code`].
    pub fn from_code(code: &str, message: impl Into<String>) -> Self {
        IaasError {
            kind: classify_code(code),
            code: Some(code.to_string()),
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        IaasError::new(IaasErrorKind::BadRequest, message)
    }

    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    /// The text stored in a failed node's `reason_detail`.
    pub fn detail(&self) -> String {
        match &self.code {
            Some(code) => format!("{code}: {}", self.message),
            None => self.message.clone(),
        }
    }
}

/// Classifies an EC2 error code (other EC2-compatible APIs use the same codes).
pub fn classify_code(code: &str) -> IaasErrorKind {
    match code {
        "InsufficientInstanceCapacity"
        | "InstanceLimitExceeded"
        | "InsufficientHostCapacity"
        | "InsufficientReservedInstanceCapacity"
        | "InsufficientCapacity"
        | "InsufficientAddressCapacity"
        | "VcpuLimitExceeded"
        | "MaxSpotInstanceCountExceeded"
        | "InsufficientFreeAddressesInSubnet" => IaasErrorKind::Capacity,
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" | "SlowDown" => {
            IaasErrorKind::Throttled
        }
        "AuthFailure"
        | "UnauthorizedOperation"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "OptInRequired"
        | "Blocked"
        | "PendingVerification"
        | "AccessDenied"
        | "AccessDeniedException"
        | "ExpiredToken"
        | "RequestExpired" => IaasErrorKind::Auth,
        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable" => {
            IaasErrorKind::Unavailable
        }
        "RequestTimeout" | "RequestTimeoutException" => IaasErrorKind::Timeout,
        "InvalidInstanceID.NotFound" => IaasErrorKind::NotFound,
        c if c.starts_with("Invalid")
            || c.starts_with("Missing")
            || c.starts_with("Unknown")
            || c.ends_with(".Malformed")
            || c.ends_with(".NotFound")
            || c == "Unsupported"
            || c == "UnsupportedOperation"
            || c == "IdempotentParameterMismatch"
            || c == "ValidationError" =>
        {
            IaasErrorKind::BadRequest
        }
        _ => IaasErrorKind::Other,
    }
}

/// A receiver of [`DriverEvent`]s.
pub type EventReceiver = mpsc::UnboundedReceiver<DriverEvent>;

/// An IaaS behind the provisioner. See the module docs for the contract.
#[async_trait]
pub trait IaasDriver: Send + Sync + 'static {
    /// The driver name that deployables select (`local`, `ec2`, `sim`).
    fn name(&self) -> &str;

    /// Launches the batch; idempotent per token.
    async fn launch(&self, req: &LaunchRequest) -> Result<LaunchOutcome, IaasError>;

    /// Asks for the instances to be terminated; returns one outcome per instance, in
    /// order.
    async fn terminate(
        &self,
        instances: &[InstanceRef],
    ) -> Result<Vec<TerminateOutcome>, IaasError>;

    /// Every instance of the run, by its run tag, terminated ones included while the IaaS
    /// still lists them.
    async fn list(&self, run: &RunName) -> Result<Vec<ListedInstance>, IaasError>;

    /// Instances the store says exist, handed over at start: the driver watches the
    /// live ones and reports the ones already gone as [`DriverEvent::Exited`]. Drivers
    /// that learn everything from `list` ignore it.
    async fn adopt(&self, _instances: &[InstanceRef]) {}

    /// The driver's event stream, taken once by the provisioner; `None` for drivers that
    /// only report through `list`.
    fn take_events(&self) -> Option<EventReceiver> {
        None
    }
}

/// The drivers a provisioner uses, by name.
#[derive(Clone, Default)]
pub struct Drivers {
    map: BTreeMap<String, Arc<dyn IaasDriver>>,
}

impl fmt::Debug for Drivers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.map.keys()).finish()
    }
}

impl Drivers {
    /// No drivers.
    pub fn new() -> Self {
        Drivers::default()
    }

    /// Adds (or replaces) the driver under its [`IaasDriver::name`].
    #[must_use]
    pub fn with(mut self, driver: Arc<dyn IaasDriver>) -> Self {
        self.insert(driver);
        self
    }

    /// Adds (or replaces) the driver under its [`IaasDriver::name`].
    pub fn insert(&mut self, driver: Arc<dyn IaasDriver>) {
        self.map.insert(driver.name().to_string(), driver);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn IaasDriver>> {
        self.map.get(name)
    }

    pub fn names(&self) -> Vec<String> {
        self.map.keys().cloned().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<dyn IaasDriver>)> {
        self.map.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The placeholders an EC2 user-data template may use.
#[derive(Clone, Debug, Default)]
pub struct TemplateContext<'a> {
    pub node_id: Option<&'a str>,
    pub run: &'a str,
    pub domain: &'a str,
    pub launch_id: &'a str,
    pub heartbeat: &'a str,
    pub vars: Option<&'a BTreeMap<String, String>>,
}

/// Fills `{{node_id}}`, `{{run}}`, `{{domain}}`, `{{launch_id}}`, `{{heartbeat}}` and
/// `{{var.NAME}}` in `template`. An unknown placeholder, an unclosed one, or a
/// `{{var.NAME}}` whose variable is absent is an error naming it. `{{node_id}}` with
/// `ctx.node_id = None` is kept as is (see [`uses_node_id`]).
pub fn render_template(template: &str, ctx: &TemplateContext<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err("user_data has an unclosed \"{{\"".to_string());
        };
        let name = after[..end].trim();
        match name {
            "node_id" => match ctx.node_id {
                Some(n) => out.push_str(n),
                None => out.push_str("{{node_id}}"),
            },
            "run" => out.push_str(ctx.run),
            "domain" => out.push_str(ctx.domain),
            "launch_id" => out.push_str(ctx.launch_id),
            "heartbeat" => out.push_str(ctx.heartbeat),
            other => match other.strip_prefix("var.") {
                Some(var) => match ctx.vars.and_then(|v| v.get(var)) {
                    Some(value) => out.push_str(value),
                    None => {
                        return Err(format!(
                            "user_data uses {{{{var.{var}}}}} but the request has no var {var:?}"
                        ))
                    }
                },
                None => {
                    return Err(format!(
                        "user_data uses unknown placeholder {{{{{other}}}}}; known: node_id, run, domain, launch_id, heartbeat, var.NAME"
                    ))
                }
            },
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether a user-data template needs a per-node value: `{{node_id}}`, or
/// `{{heartbeat}}`, whose settings block carries the node id the agent reports.
pub fn uses_node_id(template: &str) -> bool {
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return false;
        };
        if matches!(after[..end].trim(), "node_id" | "heartbeat") {
            return true;
        }
        rest = &after[end + 2..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        assert_eq!(
            classify_code("InsufficientInstanceCapacity"),
            IaasErrorKind::Capacity
        );
        assert_eq!(
            classify_code("InstanceLimitExceeded"),
            IaasErrorKind::Capacity
        );
        assert_eq!(
            classify_code("RequestLimitExceeded"),
            IaasErrorKind::Throttled
        );
        assert_eq!(classify_code("AuthFailure"), IaasErrorKind::Auth);
        assert_eq!(
            classify_code("InvalidAMIID.NotFound"),
            IaasErrorKind::BadRequest
        );
        assert_eq!(
            classify_code("InvalidParameterValue"),
            IaasErrorKind::BadRequest
        );
        assert_eq!(
            classify_code("InvalidInstanceID.NotFound"),
            IaasErrorKind::NotFound
        );
        assert_eq!(classify_code("InternalError"), IaasErrorKind::Unavailable);
        assert_eq!(classify_code("SomethingNew"), IaasErrorKind::Other);
        assert!(IaasErrorKind::Throttled.is_retryable());
        assert!(IaasErrorKind::Timeout.is_retryable());
        assert!(!IaasErrorKind::Capacity.is_retryable());
        assert!(!IaasErrorKind::BadRequest.is_retryable());
        assert_eq!(IaasErrorKind::Capacity.fail_reason(), FailReason::IaasFull);
    }

    #[test]
    fn error_display_names_kind_and_code() {
        let e = IaasError::from_code("InsufficientInstanceCapacity", "no m5 left");
        assert_eq!(
            e.to_string(),
            "capacity error (InsufficientInstanceCapacity): no m5 left"
        );
        assert_eq!(e.detail(), "InsufficientInstanceCapacity: no m5 left");
    }

    #[test]
    fn templates_render_and_refuse_unknowns() {
        let mut vars = BTreeMap::new();
        vars.insert("role".to_string(), "db".to_string());
        let ctx = TemplateContext {
            node_id: Some("n1"),
            run: "r",
            domain: "d",
            launch_id: "l",
            heartbeat: "EPU_RUN=r",
            vars: Some(&vars),
        };
        assert_eq!(
            render_template("#!/bin/sh\n{{heartbeat}} node={{ node_id }} {{var.role}} {{run}}/{{domain}}/{{launch_id}}", &ctx)
                .expect("renders"),
            "#!/bin/sh\nEPU_RUN=r node=n1 db r/d/l"
        );
        assert!(render_template("{{colour}}", &ctx)
            .expect_err("unknown")
            .contains("colour"));
        assert!(render_template("{{var.size}}", &ctx)
            .expect_err("no var")
            .contains("size"));
        assert!(render_template("{{run", &ctx).is_err());
        let batch = TemplateContext {
            node_id: None,
            ..ctx
        };
        assert_eq!(
            render_template("x {{node_id}}", &batch).expect("kept"),
            "x {{node_id}}"
        );
        assert!(uses_node_id("a {{ node_id }}"));
        assert!(
            uses_node_id("{{heartbeat}}"),
            "the heartbeat block names the node"
        );
        assert!(!uses_node_id("a {{run}}"));
    }
}
