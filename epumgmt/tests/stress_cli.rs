//! Many CLI calls against an AMQP run that is busy scaling up and down: every call
//! ends by itself (exit 0), none is killed by the outside deadline. CI makes
//! `EPU_STRESS_CALLS` calls (default 200); `scripts/stress-cli.sh` makes 1,000 and
//! prints the figures.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_for, Cli};

/// The outside limit of one call; the CLI's own `--timeout` is below it.
const CALL_LIMIT: Duration = Duration::from_secs(30);

#[test]
fn cli_calls_against_a_scaling_amqp_run_never_hang() {
    let calls: usize = std::env::var("EPU_STRESS_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let cli = Arc::new(Cli::new("stress"));
    cli.launch("examples/sleeper/plan-amqp.toml");
    wait_for("3 RUNNING", 30, &cli, || cli.running().len() == 3);

    // Scale between 1 and 6 while the calls run, so that nodes start and stop.
    let stop = Arc::new(AtomicBool::new(false));
    let toggler = {
        let (cli, stop) = (cli.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut flips = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let n = if flips % 2 == 0 { "6" } else { "1" };
                let args = [
                    "reconfigure",
                    "--run",
                    &cli.run,
                    "--domain",
                    "sleeper",
                    &format!("preserve_n={n}"),
                    "--timeout",
                    "20",
                ];
                // Failures are counted by the main loop's calls; this only drives.
                let _ = cli.try_out_within(&args, CALL_LIMIT);
                flips += 1;
                for _ in 0..20 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            flips
        })
    };

    let kinds: [&[&str]; 4] = [
        &["status", "--json"],
        &["inspect", "nodes", "--json"],
        &["inspect", "domains", "--json"],
        &["events", "--json"],
    ];
    let mut hung: Vec<String> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let mut secs: Vec<f64> = Vec::with_capacity(calls);
    let started = Instant::now();
    for i in 0..calls {
        let mut args: Vec<&str> = kinds[i % kinds.len()].to_vec();
        args.extend(["--run", &cli.run, "--timeout", "20"]);
        let t = Instant::now();
        match cli.try_out_within(&args, CALL_LIMIT) {
            Ok(o) if o.status.success() => {}
            Ok(o) => failed.push(format!(
                "call {i} {args:?}: {} {}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            )),
            Err(e) if e.is_timeout() => hung.push(format!("call {i} {args:?}: {e}")),
            Err(e) => failed.push(format!("call {i} {args:?}: {e}")),
        }
        secs.push(t.elapsed().as_secs_f64());
    }
    stop.store(true, Ordering::Relaxed);
    let flips = toggler.join().unwrap_or(0);

    secs.sort_by(f64::total_cmp);
    let pct = |p: f64| secs[((secs.len() as f64 - 1.0) * p).round() as usize];
    eprintln!(
        "stress: {calls} calls in {:.1} s while scaling 1<->6 ({flips} reconfigures): \
         {} hung, {} failed; per call p50 {:.3} s, p99 {:.3} s, max {:.3} s",
        started.elapsed().as_secs_f64(),
        hung.len(),
        failed.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    assert!(flips >= 2, "the run was scaled while the calls ran");
    assert!(hung.is_empty(), "calls that hung:\n{}", hung.join("\n"));
    assert!(
        failed.is_empty(),
        "calls that failed:\n{}",
        failed.join("\n")
    );

    let t = Instant::now();
    cli.ok(&["killrun", "--run", &cli.run]);
    eprintln!("stress: killrun {:.2} s", t.elapsed().as_secs_f64());
    assert!(common::live_workers(&cli.run).is_empty());
}
