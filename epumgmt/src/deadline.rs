//! Every command's overall deadline, and what it is waiting for when it passes.
//!
//! `main` runs each command under `--timeout` (a default per command). The
//! command says what it is waiting for as it goes ([`waiting_for`]); when the
//! deadline passes, `main` prints the last such word and exits [`EXIT_DEADLINE`].
//! Nothing after the deadline is awaited: `main` leaves the process with
//! `std::process::exit` without tearing the runtime down.

use std::sync::Mutex;
use std::time::Duration;

/// Exit code: the command's deadline (`--timeout`) passed.
pub const EXIT_DEADLINE: i32 = 7;

static WAITING: Mutex<String> = Mutex::new(String::new());

/// Records what the command is waiting for now.
pub fn waiting_for(what: impl Into<String>) {
    let mut w = WAITING.lock().unwrap_or_else(|p| p.into_inner());
    *w = what.into();
}

/// What the command last said it was waiting for.
pub fn current() -> String {
    let w = WAITING.lock().unwrap_or_else(|p| p.into_inner());
    if w.is_empty() {
        "the command to start".to_string()
    } else {
        w.clone()
    }
}

/// The default deadlines, in seconds.
pub const DEFAULT_SECS: u64 = 30;
pub const LAUNCH_SECS: u64 = 180;
pub const KILLRUN_SECS: u64 = 300;

/// The message printed when the deadline passes.
pub fn expired_message(limit: Duration) -> String {
    format!(
        "gave up after {} s (--timeout) while waiting for {}; the run's logs are in its run directory (`epumgmt status` shows where)",
        limit.as_secs_f64(),
        current()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_what_was_awaited() {
        waiting_for("the provisioner's answer to describe_nodes");
        let m = expired_message(Duration::from_secs(3));
        assert!(m.contains("after 3 s"), "{m}");
        assert!(
            m.contains("the provisioner's answer to describe_nodes"),
            "{m}"
        );
    }
}
