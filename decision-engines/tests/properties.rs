//! Property tests: invariants of the built-in engines over random states and histories.

mod common;

use common::*;
use decision_engines::{
    Backoff, DecisionEngine, EngineConfig, Health, Instance, LaunchFailures, NPreservingEngine,
    NodeState, QueueLenConfig, QueueLenEngine, Reading, State,
};
use proptest::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;

fn arb_instance(id: usize) -> impl Strategy<Value = Instance> {
    (
        prop::sample::select(NodeState::ALL.to_vec()),
        prop::sample::select(Health::ALL.to_vec()),
        prop::option::of(0u32..4),
        0i64..1000,
        prop::option::of(prop::sample::select(vec!["a", "b", "c", "zz"])),
    )
        .prop_map(move |(state, health, busy, launched, key)| {
            let mut i = Instance::new(format!("i{id:02}"), state, t(launched))
                .with_health(health)
                .with_busy(busy);
            i.unique_key = key.map(str::to_owned);
            i
        })
}

fn arb_instances() -> impl Strategy<Value = Vec<Instance>> {
    (0usize..14).prop_flat_map(|n| (0..n).map(arb_instance).collect::<Vec<_>>())
}

/// A backlog reading: none, or (value, age in seconds).
fn arb_backlog() -> impl Strategy<Value = Option<(f64, i64)>> {
    prop::option::of((
        prop_oneof![Just(0.0), 0.0f64..3.0, (0u32..200).prop_map(f64::from)],
        0i64..200,
    ))
}

fn arb_failures() -> impl Strategy<Value = LaunchFailures> {
    (0u32..6, 1900i64..2000).prop_map(|(k, at)| LaunchFailures {
        consecutive: k,
        last_at: (k > 0).then(|| t(at)),
    })
}

fn arb_queuelen_conf() -> impl Strategy<Value = EngineConfig> {
    (
        0u64..20,
        0u64..20,
        0u32..5,
        0u32..8,
        0u64..100,
        0u64..100,
        1u32..4,
        1u32..4,
        prop::option::of(1u64..10),
        1u64..120,
        0u64..30,
    )
        .prop_map(
            |(high, low, min, extra, cu, cd, up, down, bpw, stale, bo)| {
                let mut c = conf(json!({
                    "queuelen_high_water": high,
                    "queuelen_low_water": low.min(high),
                    "min_instances": min,
                    "max_instances": (min + extra).max(1),
                    "cooldown_up": cu,
                    "cooldown_down": cd,
                    "scale_up_step": up,
                    "scale_down_step": down,
                    "sensor_stale_secs": stale,
                    "backoff_initial_secs": bo,
                }));
                if let Some(b) = bpw {
                    c.set("backlog_per_worker", b);
                }
                c
            },
        )
}

fn make_state(
    now: i64,
    instances: Vec<Instance>,
    backlog: Option<(f64, i64)>,
    failures: LaunchFailures,
) -> State {
    let mut s = state_at(now, instances);
    s.sensors.backlog = backlog.map(|(v, age)| Reading::new(v, t(now - age)));
    s.launch_failures = failures;
    s
}

/// Structural checks every engine decision must pass.
fn check_structure(s: &State, c: &decision_engines::Control) -> Result<(), TestCaseError> {
    for i in &s.instances {
        if i.needs_termination() {
            prop_assert!(
                c.destroys().contains(&i.id),
                "unhealthy {} not destroyed",
                i.id
            );
        }
    }
    for id in c.destroys() {
        let i = s.instances.iter().find(|i| &i.id == id);
        prop_assert!(i.is_some(), "destroys unknown id {id}");
        let i = i.unwrap();
        prop_assert!(
            i.needs_termination() || i.counts_as_capacity(),
            "destroys {} in {} / {} for no reason",
            i.id,
            i.state,
            i.health
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn queuelen_bounds_hold(
        c in arb_queuelen_conf(),
        history in prop::collection::vec((arb_instances(), arb_backlog()), 0..4),
        instances in arb_instances(),
        backlog in arb_backlog(),
        failures in arb_failures(),
    ) {
        let q = QueueLenConfig::from_config(&c).unwrap();
        let mut e = QueueLenEngine::new();
        e.initialize(&c).unwrap();
        // Warm the engine's memory up with an arbitrary history.
        for (k, (inst, b)) in history.into_iter().enumerate() {
            let s = make_state(1000 + 200 * k as i64, inst, b, LaunchFailures::default());
            decide(&mut e, &s);
        }
        let s = make_state(2000, instances, backlog, failures);
        let ctl = decide(&mut e, &s);
        check_structure(&s, &ctl)?;

        let before = s.capacity().count();
        let after = capacity_after(&s, &ctl);
        let blocked = q.backoff.blocked_until(&s.launch_failures, s.now).is_some();
        let max = q.max_instances as usize;
        let min = q.min_instances as usize;
        prop_assert!(after <= max, "after {after} > max {max}");
        let work = backlog.is_some_and(|(v, _)| v > 0.0);
        if blocked {
            prop_assert_eq!(ctl.launch_count(), 0);
            prop_assert!(after >= before.min(min.max(usize::from(work))),
                "backing off must not destroy below the floor: before {}, after {}", before, after);
        } else {
            prop_assert!(after >= min, "after {after} < min {min}");
            if work {
                prop_assert!(after >= 1, "zero workers while backlog {:?}", backlog);
            }
            prop_assert_eq!(Some(after as u32), e.target());
        }
        // Never both launch and destroy healthy instances in one decision.
        let healthy_destroyed = ctl.destroys().iter().any(|id| {
            s.instances.iter().any(|i| &i.id == id && i.counts_as_capacity())
        });
        prop_assert!(!(healthy_destroyed && ctl.launch_count() > 0));
    }

    #[test]
    fn queuelen_is_deterministic(
        c in arb_queuelen_conf(),
        history in prop::collection::vec((arb_instances(), arb_backlog(), arb_failures()), 1..6),
    ) {
        let run = || {
            let mut e = QueueLenEngine::new();
            e.initialize(&c).unwrap();
            history
                .iter()
                .enumerate()
                .map(|(k, (inst, b, f))| {
                    let s = make_state(1000 + 150 * k as i64, inst.clone(), *b, *f);
                    (decide(&mut e, &s), e.report())
                })
                .collect::<Vec<_>>()
        };
        prop_assert_eq!(run(), run());
    }

    #[test]
    fn npreserving_reaches_preserve_n(
        n in 0u32..8,
        instances in arb_instances(),
        failures in arb_failures(),
    ) {
        let c = conf(json!({"preserve_n": n}));
        let mut e = NPreservingEngine::new();
        e.initialize(&c).unwrap();
        let s = make_state(2000, instances, None, failures);
        let ctl = decide(&mut e, &s);
        check_structure(&s, &ctl)?;
        let before = s.capacity().count();
        let after = capacity_after(&s, &ctl);
        let blocked = Backoff::default().blocked_until(&s.launch_failures, s.now).is_some();
        if blocked {
            prop_assert_eq!(ctl.launch_count(), 0);
            prop_assert_eq!(after, before.min(n as usize));
        } else {
            prop_assert_eq!(after, n as usize);
        }
    }

    #[test]
    fn npreserving_unique_each_key_once(
        instances in arb_instances(),
        failures in arb_failures(),
    ) {
        let c = conf(json!({"unique_instances": {"a": {"v": "1"}, "b": null, "c": {}}}));
        let mut e = NPreservingEngine::new();
        e.initialize(&c).unwrap();
        let s = make_state(2000, instances, None, failures);
        let ctl = decide(&mut e, &s);
        check_structure(&s, &ctl)?;
        let mut seq = 0;
        let next = apply(&s, &ctl, &mut seq);
        let mut per_key: BTreeMap<Option<String>, usize> = BTreeMap::new();
        for i in next.capacity() {
            *per_key.entry(i.unique_key.clone()).or_default() += 1;
        }
        let blocked = Backoff::default().blocked_until(&s.launch_failures, s.now).is_some();
        for (k, count) in &per_key {
            match k.as_deref() {
                Some("a" | "b" | "c") => prop_assert_eq!(*count, 1, "key {:?}", k),
                _ => prop_assert!(false, "instance with key {:?} kept", k),
            }
        }
        if !blocked {
            prop_assert_eq!(per_key.len(), 3);
        }
        // A second decision on the applied state changes nothing (converged), unless
        // launches were held back; terminated zombies are terminated again each time.
        if !blocked {
            let again = decide(&mut e, &next);
            prop_assert_eq!(again.launch_count(), 0);
            for id in again.destroys() {
                let i = next.instances.iter().find(|i| &i.id == id).unwrap();
                prop_assert!(i.health == Health::Zombie && i.state.is_terminal(), "{:?}", again);
            }
        }
    }

    #[test]
    fn queuelen_simulated_history_stays_in_bounds(
        c in arb_queuelen_conf(),
        steps in prop::collection::vec(
            (1i64..40, prop::option::of((0u32..120).prop_map(f64::from)), any::<bool>(), prop::option::of(0usize..10)),
            1..40,
        ),
    ) {
        let q = QueueLenConfig::from_config(&c).unwrap();
        let mut e = QueueLenEngine::new();
        e.initialize(&c).unwrap();
        let mut s = state_at(0, vec![]);
        let mut seq = 0;
        let mut now = 0;
        for (dt, backlog, boot, sicken) in steps {
            now += dt;
            s.now = t(now);
            s.sensors.backlog = backlog.map(|b| Reading::new(b, t(now)));
            // Something goes wrong with one worker now and then.
            if let Some(k) = sicken {
                if let Some(i) = s.instances.get_mut(k) {
                    i.health = Health::Missing;
                }
            }
            let ctl = decide(&mut e, &s);
            check_structure(&s, &ctl)?;
            let after = capacity_after(&s, &ctl);
            prop_assert!(after <= q.max_instances as usize);
            prop_assert!(after >= q.min_instances as usize);
            if backlog.is_some_and(|b| b > 0.0) {
                prop_assert!(after >= 1);
            }
            s = apply(&s, &ctl, &mut seq);
            s.instances.retain(|i| i.state != NodeState::Terminating);
            if boot {
                boot_all(&mut s);
            }
        }
    }

    #[test]
    fn backoff_schedule(initial in 0u64..100, extra in 0u64..1000, k in 0u32..80) {
        let b = Backoff { initial_secs: initial, max_secs: initial + extra };
        let d = b.delay_secs(k);
        prop_assert!(d <= b.max_secs);
        if k == 0 || initial == 0 {
            prop_assert_eq!(d, 0);
        } else {
            prop_assert!(d >= initial);
            prop_assert!(b.delay_secs(k + 1) >= d, "monotone");
            if k < 40 {
                prop_assert_eq!(d, (initial << (k - 1)).min(b.max_secs));
            }
        }
    }
}
