//! Learning a domain's settings from the controller.
//!
//! A domain's health thresholds and work queue are its policy's `health` and
//! `sensors`, and the policy lives in the controller. Domains in the aggregator's
//! config (written from the policies at launch) or given to
//! [`Aggregator::set_domain`] are used as given. For any *other* domain that has
//! nodes here (the provisioner reports them, or they heartbeat) — a domain added
//! with `add_domain` after the aggregator started, or one the config left out — the
//! aggregator asks the controller (`describe_domain`) and takes the answer's
//! `health` and `sensors`. Until it has an answer the domain is judged with the
//! defaults.
//!
//! It is level-triggered: each pass (every [`PASS_EVERY`]) compares the domains that
//! have nodes with those it has settings for, so nothing depends on hearing about an
//! `add_domain` when it happens, and a restart simply asks again. The asking is
//! bounded: at most one question per domain in flight, [`MAX_CONCURRENT`] at once,
//! each for at most [`ASK_TIMEOUT`]; a failed one (no answer, an unreadable one, or
//! "no such domain") is retried after 1 s, doubling to [`RETRY_MAX`]; a learned
//! domain is asked again every [`REFRESH_EVERY`] (so a domain removed and added
//! again with other settings is picked up). A domain whose nodes are all gone is
//! forgotten; its nodes come back, it is asked again.
//!
//! A broker password never comes in a reply (the controller shows it as `***`):
//! a learned domain whose sensors name a broker that needs a password gets a
//! probe that fails, reported as unreachable (never read as 0), until the
//! aggregator's own config names that domain.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use epu_core::request;
use epu_core::wire::{ErrorCode, ReplyError};
use epu_model::messages::{DescribeDomainRequest, DomainDescription};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::DomainSensors;
use crate::{lock, Inner, SENDER};

/// How often the learner compares the domains that have nodes with those it knows.
pub const PASS_EVERY: Duration = Duration::from_millis(250);
/// The longest one `describe_domain` may take.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// The first retry after a failed question; it doubles up to [`RETRY_MAX`].
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// A learned domain is asked again this long after its last answer.
pub const REFRESH_EVERY: Duration = Duration::from_secs(60);
/// Questions in flight at once.
pub const MAX_CONCURRENT: usize = 16;

/// What the controller answered about one domain.
#[derive(Debug)]
pub enum Answer {
    /// Its settings (its policy's `health` and `sensors`).
    Settings(DomainSensors),
    /// The controller hosts no such domain.
    NotFound(String),
    /// No answer, or one that could not be read.
    Failed(String),
}

/// The settings of `domain` in a `describe_domain` answer (its policy's `health`
/// and `sensors`), checked.
pub fn settings_from_description(
    domain: &str,
    d: &DomainDescription,
) -> Result<DomainSensors, String> {
    let s = DomainSensors::from_policy(domain, d.health, &d.sensors);
    s.validate()
        .map_err(|e| format!("unusable settings in describe_domain: {e}"))?;
    Ok(s)
}

#[derive(Debug)]
struct Entry {
    /// What was learned and applied, if anything (else: the defaults).
    settings: Option<DomainSensors>,
    next_ask: Instant,
    /// Failed questions in a row.
    failures: u32,
}

/// What the learner knows, per domain it is not configured with.
#[derive(Debug, Default)]
pub struct Learner {
    entries: Mutex<HashMap<String, Entry>>,
}

/// A pass's plan: whom to ask, and which learned domains to drop (no nodes left).
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub ask: Vec<String>,
    pub forget: Vec<String>,
}

impl Learner {
    /// Decides a pass: of the domains with nodes (`present`) that are not
    /// `configured`, those never asked or due are asked; entries of domains no
    /// longer present, or configured meanwhile, are dropped (returned in `forget`
    /// when they had settings applied).
    pub fn plan(
        &self,
        present: &HashSet<String>,
        configured: &HashSet<String>,
        now: Instant,
    ) -> Plan {
        let mut entries = lock(&self.entries);
        let mut plan = Plan::default();
        entries.retain(|name, e| {
            let keep = present.contains(name) && !configured.contains(name);
            if !keep && e.settings.is_some() && !configured.contains(name) {
                plan.forget.push(name.clone());
            }
            keep
        });
        for name in present {
            if configured.contains(name) {
                continue;
            }
            match entries.get(name) {
                Some(e) if e.next_ask > now => {}
                _ => plan.ask.push(name.clone()),
            }
        }
        plan.ask.sort();
        plan.forget.sort();
        plan
    }

    /// Records an answer. Returns what to do: `Some(Some(settings))` apply them,
    /// `Some(None)` drop the learned settings (back to the defaults), `None` nothing.
    pub fn record(
        &self,
        name: &str,
        answer: Answer,
        now: Instant,
    ) -> Option<Option<DomainSensors>> {
        let not_found = matches!(answer, Answer::NotFound(_));
        let mut entries = lock(&self.entries);
        let e = entries.entry(name.to_string()).or_insert(Entry {
            settings: None,
            next_ask: now,
            failures: 0,
        });
        match answer {
            Answer::Settings(s) => {
                if e.failures > 0 {
                    tracing::info!(domain = %name, "the controller described the domain");
                }
                e.failures = 0;
                e.next_ask = now + REFRESH_EVERY;
                if e.settings.as_ref() == Some(&s) {
                    return None;
                }
                e.settings = Some(s.clone());
                Some(Some(s))
            }
            Answer::NotFound(msg) | Answer::Failed(msg) => {
                // "No such domain" is an answer: whatever was learned no longer holds.
                // No answer at all is not: keep what was learned.
                let drop_learned = not_found && e.settings.is_some();
                if e.failures == 0 {
                    tracing::warn!(event = "sensor_domain_unknown", domain = %name, error = %msg, "cannot learn the domain's health and queue settings from the controller; judging it with the current ones (the defaults until it answers) and asking again");
                } else {
                    tracing::debug!(domain = %name, error = %msg, "describe_domain failed again");
                }
                e.next_ask = now + retry_after(e.failures);
                e.failures = e.failures.saturating_add(1);
                if drop_learned {
                    e.settings = None;
                    return Some(None);
                }
                None
            }
        }
    }

    /// Drops what was learned about `name` (it is configured now, or was removed).
    pub fn forget(&self, name: &str) {
        lock(&self.entries).remove(name);
    }

    /// The settings learned for `name`.
    pub fn learned(&self, name: &str) -> Option<DomainSensors> {
        lock(&self.entries)
            .get(name)
            .and_then(|e| e.settings.clone())
    }
}

/// The wait before the retry that follows `failures` failed questions in a row.
pub fn retry_after(failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.min(16)).unwrap_or(u32::MAX);
    RETRY_FIRST.saturating_mul(factor).min(RETRY_MAX)
}

impl Inner {
    /// Learns the settings of domains the aggregator was not configured with (see the
    /// module docs), until `stop`.
    pub(crate) async fn learn_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = tokio::time::sleep(PASS_EVERY) => {}
            }
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = self.learn_pass() => {}
            }
        }
    }

    async fn learn_pass(self: &Arc<Self>) {
        let present: HashSet<String> = lock(&self.tracker)
            .domains_with_nodes()
            .into_iter()
            .collect();
        let configured: HashSet<String> = lock(&self.domains).keys().cloned().collect();
        let plan = self.learner.plan(&present, &configured, Instant::now());
        for name in &plan.forget {
            self.apply_learned(name, None);
        }
        for chunk in plan.ask.chunks(MAX_CONCURRENT) {
            let mut asks = JoinSet::new();
            for name in chunk {
                let (me, name) = (self.clone(), name.clone());
                asks.spawn(async move {
                    let answer = me.ask_controller(&name).await;
                    (name, answer)
                });
            }
            while let Some(done) = asks.join_next().await {
                let Ok((name, answer)) = done else { continue };
                if let Some(change) = self.learner.record(&name, answer, Instant::now()) {
                    self.apply_learned(&name, change);
                }
            }
        }
    }

    async fn ask_controller(&self, domain: &str) -> Answer {
        let req = DescribeDomainRequest {
            domain: domain.to_string(),
        };
        let timeout = self.request_timeout.min(ASK_TIMEOUT);
        match request::call(self.bus.as_ref(), SENDER, &req, timeout).await {
            Ok(d) => match settings_from_description(domain, &d) {
                Ok(s) => Answer::Settings(s),
                Err(e) => Answer::Failed(e),
            },
            Err(e) if e.code == ErrorCode::NotFound => Answer::NotFound(e.to_string()),
            Err(e) => Answer::Failed(describe_error(&e)),
        }
    }

    /// Applies learned settings to a domain (or, with `None`, goes back to the
    /// defaults), unless it is configured: configured settings always win.
    fn apply_learned(self: &Arc<Self>, name: &str, settings: Option<DomainSensors>) {
        {
            // Held while the tracker is changed, so `set_domain` (which takes the same
            // lock first) cannot interleave and be overwritten.
            let domains = lock(&self.domains);
            if domains.contains_key(name) {
                return;
            }
            let mut tracker = lock(&self.tracker);
            match &settings {
                Some(s) => tracker.set_policy(name, s.thresholds()),
                None => tracker.remove_policy(name),
            }
        }
        self.stop_probe(name);
        let queue = settings.as_ref().and_then(|s| s.queue.as_ref());
        if queue.is_none() {
            lock(&self.queues).remove(name);
        }
        match &settings {
            Some(s) => {
                if s.queue.is_some() && lock(&self.started).is_some() && !*self.stop.borrow() {
                    self.start_probe(s);
                }
                tracing::info!(event = "sensor_domain_learned", domain = %name, settings = ?s, "took the domain's health and queue settings from the controller");
            }
            None => {
                tracing::info!(event = "sensor_domain_forgotten", domain = %name, "dropped the domain's learned settings; judging it with the defaults");
            }
        }
        self.notify.notify_one();
    }
}

fn describe_error(e: &ReplyError) -> String {
    format!("describe_domain: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use epu_model::health::{HealthPolicy, Secs, SensorPolicy};
    use epu_model::messages::{DomainSummary, EngineReport, EngineState};
    use serde_json::{json, Value};

    fn set(names: &[&str]) -> HashSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn settings(name: &str, missing: f64) -> DomainSensors {
        let mut d = DomainSensors::new(name);
        d.health.missing_timeout_secs = Secs::new(missing).expect("valid");
        d
    }

    /// The missing timeout and queue read, or a fragment of the error.
    type Expected = Result<(f64, Option<&'static str>), &'static str>;

    /// A `describe_domain` answer with `overrides` replacing its keys (`null`:
    /// leaving the key out), decoded as the aggregator decodes it.
    fn answer(overrides: Value) -> Result<DomainDescription, String> {
        let base = DomainDescription {
            summary: DomainSummary {
                domain: "d".into(),
                engine: "queue_length".into(),
                engine_state: EngineState::Pending,
                desired: 0,
                running: 0,
                pending: 0,
                unhealthy: 0,
                terminating: 0,
                backlog: None,
                dry_run: false,
                paused: false,
                engine_conf: Default::default(),
            },
            report: EngineReport::pending(),
            health: HealthPolicy::DEFAULT,
            sensors: SensorPolicy::default(),
            policy: json!({}),
            nodes: Vec::new(),
            decisions: Vec::new(),
        };
        let mut v = serde_json::to_value(&base).expect("encodes");
        if let (Some(obj), Some(over)) = (v.as_object_mut(), overrides.as_object()) {
            for (k, x) in over {
                if x.is_null() {
                    obj.remove(k);
                } else {
                    obj.insert(k.clone(), x.clone());
                }
            }
        }
        request::decode_reply::<DescribeDomainRequest>(v).map_err(|e| e.to_string())
    }

    #[test]
    fn the_settings_are_the_answers_health_and_sensors() {
        let cases: Vec<(Value, Expected)> = vec![
            (
                json!({"health": {"missing_timeout_secs": 1}, "sensors": {"queue": "jobs"}}),
                Ok((1.0, Some("jobs"))),
            ),
            (
                json!({"health": {"missing_timeout_secs": 3}, "policy": {"health": {"missing_timeout_secs": 9}, "sensors": {"queue": "q"}}}),
                Ok((3.0, None)),
            ),
            (json!({}), Ok((15.0, None))),
            (json!({"health": {}, "sensors": {}}), Ok((15.0, None))),
            (json!({"health": null}), Err("missing field `health`")),
            (
                json!({"health": {"missing_timeout_secs": 0}}),
                Err("missing_timeout_secs: 0"),
            ),
            (json!({"sensors": {"queue": 5}}), Err("invalid type")),
        ];
        for (v, want) in cases {
            match (
                want,
                answer(v.clone()).and_then(|d| settings_from_description("d", &d)),
            ) {
                (Ok((m, q)), Ok(s)) => {
                    assert_eq!(s.name, "d");
                    assert_eq!(s.health.missing_timeout_secs.get(), m, "{v}");
                    assert_eq!(s.queue.as_deref(), q, "{v}");
                }
                (Err(w), Err(e)) => assert!(e.contains(w), "{v}: {e}"),
                (w, g) => panic!("{v}: wanted {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn retries_double_to_a_bound() {
        let secs: Vec<u64> = (0..8).map(|f| retry_after(f).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_after(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn asks_new_domains_once_then_on_schedule() {
        let l = Learner::default();
        let t0 = Instant::now();
        let none = set(&[]);
        let plan = l.plan(&set(&["a", "b", "conf"]), &set(&["conf"]), t0);
        assert_eq!(plan.ask, ["a", "b"], "configured domains are never asked");
        // a answers, b fails.
        assert!(l
            .record("a", Answer::Settings(settings("a", 1.0)), t0)
            .is_some_and(|c| c.is_some()));
        assert!(l
            .record("b", Answer::Failed("timeout".into()), t0)
            .is_none());
        let soon = t0 + Duration::from_millis(500);
        assert!(
            l.plan(&set(&["a", "b"]), &none, soon).ask.is_empty(),
            "not on every pass"
        );
        let later = t0 + RETRY_FIRST;
        assert_eq!(
            l.plan(&set(&["a", "b"]), &none, later).ask,
            ["b"],
            "b is retried"
        );
        assert!(l
            .record("b", Answer::NotFound("no".into()), later)
            .is_none());
        assert!(
            l.plan(&set(&["a", "b"]), &none, later + RETRY_FIRST)
                .ask
                .is_empty(),
            "the second retry waits twice as long"
        );
        assert_eq!(
            l.plan(&set(&["a", "b"]), &none, later + RETRY_FIRST * 2)
                .ask,
            ["b"]
        );
        assert_eq!(
            l.plan(&set(&["a"]), &none, t0 + REFRESH_EVERY).ask,
            ["a"],
            "a learned domain is refreshed"
        );
        // The same answer again changes nothing; another one is applied.
        assert!(l
            .record(
                "a",
                Answer::Settings(settings("a", 1.0)),
                t0 + REFRESH_EVERY
            )
            .is_none());
        let changed = l.record(
            "a",
            Answer::Settings(settings("a", 2.0)),
            t0 + REFRESH_EVERY,
        );
        assert!(
            changed.is_some_and(|c| c.is_some_and(|s| s.health.missing_timeout_secs.get() == 2.0))
        );
        // A failed refresh keeps what was learned; "no such domain" drops it.
        assert!(l
            .record(
                "a",
                Answer::Failed("timeout".into()),
                t0 + REFRESH_EVERY * 3
            )
            .is_none());
        assert!(l.learned("a").is_some());
        let dropped = l.record(
            "a",
            Answer::NotFound("removed".into()),
            t0 + REFRESH_EVERY * 4,
        );
        assert!(matches!(dropped, Some(None)), "{dropped:?}");
        assert!(l.learned("a").is_none());
    }

    #[test]
    fn domains_without_nodes_or_configured_meanwhile_are_dropped() {
        let l = Learner::default();
        let t0 = Instant::now();
        l.record("gone", Answer::Settings(settings("gone", 1.0)), t0);
        l.record("conf", Answer::Settings(settings("conf", 1.0)), t0);
        l.record("failed", Answer::Failed("x".into()), t0);
        let plan = l.plan(&set(&["conf"]), &set(&["conf"]), t0);
        assert_eq!(
            plan,
            Plan {
                ask: vec![],
                forget: vec!["gone".to_string()],
            },
            "only learned settings of unconfigured domains need undoing"
        );
        assert!(l.learned("gone").is_none() && l.learned("conf").is_none());
        assert_eq!(
            l.plan(&set(&["gone"]), &set(&[]), t0).ask,
            ["gone"],
            "back with nodes: asked again at once"
        );
    }
}
