//! Test fakes shared by the epu crates' tests and benches (a `[dev-dependencies]`
//! entry only, never a normal dependency).
//!
//! - [`records`]: a [`NodeRecord`](epu_model::messages::NodeRecord) builder,
//!   `node("web", "n1").run(&run).state(NodeState::Running).build()`.
//! - [`fake_provisioner`]: [`FakeProvisioner`] serves `Service::Provisioner` on a bus:
//!   records `provision` and `terminate_nodes`, makes nodes RUNNING (or another state)
//!   at once, publishes `instance_info`, answers `dump_state` and `describe_nodes`.
//! - [`recording`]: a recording controller (every `sensor_info`), a recording
//!   aggregator (every heartbeat), heartbeat helpers.
//! - [`wait`]: [`eventually`], a poll with a deadline that fails naming what it
//!   waited for.
//! - [`broker`]: against the test RabbitMQ: a cleanup guard for a run's queues and
//!   plain work queues.
//!
//! The kit depends on `epu-model` and `epu-core` only (never on a service crate), so a
//! test binary that uses it links nothing it does not test.
#![forbid(unsafe_code)]

pub mod broker;
pub mod fake_provisioner;
pub mod recording;
pub mod records;
pub mod wait;

pub use broker::{declare_queue, lapin_conn, Cleanup};
pub use fake_provisioner::{FakeProvisioner, FakeProvisionerBuilder, Provisioned};
pub use recording::{
    health_of, heartbeat, record_controller, record_heartbeats, record_instance_info,
    send_heartbeat, Recorded,
};
pub use records::{node, NodeBuilder};
pub use wait::eventually;
