//! One-shot failpoints armed by a file: the chaos suite's way to crash a service
//! at an exact point of its work (a test hook; never set it in production).
//!
//! When `EPU_FAILPOINTS_DIR` names a directory, a service that reaches the
//! failpoint `name` checks for a file `<dir>/<name>`. If it is there, the file is
//! deleted (so the restarted service runs on) and [`crash_if_armed`] exits the
//! process with status 137, as a SIGKILL would, without flushing or stopping
//! anything. Without the variable a failpoint costs one `OnceLock` read.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The environment variable naming the directory of armed failpoints.
pub const DIR_VAR: &str = "EPU_FAILPOINTS_DIR";

fn dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        std::env::var_os(DIR_VAR)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .as_deref()
}

/// Disarms `name` in `dir` and says whether it was armed (its file existed and
/// this call removed it: of two racing callers only one sees `true`).
pub fn take_armed(dir: &Path, name: &str) -> bool {
    std::fs::remove_file(dir.join(name)).is_ok()
}

/// Exits the process with status 137 if the failpoint `name` is armed in
/// `EPU_FAILPOINTS_DIR` (disarming it first).
pub fn crash_if_armed(name: &str) {
    let Some(dir) = dir() else { return };
    if take_armed(dir, name) {
        tracing::error!(
            event = "failpoint_reached",
            failpoint = name,
            "failpoint reached: exiting abruptly (test hook)"
        );
        std::process::exit(137);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failpoint_is_armed_by_its_file_and_fires_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(!take_armed(dir.path(), "p"), "nothing armed yet");
        std::fs::write(dir.path().join("p"), b"").expect("arm");
        assert!(!take_armed(dir.path(), "q"), "another name is not armed");
        assert!(take_armed(dir.path(), "p"), "armed");
        assert!(!take_armed(dir.path(), "p"), "one shot: disarmed by firing");
    }
}
