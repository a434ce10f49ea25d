//! [`ConfigError`] and [`Origin`]: what went wrong, and where the bad value came from.

use std::fmt;
use std::path::PathBuf;

use super::env_var_for;

/// Where a bad config value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The config file.
    File(PathBuf),
    /// An environment override, and the file it overrode if there was one.
    Env {
        /// The variable's name.
        var: String,
        /// The config file, if one was given.
        file: Option<PathBuf>,
    },
    /// Neither: the built-in defaults (no file given, no override).
    Defaults,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "config file {}", path.display()),
            Origin::Env {
                var,
                file: Some(path),
            } => {
                write!(
                    f,
                    "environment variable {var} (over config file {})",
                    path.display()
                )
            }
            Origin::Env { var, file: None } => write!(f, "environment variable {var}"),
            Origin::Defaults => write!(f, "config (no file given)"),
        }
    }
}

/// Errors of [`load`](super::load). Each names the file and, where there is one, the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file does not exist.
    #[error("config file {}: not found; check the path (relative paths start at the working directory)", path.display())]
    FileNotFound {
        /// The path as given.
        path: PathBuf,
    },
    /// The config file exists but cannot be read.
    #[error("config file {}: cannot read it: {source}", path.display())]
    Read {
        /// The path as given.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The file's extension is not one we parse.
    #[error("config file {}: unknown format; name it *.toml, *.yaml or *.yml", path.display())]
    UnsupportedFormat {
        /// The path as given.
        path: PathBuf,
    },
    /// The file is not valid TOML/YAML.
    #[error("config file {}: syntax error: {message}", path.display())]
    Syntax {
        /// The path as given.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A key that the config struct does not have.
    #[error("{origin}: unknown key \"{key}\"{}; remove it or fix its spelling", expected_suffix(.expected))]
    UnknownKey {
        /// Where it came from.
        origin: Origin,
        /// The dotted key path.
        key: String,
        /// The keys allowed there, as serde lists them (may be empty).
        expected: String,
    },
    /// A required key that is absent.
    #[error("{origin}: missing key \"{key}\"; set it in the config file or as {}", env_var_for(.key))]
    MissingKey {
        /// Where the config came from.
        origin: Origin,
        /// The dotted key path.
        key: String,
    },
    /// A value of the wrong type or out of range.
    #[error("{origin}: {}{message}", key_prefix(.key))]
    InvalidValue {
        /// Where it came from.
        origin: Origin,
        /// The dotted key path, when known.
        key: Option<String>,
        /// What was wrong and what was expected.
        message: String,
    },
}

fn expected_suffix(expected: &str) -> String {
    if expected.is_empty() {
        String::new()
    } else {
        format!(" ({expected})")
    }
}

fn key_prefix(key: &Option<String>) -> String {
    match key {
        Some(key) => format!("key \"{key}\": "),
        None => String::new(),
    }
}

impl ConfigError {
    /// The dotted key path the error is about, if any.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::MissingKey { key, .. } => Some(key),
            ConfigError::InvalidValue { key, .. } => key.as_deref(),
            _ => None,
        }
    }
}
