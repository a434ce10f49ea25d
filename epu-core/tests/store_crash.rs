//! Every write the store acknowledged survives a SIGKILL of the writer.
//!
//! The parent test re-runs this test binary as a child that does nothing but write to a
//! `SledStore` and print `acked N` after each write returns. The parent kills it with
//! SIGKILL mid-stream, reopens the store, and checks that every acknowledged write is
//! there (and that a batch is all there or not at all).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use epu_core::store::{SledStore, Store, StoreError};

/// Set in the child: the store directory to write to. Not `EPU_*`: those are config.
const WRITER_DIR_VAR: &str = "EPUTEST_STORE_CRASH_WRITER";
/// Set in the child: `put` or `batch`.
const WRITER_MODE_VAR: &str = "EPUTEST_STORE_CRASH_MODE";
/// The name of the test that is the child's entry point.
const WRITER_TEST: &str = "crash_writer_child";

const TREE: &str = "crash";
const BATCH_SIZE: usize = 5;
/// Acknowledgements to see before the kill.
const ACKS_BEFORE_KILL: u64 = 200;
/// How long the parent waits for them.
const ACK_DEADLINE: Duration = Duration::from_secs(30);
/// The child stops by itself after this long, should the parent be gone.
const CHILD_LIFETIME: Duration = Duration::from_secs(120);

fn put_key(n: u64) -> String {
    format!("k{n:010}")
}

fn put_value(n: u64) -> Vec<u8> {
    format!("value {n}").into_bytes()
}

fn batch_items(n: u64) -> Vec<(String, Vec<u8>)> {
    let mut items = Vec::new();
    for i in 0..BATCH_SIZE {
        items.push((
            format!("b{n:010}/{i}"),
            format!("batch {n} item {i}").into_bytes(),
        ));
    }
    items
}

/// The child's entry point. Run normally (without the variable) it does nothing.
#[test]
fn crash_writer_child() {
    let Some(dir) = std::env::var_os(WRITER_DIR_VAR) else {
        return;
    };
    let batch = std::env::var(WRITER_MODE_VAR).as_deref() == Ok("batch");
    let store = SledStore::open(Path::new(&dir)).unwrap();
    let started = Instant::now();
    let stdout = std::io::stdout();
    let mut n: u64 = 0;
    while started.elapsed() < CHILD_LIFETIME {
        if batch {
            store.put_batch(TREE, &batch_items(n)).unwrap();
        } else {
            store.put(TREE, &put_key(n), &put_value(n)).unwrap();
        }
        let mut out = stdout.lock();
        writeln!(out, "acked {n}").unwrap();
        out.flush().unwrap();
        n += 1;
    }
}

/// The sequence number in an `acked N` line. The test harness may print
/// `test crash_writer_child ... ` on the same line before the first one.
fn parse_ack(line: &str) -> Option<u64> {
    let at = line.find("acked ")?;
    line[at + "acked ".len()..].trim().parse().ok()
}

/// Kills the child if the parent test fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a writer child in `mode` against `dir`, kills it after enough acks, and returns
/// every acknowledged sequence number.
fn run_and_kill_writer(dir: &Path, mode: &str) -> Vec<u64> {
    let exe = std::env::current_exe().unwrap();
    let stderr_path = dir.with_extension("child-stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let child = Command::new(exe)
        .args([WRITER_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(WRITER_DIR_VAR, dir)
        .env(WRITER_MODE_VAR, mode)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().unwrap();

    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let child_stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let mut acked = Vec::new();
    let mut checked_lock = false;
    let deadline = Instant::now() + ACK_DEADLINE;
    while (acked.len() as u64) < ACKS_BEFORE_KILL {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(remaining) {
            Ok(line) => {
                if let Some(n) = parse_ack(&line) {
                    acked.push(n);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                "the writer child produced {} acks in {ACK_DEADLINE:?}, expected {ACKS_BEFORE_KILL}; its stderr:\n{}",
                acked.len(),
                child_stderr()
            ),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                "the writer child exited after {} acks, before it was killed; its stderr:\n{}",
                acked.len(),
                child_stderr()
            ),
        }
        // While the child is alive and holds the store, a second opener is refused.
        if !checked_lock && !acked.is_empty() {
            checked_lock = true;
            match SledStore::open(dir) {
                Err(err @ StoreError::Locked { .. }) => {
                    let msg = err.to_string();
                    assert!(msg.contains(&dir.display().to_string()), "{msg}");
                }
                Err(other) => panic!("expected a lock error, got: {other}"),
                Ok(_) => panic!("opened a store that a live process holds"),
            }
        }
    }

    // SIGKILL on unix: no destructor, no flush, no goodbye.
    child.0.kill().unwrap();
    let status = child.0.wait().unwrap();
    assert!(
        !status.success(),
        "the child should have died of the kill: {status}"
    );

    // Acks printed before the kill are acks too.
    reader.join().unwrap();
    for line in rx.try_iter() {
        if let Some(n) = parse_ack(&line) {
            acked.push(n);
        }
    }
    for (i, n) in acked.iter().enumerate() {
        assert_eq!(*n, i as u64, "acks out of order");
    }
    acked
}

#[test]
fn acknowledged_puts_survive_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let acked = run_and_kill_writer(&dir, "put");
    assert!(acked.len() as u64 >= ACKS_BEFORE_KILL);

    let store = SledStore::open(&dir).unwrap();
    let mut missing = Vec::new();
    for &n in &acked {
        match store.get(TREE, &put_key(n)).unwrap() {
            Some(value) => assert_eq!(value, put_value(n), "key {n} has the wrong value"),
            None => missing.push(n),
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged puts were lost after SIGKILL, first: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(20)]
    );
    // Nothing beyond the one write in flight at the kill.
    let stored = store.scan(TREE).unwrap().len();
    assert!(
        stored == acked.len() || stored == acked.len() + 1,
        "{stored} keys for {} acks",
        acked.len()
    );
}

#[test]
fn acknowledged_batches_survive_sigkill_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    let acked = run_and_kill_writer(&dir, "batch");
    assert!(acked.len() as u64 >= ACKS_BEFORE_KILL);

    let store = SledStore::open(&dir).unwrap();
    let mut by_batch: BTreeMap<u64, Vec<(String, Vec<u8>)>> = BTreeMap::new();
    for (key, value) in store.scan(TREE).unwrap() {
        let n: u64 = key[1..11].parse().unwrap();
        by_batch.entry(n).or_default().push((key, value));
    }
    for &n in &acked {
        assert_eq!(
            by_batch.get(&n),
            Some(&batch_items(n)),
            "acknowledged batch {n} is not fully there after SIGKILL"
        );
    }
    // The batch in flight at the kill, if it landed at all, landed whole.
    for (n, items) in &by_batch {
        assert_eq!(items, &batch_items(*n), "batch {n} is torn");
    }
    assert!(by_batch.len() == acked.len() || by_batch.len() == acked.len() + 1);
}
