//! [`load`]: the file, then the `EPU_*` overrides, through the `config` crate.

use std::collections::HashMap;
use std::path::Path;

use serde::de::DeserializeOwned;

use super::convert::{convert, Context};
use super::error::{ConfigError, Origin};

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "EPU_";
/// The nesting separator in environment override names.
pub const ENV_SEPARATOR: &str = "__";

/// The environment variable that overrides dotted config key `key`
/// (`"bus.amqp_url"` → `"EPU_BUS__AMQP_URL"`).
pub fn env_var_for(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.replace('.', ENV_SEPARATOR).to_uppercase()
    )
}
/// Loads a `T` from an optional TOML/YAML file (by extension: `.toml`, `.yaml`, `.yml`)
/// and the `EPU_*` overrides in `env` (see the module docs).
///
/// With no file and no overrides, `T` comes from its serde defaults.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    env: &HashMap<String, String>,
) -> Result<T, ConfigError> {
    let mut env = env.clone();
    loop {
        match load_once(file, &env) {
            // A top-level `EPU_*` variable this config has no key for belongs to
            // someone else (a plan, a worker): drop it and load again.
            Err(ConfigError::UnknownKey {
                origin: Origin::Env { var, .. },
                ..
            }) if is_top_level(&var) && env.remove(&var).is_some() => continue,
            other => return other,
        }
    }
}

fn is_top_level(var: &str) -> bool {
    var.strip_prefix(ENV_PREFIX)
        .is_some_and(|rest| !rest.contains(ENV_SEPARATOR))
}

fn load_once<T: DeserializeOwned>(
    file: Option<&Path>,
    env: &HashMap<String, String>,
) -> Result<T, ConfigError> {
    let mut builder = config::Config::builder();

    if let Some(path) = file {
        let format = format_of(path)?;
        let contents = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ConfigError::FileNotFound {
                    path: path.to_path_buf(),
                }
            } else {
                ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        builder = builder.add_source(config::File::from_str(&contents, format));
    }

    let mut overrides: HashMap<String, String> = HashMap::new();
    let mut env_keys = HashMap::new();
    for (var, value) in env {
        if let Some(rest) = var.strip_prefix(ENV_PREFIX) {
            if rest.is_empty() {
                continue;
            }
            env_keys.insert(rest.to_lowercase().replace(ENV_SEPARATOR, "."), var.clone());
            overrides.insert(var.clone(), value.clone());
        }
    }
    builder = builder.add_source(
        config::Environment::default()
            .prefix(ENV_PREFIX.trim_end_matches('_'))
            .prefix_separator("_")
            .separator(ENV_SEPARATOR)
            .try_parsing(false)
            .source(Some(overrides.into_iter().collect())),
    );

    let ctx = Context { file, env_keys };
    let built = builder.build().map_err(|e| convert(e, &ctx))?;
    built.try_deserialize::<T>().map_err(|e| convert(e, &ctx))
}

fn format_of(path: &Path) -> Result<config::FileFormat, ConfigError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("toml") => Ok(config::FileFormat::Toml),
        Some("yaml") | Some("yml") => Ok(config::FileFormat::Yaml),
        _ => Err(ConfigError::UnsupportedFormat {
            path: path.to_path_buf(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BusConfig, TelemetryConfig};

    #[test]
    fn env_var_names() {
        assert_eq!(env_var_for("bus.amqp_url"), "EPU_BUS__AMQP_URL");
        assert_eq!(env_var_for("run"), "EPU_RUN");
    }

    #[test]
    fn defaults_without_file_or_env() {
        let bus: BusConfig = load(None, &HashMap::new()).unwrap();
        assert_eq!(bus, BusConfig::default());
        let tel: TelemetryConfig = load(None, &HashMap::new()).unwrap();
        assert_eq!(tel, TelemetryConfig::default());
    }

    #[test]
    fn unknown_extension_is_refused() {
        let err = load::<BusConfig>(Some(Path::new("/x/prov.ini")), &HashMap::new()).unwrap_err();
        assert!(err.to_string().contains("/x/prov.ini"), "{err}");
        assert!(err.to_string().contains("*.toml"), "{err}");
    }

    #[test]
    fn non_epu_variables_are_ignored() {
        let env: HashMap<String, String> = [
            ("PATH".to_owned(), "/usr/bin".to_owned()),
            ("EPUX_PREFETCH".to_owned(), "1".to_owned()),
            ("EPU_".to_owned(), "1".to_owned()),
        ]
        .into_iter()
        .collect();
        let bus: BusConfig = load(None, &env).unwrap();
        assert_eq!(bus, BusConfig::default());
    }
}
