//! Starting a worker: its working directory, log, environment and child exit wait.

use std::fs::{self, OpenOptions};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::signal::Signal;

use super::groups::{proc_stat, signal_group};
use super::{
    lock, DriverEvent, IaasError, IaasErrorKind, InstanceState, LaunchRequest, LaunchedInstance,
    LocalDriver, Watched,
};

fn exit_detail(status: &std::process::ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    if let Some(sig) = status.signal() {
        let name = Signal::try_from(sig)
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        return format!("killed by signal {sig} ({name})");
    }
    "exited".to_string()
}

impl LocalDriver {
    pub(super) fn spawn_worker(
        &self,
        req: &LaunchRequest,
        node_id: &str,
        spec: &epu_model::messages::LocalDeployable,
    ) -> Result<LaunchedInstance, IaasError> {
        let workers = self.settings.run_dir.join("workers");
        let cwd = match &spec.cwd {
            Some(c) => PathBuf::from(c),
            None => workers.join(node_id),
        };
        fs::create_dir_all(&cwd).map_err(|e| io_error("create the working directory", &cwd, &e))?;
        let log_path = self.log_path(node_id);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io_error("open the log file", &log_path, &e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| io_error("open the log file", &log_path, &e))?;

        let mut cmd =
            tokio::process::Command::new(epu_core::service::resolve_command(&spec.command));
        cmd.args(&spec.args)
            .current_dir(&cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(false);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("EPU_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(&spec.env);
        for (k, v) in &req.vars {
            cmd.env(format!("EPUVAR_{k}"), v);
        }
        cmd.envs(&self.settings.worker_env);
        cmd.env("EPU_RUN", req.run.as_str())
            .env("EPU_NODE_ID", node_id)
            .env("EPU_DOMAIN", &req.domain)
            .env("EPU_LAUNCH_ID", &req.launch_id)
            .env("EPU_RUN_DIR", &self.settings.run_dir);

        let mut child = cmd.spawn().map_err(|e| {
            let kind = match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                    IaasErrorKind::BadRequest
                }
                _ => IaasErrorKind::Other,
            };
            IaasError::new(kind, format!("cannot start {:?}: {e}", spec.command))
        })?;
        let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            return Err(IaasError::new(
                IaasErrorKind::Other,
                "the worker exited before its pid could be read",
            ));
        };
        // The child is not reaped until we wait, so its stat is readable even if it
        // has already exited.
        let start_time = proc_stat(pid)
            .map(|s| s.start_time.to_string())
            .unwrap_or_else(|| "0".to_string());
        lock(&self.watched).insert(
            pid,
            Watched {
                node_id: node_id.to_string(),
                start_time: start_time.clone(),
                child: true,
            },
        );
        let watched = self.watched.clone();
        let events = self.events.clone();
        let node = node_id.to_string();
        let incarnation = start_time.clone();
        tokio::spawn(async move {
            let detail = match child.wait().await {
                Ok(status) => exit_detail(&status),
                Err(e) => format!("exit status unknown: {e}"),
            };
            lock(&watched).remove(&pid);
            // Whatever the worker left behind in its group goes with it.
            signal_group(pid, Signal::SIGKILL);
            let _ = events.send(DriverEvent::Exited {
                node_id: node,
                iaas_id: pid.to_string(),
                incarnation: Some(incarnation),
                detail,
            });
        });
        tracing::debug!(node_id, pid, log = %log_path.display(), "spawned a local worker");
        Ok(LaunchedInstance {
            node_id: node_id.to_string(),
            iaas_id: pid.to_string(),
            incarnation: Some(start_time),
            state: InstanceState::Running,
            addresses: Vec::new(),
        })
    }
}

fn io_error(what: &str, path: &Path, e: &std::io::Error) -> IaasError {
    IaasError::new(
        IaasErrorKind::Other,
        format!("cannot {what} {}: {e}", path.display()),
    )
}
