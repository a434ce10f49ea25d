//! `epumgmt`: the operator's tool. Launch a run from a plan, watch it, change it
//! live, read what happened, and tear it down leaving nothing running.
#![forbid(unsafe_code)]

mod client;
mod commands;
mod deadline;
mod host;
mod inspect;
mod killrun;
mod launch;
mod plan;
mod rundir;
mod teardown;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::rundir::{resolve, UserError};

const AFTER_HELP: &str = "\
Runs live under $EPU_HOME/runs/<run>/ (EPU_HOME defaults to ~/.epu). Commands that take
--run use the only live run when it is left out.

Exit codes:
  0  success
  1  an error (the message says what to do)
  2  the command line is wrong
  3  no such run, or several live runs and no --run
  4  the service refused the request (e.g. an invalid reconfigure)
  5  killrun found instances or worker processes left, or launch found the
     previous run of that name still running instances (they are listed)
  6  a service did not answer (is the run up?)
  7  the command's deadline (--timeout) passed; it says what it was waiting for

Every command has a deadline: --timeout SECS, default 30 s, launch 180 s,
killrun 300 s.";

/// The operator's tool for epu runs.
#[derive(Parser, Debug)]
#[command(version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Give up after this many seconds, saying what the command was waiting for
    /// (exit 7). Default: 30; launch 180; killrun 300.
    #[arg(long, global = true, value_name = "SECS")]
    timeout: Option<f64>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start a run from a launch plan; returns once every service is ready and
    /// prints the run name.
    Launch {
        /// The launch plan (TOML).
        plan: PathBuf,
        /// The run's name (default: the plan's `run`, else the plan file's name).
        #[arg(long)]
        run: Option<String>,
    },
    /// Services up/down and, per domain: engine, desired, running, pending, unhealthy.
    Status {
        /// The run (default: the only live run).
        #[arg(long)]
        run: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Look inside a run: its nodes, domains, or recent decisions.
    Inspect {
        #[arg(value_parser = ["nodes", "domains", "decisions"])]
        what: String,
        /// The run (default: the only live run).
        #[arg(long)]
        run: Option<String>,
        #[arg(long)]
        domain: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The lifecycle events of a run, read back from its services' JSON logs.
    Events {
        /// The run (default: the only live run).
        #[arg(long)]
        run: Option<String>,
        /// Only events of this kind (e.g. node_state, decision, launch_requested).
        #[arg(long)]
        kind: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The run's workers: where they run and where their logs are.
    FindWorkers {
        /// The run (default: the only live run).
        #[arg(long)]
        run: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change a domain live: engine keys (preserve_n=5) or dry_run=, paused=.
    Reconfigure {
        /// The run (default: the only live run).
        #[arg(long)]
        run: Option<String>,
        #[arg(long)]
        domain: String,
        /// KEY=VALUE pairs. VALUE is read as in a policy file: 5, 2.5, true are
        /// typed; anything else, or a quoted "5", is a string; empty is refused.
        #[arg(required = true)]
        settings: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Terminate every instance of the run, stop its services, then terminate
    /// at the IaaS itself whatever still carries the run's tag (this works from
    /// the run directory alone, with every service dead). Exit 0 only when the
    /// IaaS lists nothing of the run. For an EC2 run whose provisioner is dead,
    /// give killrun the AWS environment the run was launched with.
    Killrun {
        /// The run (default: the only live run).
        #[arg(long)]
        run: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The runs under $EPU_HOME and whether they are up.
    ListRuns {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// (internal) The background process `launch` starts.
    #[command(hide = true)]
    Supervise {
        #[arg(long)]
        run_dir: PathBuf,
    },
}

async fn dispatch(cmd: Cmd, limit: Duration) -> anyhow::Result<()> {
    match cmd {
        Cmd::Launch { plan, run } => launch::launch(&plan, run.as_deref(), limit).await,
        Cmd::Status { run, json } => inspect::status(&resolve(run.as_deref())?, json).await,
        Cmd::Inspect {
            what,
            run,
            domain,
            json,
        } => inspect::inspect(&resolve(run.as_deref())?, &what, domain.as_deref(), json).await,
        Cmd::Events { run, kind, json } => {
            commands::events(&resolve(run.as_deref())?, kind.as_deref(), json)
        }
        Cmd::FindWorkers { run, json } => {
            inspect::find_workers(&resolve(run.as_deref())?, json).await
        }
        Cmd::Reconfigure {
            run,
            domain,
            settings,
            json,
        } => commands::reconfigure(&resolve(run.as_deref())?, &domain, &settings, json).await,
        Cmd::Killrun { run, json } => {
            killrun::killrun(&resolve(run.as_deref())?, limit, json).await
        }
        Cmd::ListRuns { json } => commands::list(json),
        Cmd::Supervise { run_dir } => launch::supervise(&run_dir).await,
    }
}

/// The deadline of a command: `--timeout`, else its default.
fn limit_of(cli: &Cli) -> Duration {
    let default = match cli.cmd {
        Cmd::Launch { .. } => deadline::LAUNCH_SECS,
        Cmd::Killrun { .. } => deadline::KILLRUN_SECS,
        _ => deadline::DEFAULT_SECS,
    };
    cli.timeout
        .filter(|t| t.is_finite() && *t > 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(default))
}

fn exit_code(e: &anyhow::Error) -> i32 {
    e.downcast_ref::<UserError>().map(|u| u.code).unwrap_or(1)
}

fn run_cli(cli: Cli) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("epumgmt: cannot start the async runtime: {e}");
            return 1;
        }
    };
    if cli.timeout.is_some_and(|t| !(t.is_finite() && t > 0.0)) {
        eprintln!("epumgmt: --timeout must be a positive number of seconds");
        return 2;
    }
    let supervise = matches!(cli.cmd, Cmd::Supervise { .. });
    let limit = limit_of(&cli);
    let code = if supervise {
        // The supervisor lives as long as the run: no deadline.
        match rt.block_on(dispatch(cli.cmd, limit)) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("epumgmt: {e:#}");
                exit_code(&e)
            }
        }
    } else {
        match rt.block_on(async { tokio::time::timeout(limit, dispatch(cli.cmd, limit)).await }) {
            Ok(Ok(())) => 0,
            Ok(Err(e)) => {
                eprintln!("epumgmt: {e:#}");
                exit_code(&e)
            }
            Err(_) => {
                eprintln!("epumgmt: {}", deadline::expired_message(limit));
                deadline::EXIT_DEADLINE
            }
        }
    };
    // Whatever is still pending in the runtime (a broker's close handshake that
    // never completes, a blocking task) must not keep a finished command alive:
    // the runtime is not torn down, the process exits.
    std::mem::forget(rt);
    code
}

fn main() {
    use std::io::Write;
    let cli = Cli::parse();
    let code = run_cli(cli);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(code);
}
