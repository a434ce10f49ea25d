//! Domain policies: what a domain is (engine, its config, what to launch, how to
//! judge health, where its work queue is), loaded from TOML/YAML policy files or
//! sent with `add_domain`. `{run}` and `{domain}` in a policy's per-run strings are
//! filled in when it is loaded or added ([`expand_placeholders`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use decision_engines::{EngineConfig, Registry};
pub use epu_model::health::{HealthPolicy, SensorPolicy};
use epu_model::messages::Deployable;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One domain's definition. In a policy file the engine's settings sit under
/// `[engine_conf]` (TOML) / `engine_conf:` (YAML).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainPolicy {
    /// `[a-z0-9_-]{1,64}`.
    pub name: String,
    /// A registered engine: `npreserving`, `queuelen`, or your own.
    pub engine: String,
    #[serde(default)]
    pub engine_conf: Map<String, Value>,
    /// What each worker is.
    pub deployable: Deployable,
    /// How the sensor aggregator judges this domain's workers: `[health]`, its keys
    /// checked as they are read (a misspelt one is refused).
    #[serde(default, deserialize_with = "epu_model::health::deserialize_strict")]
    pub health: HealthPolicy,
    /// Where the domain's work queue is: `[sensors]`.
    #[serde(default)]
    pub sensors: SensorPolicy,
    /// Decide and log, but do not launch or destroy.
    #[serde(default)]
    pub dry_run: bool,
    /// Do not decide at all.
    #[serde(default)]
    pub paused: bool,
}

/// A policy is the body of `add_domain`; the controller answers with the new
/// domain's summary.
impl epu_core::request::Request for DomainPolicy {
    const OP: epu_core::wire::Op = epu_core::wire::Op::AddDomain;
    const TO: epu_core::wire::Service = epu_core::wire::Service::Controller;
    type Reply = epu_model::messages::DomainSummary;
}

/// A policy that failed to load or validate. The message names the file (when
/// there is one) and the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {message}")]
pub struct PolicyError {
    pub origin: String,
    pub key: Option<String>,
    pub message: String,
}

impl PolicyError {
    fn new(origin: &str, key: Option<&str>, message: impl Into<String>) -> Self {
        let message = message.into();
        PolicyError {
            origin: origin.to_string(),
            key: key.map(str::to_string),
            message: match key {
                Some(k) if !k.is_empty() && !message.contains(k) => {
                    format!("key \"{k}\": {message}")
                }
                _ => message,
            },
        }
    }
}

impl DomainPolicy {
    /// Checks everything that can be checked without running: the name, the
    /// engine exists and accepts its config, a local deployable names a command.
    /// (The health settings cannot be out of range: they are checked as they are
    /// read.)
    /// `origin` names the file (or `add_domain`) in errors.
    pub fn validate(&self, registry: &Registry, origin: &str) -> Result<(), PolicyError> {
        let ok_name = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok_name {
            return Err(PolicyError::new(
                origin,
                Some("name"),
                format!(
                    "invalid domain name {:?}: use 1 to 64 characters of a-z, 0-9, '-' and '_'",
                    self.name
                ),
            ));
        }
        // The health settings are `Secs`: finite and above 0 by construction, checked
        // (with the key named) when the policy was read.
        if let Deployable::Local(l) = &self.deployable {
            if l.command.trim().is_empty() {
                return Err(PolicyError::new(
                    origin,
                    Some("deployable.command"),
                    "the local driver needs a command to run",
                ));
            }
        }
        self.create_engine(registry, origin).map(|_| ())
    }

    /// The domain's engine, initialized with its config.
    pub fn create_engine(
        &self,
        registry: &Registry,
        origin: &str,
    ) -> Result<Box<dyn decision_engines::DecisionEngine>, PolicyError> {
        let conf = EngineConfig::from_json(Value::Object(self.engine_conf.clone()))
            .map_err(|e| PolicyError::new(origin, Some("engine_conf"), e.to_string()))?;
        registry.create(&self.engine, &conf).map_err(|e| match e {
            decision_engines::RegistryError::Config { source, .. } => PolicyError::new(
                origin,
                Some(&format!("engine_conf.{}", source.key)),
                source.to_string(),
            ),
            other => PolicyError::new(origin, Some("engine"), other.to_string()),
        })
    }
}

/// Fills in `{run}` (with `run`) and `{domain}` (with the policy's `name`) in the
/// strings of `policy` that vary per run, so one policy file serves every run:
///
/// * `sensors.queue` and `sensors.broker_url`;
/// * a `local` deployable's `args` (each), `env` values (not the names) and `cwd`;
/// * an `ec2` deployable's `user_data` and `tags` values (not the names).
///
/// Nothing else is touched: not `name` or `engine`, not `engine_conf` (the engine's
/// own settings, changed by `reconfigure`), not a local deployable's `command` (the
/// provisioner's `allowed_commands` must match it as written), not the EC2 image,
/// instance type, key, subnet, security groups or IAM profile (they name resources
/// that exist before the run).
///
/// Only the exact placeholders `{run}` and `{domain}` are replaced. Any other
/// `{word}` is left as it is, and so are `{{...}}` spans (the provisioner's user-data
/// template: `{{run}}`, `{{var.NAME}}`, ...) and `${...}` (shell syntax in
/// `sh -c` args or user data). There is no escape for a literal `{run}`.
///
/// Run names (`[a-z0-9-]`) and domain names (`[a-z0-9_-]`) contain no braces, so
/// expanding an expanded policy changes nothing.
pub fn expand_placeholders(mut policy: DomainPolicy, run: &str) -> DomainPolicy {
    let domain = policy.name.clone();
    let x = |s: &mut String| *s = expand_str(s, run, &domain);
    for s in [&mut policy.sensors.queue, &mut policy.sensors.broker_url]
        .into_iter()
        .flatten()
    {
        x(s);
    }
    match &mut policy.deployable {
        Deployable::Local(l) => {
            l.args.iter_mut().for_each(x);
            l.env.values_mut().for_each(x);
            l.cwd.iter_mut().for_each(x);
        }
        Deployable::Ec2(e) => {
            e.user_data.iter_mut().for_each(x);
            e.tags.values_mut().for_each(x);
        }
        Deployable::Sim(_) => {}
    }
    policy
}

/// `{run}` → `run` and `{domain}` → `domain` in `s`, outside `{{...}}` and not
/// after a `$`.
fn expand_str(s: &str, run: &str, domain: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while let Some(off) = s[i..].find('{') {
        let at = i + off;
        out.push_str(&s[i..at]);
        let from = &s[at..];
        if let Some(inner) = from.strip_prefix("{{") {
            // Copied through its closing `}}` (or to the end when unclosed).
            let len = inner.find("}}").map_or(from.len(), |end| end + 4);
            out.push_str(&from[..len]);
            i = at + len;
            continue;
        }
        let shell = s[..at].ends_with('$');
        let hit = [("{run}", run), ("{domain}", domain)]
            .into_iter()
            .find(|(p, _)| !shell && from.starts_with(p));
        match hit {
            Some((p, value)) => {
                out.push_str(value);
                i = at + p.len();
            }
            None => {
                out.push('{');
                i = at + 1;
            }
        }
    }
    out.push_str(&s[i..]);
    out
}

/// Loads one policy file (TOML or YAML by extension), fills in `{run}` and
/// `{domain}` for the run `run` ([`expand_placeholders`]), and validates it.
pub fn load_policy(
    path: &Path,
    registry: &Registry,
    run: &str,
) -> Result<DomainPolicy, PolicyError> {
    let origin = format!("policy file {}", path.display());
    let policy: DomainPolicy = epu_core::config::load(Some(path), &HashMap::new())
        .map_err(|e| PolicyError::new(&origin, e.key(), strip_origin(&e.to_string(), path)))?;
    let policy = expand_placeholders(policy, run);
    policy.validate(registry, &origin)?;
    Ok(policy)
}

/// Loads several policy files for the run `run` (see [`load_policy`]); domain
/// names must be unique.
pub fn load_policies(
    paths: &[PathBuf],
    registry: &Registry,
    run: &str,
) -> Result<BTreeMap<String, DomainPolicy>, PolicyError> {
    let mut out = BTreeMap::new();
    for p in paths {
        let policy = load_policy(p, registry, run)?;
        if out.contains_key(&policy.name) {
            return Err(PolicyError::new(
                &format!("policy file {}", p.display()),
                Some("name"),
                format!("domain {:?} is defined twice", policy.name),
            ));
        }
        out.insert(policy.name.clone(), policy);
    }
    Ok(out)
}

fn strip_origin(message: &str, path: &Path) -> String {
    // The config loader already names the file; avoid saying it twice.
    let prefix = format!("config file {}: ", path.display());
    message.strip_prefix(&prefix).unwrap_or(message).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use epu_model::messages::{Ec2Deployable, LocalDeployable, SimDeployable};

    #[test]
    fn strings_expand_run_and_domain_only() {
        let cases: &[(&str, &str)] = &[
            ("jobs.{run}", "jobs.r1"),
            ("{domain}", "web"),
            ("{run}/{domain}", "r1/web"),
            ("{run}{run}.{domain}-{domain}", "r1r1.web-web"),
            ("no placeholder here", "no placeholder here"),
            ("", ""),
            (
                "{{var.role}} {{run}} {{ domain }}",
                "{{var.role}} {{run}} {{ domain }}",
            ),
            ("{{var.x}}-{run}", "{{var.x}}-r1"),
            ("{{heartbeat}}\n{domain}", "{{heartbeat}}\nweb"),
            ("unclosed {{run {run}", "unclosed {{run {run}"),
            ("{colour} {Run} { run } {run", "{colour} {Run} { run } {run"),
            ("echo ${run} $HOME {run}", "echo ${run} $HOME r1"),
            ("{{run}}}", "{{run}}}"),
            ("{{{run}}", "{{{run}}"),
            ("{}{run}}", "{}r1}"),
            ("é{run}ü", "ér1ü"),
        ];
        for (input, want) in cases {
            assert_eq!(expand_str(input, "r1", "web"), *want, "input {input:?}");
        }
    }

    fn policy(deployable: Deployable) -> DomainPolicy {
        DomainPolicy {
            name: "web".into(),
            engine: "{run}".into(),
            engine_conf: serde_json::json!({"queue": "{run}"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            deployable,
            health: HealthPolicy::default(),
            sensors: SensorPolicy {
                queue: Some("jobs.{run}".into()),
                broker_url: Some("amqp://h/{domain}".into()),
            },
            dry_run: false,
            paused: false,
        }
    }

    #[test]
    fn a_local_policy_expands_its_per_run_fields() {
        let local = LocalDeployable {
            command: "/opt/{run}/worker".into(),
            args: vec![
                "--queue".into(),
                "jobs.{run}".into(),
                "{domain}-{run}".into(),
                "{{var.role}}".into(),
                "plain".into(),
            ],
            env: [
                ("EPU_WORK_QUEUE".to_string(), "jobs.{run}".to_string()),
                ("{run}".to_string(), "{domain}".to_string()),
            ]
            .into_iter()
            .collect(),
            cwd: Some("/tmp/{run}/{domain}".into()),
        };
        let p = expand_placeholders(policy(Deployable::Local(local)), "r1");
        assert_eq!(p.sensors.queue.as_deref(), Some("jobs.r1"));
        assert_eq!(p.sensors.broker_url.as_deref(), Some("amqp://h/web"));
        // Not expanded: the name, the engine, its config, the command.
        assert_eq!(p.name, "web");
        assert_eq!(p.engine, "{run}");
        assert_eq!(p.engine_conf["queue"], "{run}");
        let Deployable::Local(l) = &p.deployable else {
            panic!("still local")
        };
        assert_eq!(l.command, "/opt/{run}/worker");
        assert_eq!(
            l.args,
            ["--queue", "jobs.r1", "web-r1", "{{var.role}}", "plain"]
        );
        assert_eq!(l.env["EPU_WORK_QUEUE"], "jobs.r1");
        assert_eq!(l.env["{run}"], "web", "names stay, values expand");
        assert_eq!(l.cwd.as_deref(), Some("/tmp/r1/web"));
        // Expanding again changes nothing.
        assert_eq!(expand_placeholders(p.clone(), "other"), p);
    }

    #[test]
    fn an_ec2_policy_expands_user_data_and_tag_values() {
        let ec2 = Ec2Deployable {
            image: "ami-{run}".into(),
            instance_type: "t3.micro".into(),
            key_name: Some("{run}".into()),
            subnet: None,
            security_groups: vec!["sg-{run}".into()],
            iam_profile: None,
            user_data: Some(
                "#!/bin/sh\n{{heartbeat}}\nQ=jobs.{run} D={domain} N={{node_id}} V={{var.size}} ${run}"
                    .into(),
            ),
            tags: [
                ("epu-run".to_string(), "{run}".to_string()),
                ("role".to_string(), "{domain}-worker".to_string()),
                ("fixed".to_string(), "prod".to_string()),
            ]
            .into_iter()
            .collect(),
        };
        let p = expand_placeholders(policy(Deployable::Ec2(ec2)), "r1");
        let Deployable::Ec2(e) = &p.deployable else {
            panic!("still ec2")
        };
        assert_eq!(
            e.user_data.as_deref(),
            Some("#!/bin/sh\n{{heartbeat}}\nQ=jobs.r1 D=web N={{node_id}} V={{var.size}} ${run}")
        );
        assert_eq!(e.tags["epu-run"], "r1");
        assert_eq!(e.tags["role"], "web-worker");
        assert_eq!(e.tags["fixed"], "prod");
        assert_eq!(e.image, "ami-{run}");
        assert_eq!(e.key_name.as_deref(), Some("{run}"));
        assert_eq!(e.security_groups, ["sg-{run}"]);
    }

    /// Health settings in a policy file: (file text after `[health]`, the value the
    /// missing timeout gets, or a fragment every error must contain besides the file).
    #[test]
    fn health_settings_are_checked_as_the_policy_is_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let reg = Registry::with_builtins();
        #[rustfmt::skip]
        let cases: &[(&str, &str, Result<f64, &str>)] = &[
            ("ok.toml",        "missing_timeout_secs = 1\n",            Ok(1.0)),
            ("frac.toml",      "missing_timeout_secs = 0.25\n",         Ok(0.25)),
            ("defaults.toml",  "",                                     Ok(15.0)),
            ("zero.toml",      "missing_timeout_secs = 0\n",            Err("missing_timeout_secs")),
            ("negative.toml",  "boot_timeout_secs = -5\n",              Err("-5 is not a valid number of seconds")),
            ("zombie.toml",    "zombie_secs = 0\n",                     Err("zombie_secs")),
            ("typo.toml",      "missing_timout_secs = 1\n",             Err("missing_timout_secs")),
            ("text.toml",      "missing_timeout_secs = \"soon\"\n",     Err("missing_timeout_secs")),
        ];
        for (file, health, want) in cases {
            let p = dir.path().join(file);
            let text = format!(
                "name = \"web\"\nengine = \"npreserving\"\n[engine_conf]\npreserve_n = 1\n[deployable]\ndriver = \"sim\"\n[health]\n{health}"
            );
            std::fs::write(&p, text).expect("write");
            match (want, load_policy(&p, &reg, "r1")) {
                (Ok(m), Ok(policy)) => {
                    assert_eq!(policy.health.missing_timeout_secs.get(), *m, "{file}")
                }
                (Err(w), Err(e)) => {
                    let e = e.to_string();
                    assert!(e.contains(file), "{file}: names the file: {e}");
                    assert!(e.contains(w), "{file}: names {w}: {e}");
                }
                (w, g) => panic!("{file}: wanted {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn an_added_domain_with_bad_health_is_refused_naming_the_key() {
        let body = serde_json::json!({
            "name": "web", "engine": "npreserving", "engine_conf": {"preserve_n": 1},
            "deployable": {"driver": "sim"},
            "health": {"missing_timeout_secs": -1},
        });
        let e = serde_json::from_value::<DomainPolicy>(body).expect_err("negative");
        assert!(e.to_string().contains("missing_timeout_secs: -1"), "{e}");
    }

    #[test]
    fn a_policy_without_placeholders_is_unchanged() {
        let mut p = policy(Deployable::Sim(SimDeployable::default()));
        p.sensors = SensorPolicy {
            queue: Some("jobs.fixed".into()),
            broker_url: None,
        };
        assert_eq!(expand_placeholders(p.clone(), "r1"), p);
    }
}
