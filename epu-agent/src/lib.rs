//! The worker heartbeat agent: `epu-agent [OPTIONS] -- COMMAND [ARGS...]`.
//!
//! The agent runs the worker's command as its child and heartbeats for it to the
//! run's sensor aggregator (`heartbeat` on the `sensor-aggregator` queue,
//! transient and unconfirmed: only the latest counts). Each heartbeat carries the
//! node id, the domain (the run is in the envelope), the worker's state, and how
//! many jobs it holds right now.
//!
//! # Settings
//!
//! From the environment the provisioner gives a local worker, or from a
//! `KEY=VALUE` file (`--settings FILE`, EC2 user data); see [`settings`] for the
//! keys. `EPU_AMQP_URL` selects RabbitMQ; without it `EPU_RUN_DIR` selects the
//! standalone host's socket `<run_dir>/epu.sock`. The heartbeat interval is
//! `EPU_HEARTBEAT_INTERVAL` seconds, default **1 s** (set the domain's
//! `missing_timeout_secs` to several intervals).
//!
//! # The jobs file
//!
//! The agent creates a file and puts its path in the worker's environment as
//! `EPU_JOBS_FILE`. The worker writes the number of jobs it holds into it
//! (`echo 1 > "$EPU_JOBS_FILE"` when it takes one, `echo 0 > "$EPU_JOBS_FILE"`
//! when done); missing or empty means 0, idle. See [`jobs`].
//!
//! # Lifetime
//!
//! * While the worker runs: heartbeat `OK` with the jobs count every interval,
//!   the first one at once.
//! * The worker exits **0**: one last heartbeat (`OK`, 0 jobs, `exit_code` 0, so
//!   the aggregator does not keep counting the jobs it last held), then the agent
//!   exits 0.
//! * The worker exits **non-zero** (or is killed by a signal: code 128 + signal;
//!   or cannot be started: code 127): the agent stays up and heartbeats
//!   `PROCESS_ERROR` with the exit code and the last 2 KB of the worker's stderr
//!   every interval, so the aggregator reports it and the engine replaces the
//!   node. It exits (with the worker's code) when it receives SIGTERM, SIGINT or
//!   SIGHUP.
//! * SIGTERM, SIGINT or SIGHUP to the agent while the worker runs is forwarded to
//!   the worker, and the agent exits with the worker's exit code when it is gone
//!   (no further heartbeat). A second such signal kills the worker (SIGKILL).
//!   The worker stays in the agent's process group, so the local driver's
//!   group-wide SIGTERM reaches it directly too: a worker's TERM handler may run
//!   twice and should be idempotent.
//! * The worker's stderr is copied to the agent's stderr as it comes (the worker
//!   log keeps it) and the last 2 KB are kept for the PROCESS_ERROR heartbeat.
//!   Stdout and stdin are the agent's.
//!
//! # The broker being away
//!
//! A heartbeat that cannot be sent is dropped (the next one supersedes it); the
//! failure is logged once, and recovery once. The first connection is retried on
//! the project's backoff schedule (0.2 s doubling to 5 s); after that the AMQP bus
//! reconnects by itself on the next send. A send never blocks the agent for more
//! than max(interval, 2 s).
#![forbid(unsafe_code)]

pub mod agent;
pub mod jobs;
pub mod settings;
pub mod tail;

pub use agent::{run, AgentError, Connect, GivenBus, SettingsConnector};
pub use settings::{AgentSettings, SettingsError, Transport};
