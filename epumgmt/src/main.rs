//! `epumgmt`: the operator's tool. Launch a run from a plan, watch it, change it
//! live, read what happened, and tear it down leaving nothing running.
#![forbid(unsafe_code)]

mod client;
mod commands;
mod host;
mod plan;
mod run;
mod rundir;

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
  5  killrun found instances or worker processes left (they are listed)
  6  a service did not answer (is the run up?)";

/// The operator's tool for epu runs.
#[derive(Parser, Debug)]
#[command(version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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
        /// Give up if the run is not up within this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Services up/down and, per domain: engine, desired, running, pending, unhealthy.
    Status {
        #[arg(long)]
        run: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Look inside a run: its nodes, domains, or recent decisions.
    Inspect {
        #[arg(value_parser = ["nodes", "domains", "decisions"])]
        what: String,
        #[arg(long)]
        run: Option<String>,
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The lifecycle events of a run, read back from its services' JSON logs.
    Events {
        #[arg(long)]
        run: Option<String>,
        /// Only events of this kind (e.g. node_state, decision, launch_requested).
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The run's workers: where they run and where their logs are.
    FindWorkers {
        #[arg(long)]
        run: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Change a domain live: engine keys (preserve_n=5) or dry_run=, paused=.
    Reconfigure {
        #[arg(long)]
        run: Option<String>,
        #[arg(long)]
        domain: String,
        /// KEY=VALUE pairs.
        #[arg(required = true)]
        settings: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Terminate every instance of the run, check at the IaaS that none is left,
    /// then stop the services. Exit 0 only when nothing is left.
    Killrun {
        #[arg(long)]
        run: Option<String>,
        /// Give up waiting for instances to go after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// The runs under $EPU_HOME and whether they are up.
    ListRuns {
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

async fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Launch { plan, run, timeout } => {
            run::launch(&plan, run.as_deref(), Duration::from_secs(timeout)).await
        }
        Cmd::Status { run, json } => commands::status(&resolve(run.as_deref())?, json).await,
        Cmd::Inspect {
            what,
            run,
            domain,
            json,
        } => commands::inspect(&resolve(run.as_deref())?, &what, domain.as_deref(), json).await,
        Cmd::Events { run, kind, json } => {
            commands::events(&resolve(run.as_deref())?, kind.as_deref(), json)
        }
        Cmd::FindWorkers { run, json } => {
            commands::find_workers(&resolve(run.as_deref())?, json).await
        }
        Cmd::Reconfigure {
            run,
            domain,
            settings,
            json,
        } => commands::reconfigure(&resolve(run.as_deref())?, &domain, &settings, json).await,
        Cmd::Killrun { run, timeout, json } => {
            run::killrun(
                &resolve(run.as_deref())?,
                Duration::from_secs(timeout),
                json,
            )
            .await
        }
        Cmd::ListRuns { json } => commands::list(json),
        Cmd::Supervise { run_dir } => run::supervise(&run_dir).await,
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli.cmd).await {
        let code = e.downcast_ref::<UserError>().map(|u| u.code).unwrap_or(1);
        eprintln!("epumgmt: {e:#}");
        std::process::exit(code);
    }
}
