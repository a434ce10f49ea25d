//! The agent's run: the worker's command as a child, its stderr tee'd, and a
//! heartbeat task that never blocks the child's supervision.

use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use epu_core::backoff::{Backoff, BackoffState};
use epu_core::bus::amqp::AmqpBus;
use epu_core::bus::socket::SocketBus;
use epu_core::bus::{Bus, BusError, BusOptions};
use epu_core::config::redact_url;
use epu_core::wire::{Envelope, Op, Service};
use epu_model::messages::{Heartbeat, WorkerState};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::jobs::{read_jobs, JobsFile};
use crate::settings::{AgentSettings, Transport};
use crate::tail::StderrTail;

/// The exit code reported when the command cannot be started at all (as a shell does).
pub const CANNOT_START: i32 = 127;
/// The `sender` of the agent's envelopes.
pub const SENDER: &str = "epu-agent";

/// Errors that stop the agent before it can supervise anything.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no command to run: give it after `--`, e.g. `epu-agent -- ./worker.sh`")]
    NoCommand,
    #[error("cannot create the jobs file: {0}")]
    JobsFile(#[source] std::io::Error),
}

/// Makes the bus heartbeats go out on. Called again after a failed first connect.
#[async_trait]
pub trait Connect: Send + Sync + 'static {
    async fn connect(&self) -> Result<Arc<dyn Bus>, BusError>;
}

/// Connects as the settings say: RabbitMQ, or the standalone host's socket.
pub struct SettingsConnector {
    settings: AgentSettings,
}

impl SettingsConnector {
    pub fn new(settings: &AgentSettings) -> Self {
        SettingsConnector {
            settings: settings.clone(),
        }
    }
}

#[async_trait]
impl Connect for SettingsConnector {
    async fn connect(&self) -> Result<Arc<dyn Bus>, BusError> {
        let opts = BusOptions::new(SENDER);
        let run = self.settings.run.clone();
        match &self.settings.transport {
            Transport::Amqp { url } => {
                let bus = AmqpBus::connect(url.expose(), run, opts).await?;
                tracing::info!(event = "bus_connected", broker = %redact_url(url.expose()), "connected to the broker");
                Ok(Arc::new(bus))
            }
            Transport::Socket { path } => Ok(Arc::new(SocketBus::new(path, run, opts))),
        }
    }
}

/// A bus that is already there (tests, or an agent embedded in another program).
pub struct GivenBus(pub Arc<dyn Bus>);

#[async_trait]
impl Connect for GivenBus {
    async fn connect(&self) -> Result<Arc<dyn Bus>, BusError> {
        Ok(self.0.clone())
    }
}

/// What the worker is doing, as the next heartbeat reports it.
#[derive(Clone, Debug, PartialEq)]
enum Worker {
    Running,
    /// Exited 0: the last heartbeat says OK, idle, exit code 0.
    Done,
    /// Exited non-zero (or could not start): PROCESS_ERROR until the agent is stopped.
    Failed {
        code: i32,
        stderr_tail: String,
    },
}

enum Beat {
    Update(Worker),
    /// Send this one now, then stop.
    Last(Worker),
}

/// The heartbeat message for the worker's state now.
fn heartbeat(settings: &AgentSettings, worker: &Worker, jobs: impl FnOnce() -> u32) -> Heartbeat {
    let (state, jobs, exit_code, stderr_tail) = match worker {
        Worker::Running => (WorkerState::Ok, jobs(), None, None),
        Worker::Done => (WorkerState::Ok, 0, Some(0), None),
        Worker::Failed { code, stderr_tail } => (
            WorkerState::ProcessError,
            0,
            Some(*code),
            Some(stderr_tail.clone()),
        ),
    };
    Heartbeat {
        node_id: settings.node_id.clone(),
        domain: settings.domain.clone(),
        state,
        jobs,
        exit_code,
        stderr_tail,
        at: Utc::now(),
    }
}

/// The heartbeat sender's link: connects lazily, retries the first connect on the
/// project's backoff schedule, and logs a failure once, not every second.
struct Link {
    connector: Arc<dyn Connect>,
    bus: Option<Arc<dyn Bus>>,
    backoff: BackoffState,
    next_connect: Instant,
    failing: bool,
}

impl Link {
    fn new(connector: Arc<dyn Connect>) -> Self {
        Link {
            connector,
            bus: None,
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)).state(),
            next_connect: Instant::now(),
            failing: false,
        }
    }

    fn failed(&mut self, what: &str, error: &dyn std::fmt::Display) {
        if self.failing {
            tracing::debug!(error = %error, "{what} failed again");
        } else {
            tracing::warn!(event = "heartbeat_failing", error = %error, "{what} failed; the agent keeps trying");
        }
        self.failing = true;
    }

    async fn send(&mut self, settings: &AgentSettings, hb: &Heartbeat, timeout: Duration) {
        if self.bus.is_none() {
            if Instant::now() < self.next_connect {
                return;
            }
            match tokio::time::timeout(timeout, self.connector.connect()).await {
                Ok(Ok(bus)) => {
                    self.bus = Some(bus);
                    self.backoff.reset();
                }
                Ok(Err(e)) => {
                    self.next_connect = Instant::now() + self.backoff.next_delay();
                    self.failed("connecting to the bus", &e);
                    return;
                }
                Err(_) => {
                    self.next_connect = Instant::now() + self.backoff.next_delay();
                    self.failed("connecting to the bus", &"timed out");
                    return;
                }
            }
        }
        let Some(bus) = &self.bus else { return };
        let env = match Envelope::with_body(&settings.run, Op::Heartbeat, SENDER, hb) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a heartbeat");
                return;
            }
        };
        match tokio::time::timeout(timeout, bus.send(Service::SensorAggregator, &env)).await {
            Ok(Ok(())) => {
                if self.failing {
                    tracing::info!(
                        event = "heartbeat_recovered",
                        "heartbeats are getting through again"
                    );
                }
                self.failing = false;
            }
            Ok(Err(e)) => self.failed("sending a heartbeat", &e),
            Err(_) => self.failed("sending a heartbeat", &"timed out"),
        }
    }
}

async fn heartbeat_loop(
    settings: AgentSettings,
    connector: Arc<dyn Connect>,
    jobs_path: std::path::PathBuf,
    mut beats: mpsc::UnboundedReceiver<Beat>,
) {
    let mut link = Link::new(connector);
    let mut worker = Worker::Running;
    let mut ticker = tokio::time::interval(settings.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A send never takes longer than this, so a dead broker cannot stall the loop.
    let timeout = settings.heartbeat_interval.max(Duration::from_secs(2));
    loop {
        let last = tokio::select! {
            _ = ticker.tick() => false,
            beat = beats.recv() => match beat {
                None => return,
                Some(Beat::Update(w)) => { worker = w; false }
                Some(Beat::Last(w)) => { worker = w; true }
            },
        };
        let hb = heartbeat(&settings, &worker, || read_jobs(&jobs_path));
        link.send(&settings, &hb, timeout).await;
        if last {
            return;
        }
    }
}

/// The shell's view of an exit status: the code, or 128 + the signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    }
}

fn signal_child(pid: Option<u32>, sig: Signal) {
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    if let Err(e) = kill(Pid::from_raw(pid), sig) {
        tracing::debug!(pid, signal = %sig, error = %e, "cannot signal the worker");
    }
}

fn tee_stderr(
    child: &mut tokio::process::Child,
    tail: Arc<Mutex<StderrTail>>,
) -> Option<JoinHandle<()>> {
    let mut err = child.stderr.take()?;
    Some(tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let mut out = tokio::io::stderr();
        loop {
            let n = match err.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            lock(&tail).push(chunk);
            let _ = out.write_all(chunk).await;
            let _ = out.flush().await;
        }
    }))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `command` under the agent until the agent is done (see the crate docs for
/// what ends it) and returns the exit code the agent should exit with.
///
/// `signals` carries the signals the agent process receives (SIGTERM, SIGINT,
/// SIGHUP); each is forwarded to the worker.
pub async fn run(
    settings: AgentSettings,
    command: Vec<String>,
    mut signals: mpsc::UnboundedReceiver<Signal>,
    connector: Arc<dyn Connect>,
) -> Result<i32, AgentError> {
    let Some((program, args)) = command.split_first() else {
        return Err(AgentError::NoCommand);
    };
    let jobs = JobsFile::new(settings.jobs_file.as_deref()).map_err(AgentError::JobsFile)?;
    let tail = Arc::new(Mutex::new(StderrTail::new(settings.stderr_tail_bytes)));
    let (beat_tx, beat_rx) = mpsc::unbounded_channel();
    let sender = tokio::spawn(heartbeat_loop(
        settings.clone(),
        connector,
        jobs.path().to_path_buf(),
        beat_rx,
    ));

    let spawned = tokio::process::Command::new(epu_core::service::resolve_command(program))
        .args(args)
        .env("EPU_JOBS_FILE", jobs.path())
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn();
    let (mut child, mut tee) = match spawned {
        Ok(mut child) => {
            tracing::info!(event = "worker_started", node_id = %settings.node_id, pid = child.id(), command = %program, "worker started");
            let tee = tee_stderr(&mut child, tail.clone());
            (Some(child), tee)
        }
        Err(e) => {
            let msg = format!("epu-agent: cannot start {program:?}: {e}\n");
            lock(&tail).push(msg.as_bytes());
            tracing::error!(event = "worker_failed", command = %program, error = %e, "cannot start the worker");
            (None, None)
        }
    };
    let mut failed_code = if child.is_none() {
        let _ = beat_tx.send(Beat::Update(Worker::Failed {
            code: CANNOT_START,
            stderr_tail: lock(&tail).text(),
        }));
        Some(CANNOT_START)
    } else {
        None
    };

    let mut terminating = false;
    let mut signals_open = true;
    loop {
        tokio::select! {
            status = async { match child.as_mut() { Some(c) => c.wait().await, None => std::future::pending().await } }, if child.is_some() => {
                let pid = child.as_ref().and_then(|c| c.id());
                child = None;
                // The rest of its stderr, so the tail is complete.
                if let Some(t) = tee.take() {
                    let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
                }
                let code = match status {
                    Ok(s) => exit_code(s),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot wait for the worker");
                        1
                    }
                };
                tracing::info!(event = "worker_exited", node_id = %settings.node_id, pid, code, "worker exited");
                if terminating {
                    drop(beat_tx);
                    let _ = tokio::time::timeout(Duration::from_secs(2), sender).await;
                    return Ok(code);
                }
                if code == 0 {
                    let _ = beat_tx.send(Beat::Last(Worker::Done));
                    let _ = tokio::time::timeout(Duration::from_secs(5), sender).await;
                    return Ok(0);
                }
                let _ = beat_tx.send(Beat::Update(Worker::Failed { code, stderr_tail: lock(&tail).text() }));
                failed_code = Some(code);
            }
            sig = signals.recv(), if signals_open => match sig {
                None => signals_open = false,
                Some(sig) => match &child {
                    Some(c) => {
                        let pid = c.id();
                        if terminating {
                            tracing::warn!(signal = %sig, "asked again to stop: killing the worker");
                            signal_child(pid, Signal::SIGKILL);
                        } else {
                            tracing::info!(event = "worker_signalled", signal = %sig, "forwarding the signal to the worker");
                            signal_child(pid, sig);
                        }
                        terminating = true;
                    }
                    None => {
                        tracing::info!(signal = %sig, "stopping; the worker had already failed");
                        drop(beat_tx);
                        let _ = tokio::time::timeout(Duration::from_secs(2), sender).await;
                        return Ok(failed_code.unwrap_or(1));
                    }
                },
            },
            // The worker failed and nobody can signal us any more: heartbeat
            // PROCESS_ERROR until the process is killed.
            else => std::future::pending::<()>().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_say_what_the_worker_does() {
        let settings = AgentSettings {
            node_id: "n".into(),
            run: epu_core::wire::RunName::new("r").expect("run"),
            domain: "d".into(),
            transport: Transport::Socket { path: "/x".into() },
            heartbeat_interval: Duration::from_secs(1),
            jobs_file: None,
            stderr_tail_bytes: 10,
            log_format: epu_core::config::LogFormat::Human,
        };
        let hb = heartbeat(&settings, &Worker::Running, || 2);
        assert_eq!(
            (hb.state, hb.jobs, hb.exit_code, hb.stderr_tail),
            (WorkerState::Ok, 2, None, None)
        );
        let hb = heartbeat(&settings, &Worker::Done, || 2);
        assert_eq!(
            (hb.state, hb.jobs, hb.exit_code),
            (WorkerState::Ok, 0, Some(0))
        );
        let failed = Worker::Failed {
            code: 3,
            stderr_tail: "boom".into(),
        };
        let hb = heartbeat(&settings, &failed, || 2);
        assert_eq!(
            (hb.state, hb.jobs, hb.exit_code, hb.stderr_tail.as_deref()),
            (WorkerState::ProcessError, 0, Some(3), Some("boom"))
        );
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(15)), 143);
    }
}
