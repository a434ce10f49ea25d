//! The jobs file: how a worker tells the agent how many jobs it holds.
//!
//! The agent puts the file's path in the worker's environment as `EPU_JOBS_FILE`.
//! The worker writes a whole number into it whenever the count changes
//! (`echo 1 > "$EPU_JOBS_FILE"` when it takes a job, `echo 0 > "$EPU_JOBS_FILE"`
//! when it is done). The agent reads it at every heartbeat. A missing or empty
//! file means 0 (idle); so does anything that is not a whole number, with a
//! warning in the agent's log. Surrounding whitespace is ignored; a negative
//! number counts as 0.

use std::path::{Path, PathBuf};

/// Parses the file's text; `Err` for text that is not a count.
pub fn parse_jobs(text: &str) -> Result<u32, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(0);
    }
    match t.parse::<i64>() {
        Ok(n) if n <= 0 => Ok(0),
        Ok(n) => Ok(u32::try_from(n).unwrap_or(u32::MAX)),
        Err(_) => Err(format!(
            "{:?} is not a whole number",
            t.chars().take(40).collect::<String>()
        )),
    }
}

/// The jobs count in `path` now (see the module docs).
pub fn read_jobs(path: &Path) -> u32 {
    match std::fs::read_to_string(path) {
        Ok(text) => match parse_jobs(&text) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the worker's jobs file does not hold a count; reporting 0 jobs");
                0
            }
        },
        Err(_) => 0,
    }
}

/// The jobs file of one agent run: a given path, or a temporary file removed when
/// this is dropped.
#[derive(Debug)]
pub struct JobsFile {
    path: PathBuf,
    _temp: Option<tempfile::TempPath>,
}

impl JobsFile {
    /// Uses `given`, or creates an empty temporary file.
    pub fn new(given: Option<&Path>) -> std::io::Result<Self> {
        match given {
            Some(p) => Ok(JobsFile {
                path: p.to_path_buf(),
                _temp: None,
            }),
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("epu-jobs-")
                    .tempfile()?
                    .into_temp_path();
                Ok(JobsFile {
                    path: temp.to_path_buf(),
                    _temp: Some(temp),
                })
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        for (text, want) in [
            ("", Ok(0)),
            ("  \n", Ok(0)),
            ("1\n", Ok(1)),
            (" 12 ", Ok(12)),
            ("-3", Ok(0)),
            ("99999999999", Ok(u32::MAX)),
        ] {
            assert_eq!(parse_jobs(text), want, "{text:?}");
        }
        for bad in ["one", "1.5", "1 2"] {
            assert!(parse_jobs(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn missing_file_is_idle_and_temp_files_go_away() {
        assert_eq!(read_jobs(Path::new("/nonexistent/epu/jobs")), 0);
        let f = JobsFile::new(None).expect("temp");
        let path = f.path().to_path_buf();
        assert_eq!(read_jobs(&path), 0);
        std::fs::write(&path, "4\n").expect("write");
        assert_eq!(read_jobs(&path), 4);
        std::fs::write(&path, "busy\n").expect("write");
        assert_eq!(read_jobs(&path), 0);
        drop(f);
        assert!(!path.exists());
    }
}
