//! Turning the `config` crate's errors into [`ConfigError`]s that name the origin
//! (file or environment variable) and the dotted key.

use std::collections::HashMap;
use std::path::Path;

use super::env_var_for;
use super::error::{ConfigError, Origin};

/// What `load` needs to turn the `config` crate's errors into ours.
pub(super) struct Context<'a> {
    pub(super) file: Option<&'a Path>,
    /// Dotted key → variable name, for every override given.
    pub(super) env_keys: HashMap<String, String>,
}

impl Context<'_> {
    /// The origin of a problem at `key`: the environment if an override set that key (or
    /// a value says it came from there), else the file, else the defaults.
    fn origin(&self, key: Option<&str>, from_env: bool) -> Origin {
        let file = self.file.map(Path::to_path_buf);
        if let Some(key) = key {
            if let Some(var) = self.env_keys.get(key) {
                return Origin::Env {
                    var: var.clone(),
                    file,
                };
            }
            if from_env {
                return Origin::Env {
                    var: env_var_for(key),
                    file,
                };
            }
        }
        match file {
            Some(path) => Origin::File(path),
            None => Origin::Defaults,
        }
    }
}

/// The origin string the `config` crate gives values from the environment.
const CONFIG_ENV_ORIGIN: &str = "the environment";
fn join_key(parent: Option<&str>, child: &str) -> String {
    match parent {
        Some(parent) if !parent.is_empty() => format!("{parent}.{child}"),
        _ => child.to_owned(),
    }
}

/// Splits serde's "unknown field `x`, expected one of `a`, `b`" into (`x`, "expected …").
fn parse_unknown_field(message: &str) -> Option<(String, String)> {
    let rest = message.strip_prefix("unknown field `")?;
    let end = rest.find('`')?;
    let field = rest[..end].to_owned();
    let expected = rest[end + 1..].trim_start_matches(',').trim().to_owned();
    Some((field, expected))
}

pub(super) fn convert(err: config::ConfigError, ctx: &Context<'_>) -> ConfigError {
    convert_at(err, None, false, ctx)
}

/// `parent` is the key path the `config` crate attached around `err`; `from_env` is true
/// when it said the value came from the environment.
fn convert_at(
    err: config::ConfigError,
    parent: Option<String>,
    from_env: bool,
    ctx: &Context<'_>,
) -> ConfigError {
    match err {
        config::ConfigError::Type {
            origin,
            unexpected,
            expected,
            key,
        } => {
            let key = key.or(parent);
            let from_env = from_env || origin.as_deref() == Some(CONFIG_ENV_ORIGIN);
            ConfigError::InvalidValue {
                origin: ctx.origin(key.as_deref(), from_env),
                key,
                message: format!("invalid type: {unexpected}, expected {expected}"),
            }
        }
        config::ConfigError::At { error, origin, key } => {
            let key = key.or(parent);
            let from_env = from_env || origin.as_deref() == Some(CONFIG_ENV_ORIGIN);
            convert_at(*error, key, from_env, ctx)
        }
        config::ConfigError::NotFound(key) => {
            let key = if key.is_empty() {
                parent.unwrap_or_default()
            } else {
                key
            };
            ConfigError::MissingKey {
                origin: ctx.origin(None, false),
                key,
            }
        }
        config::ConfigError::Message(message) => match parse_unknown_field(&message) {
            Some((field, expected)) => {
                let key = join_key(parent.as_deref(), &field);
                ConfigError::UnknownKey {
                    origin: ctx.origin(Some(&key), false),
                    key,
                    expected,
                }
            }
            None => ConfigError::InvalidValue {
                origin: ctx.origin(parent.as_deref(), from_env),
                key: parent,
                message,
            },
        },
        config::ConfigError::FileParse { cause, .. } => match ctx.file {
            Some(path) => ConfigError::Syntax {
                path: path.to_path_buf(),
                message: cause.to_string(),
            },
            None => ConfigError::InvalidValue {
                origin: Origin::Defaults,
                key: parent,
                message: cause.to_string(),
            },
        },
        other => ConfigError::InvalidValue {
            origin: ctx.origin(parent.as_deref(), from_env),
            key: parent,
            message: other.to_string(),
        },
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_parsing() {
        assert_eq!(
            parse_unknown_field("unknown field `prefech`, expected one of `a`, `b`"),
            Some(("prefech".to_owned(), "expected one of `a`, `b`".to_owned()))
        );
        assert_eq!(parse_unknown_field("something else"), None);
    }
}
