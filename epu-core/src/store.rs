//! The intent log: a small durable key-value store, one per service.
//!
//! **The store is the intent log; the IaaS is the source of truth for what exists.** A
//! service writes what it is about to do (a launch with its idempotency token, a
//! termination it has asked for, a domain's config) *before* doing it, and writes each
//! state transition as it learns of it. After a crash it reads the log back and reconciles
//! it against the IaaS: what the log says was intended is re-driven, what the IaaS shows
//! that the log does not know is a zombie. The store never decides on its own what exists.
//!
//! The model is deliberately small: named *trees* (like tables) of UTF-8 string keys to
//! byte values, scanned in byte order of the key. Every write is durable when it returns —
//! flushed to disk — because every write records a state transition that must survive a
//! crash. [`Store::put_batch`] writes several keys atomically: after a crash either all of
//! them are there or none.
//!
//! Two implementations: [`SledStore`] on disk (sled 0.34), and [`MemStore`] in memory for
//! fast tests and the simulator. Typed JSON access is in [`StoreExt`].
//!
//! Only this module knows sled.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Boxed cause of a backend failure, so the backend's types stay out of the API.
type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the store open.
    #[error("store at {} is locked by another process: is the service already running?", path.display())]
    Locked {
        /// The store's directory.
        path: PathBuf,
    },
    /// The store could not be opened for another reason.
    #[error("cannot open store at {}: {source}; check that the directory is writable and holds a store of this version", path.display())]
    Open {
        /// The store's directory.
        path: PathBuf,
        /// What the backend said.
        #[source]
        source: Cause,
    },
    /// A read or write failed in the backend.
    #[error("store {op} on tree {tree:?} failed: {source}; check the disk (space, permissions) and restart the service")]
    Backend {
        /// The operation: "get", "put", "put_batch", "delete", "scan", "flush", "open_tree".
        op: &'static str,
        /// The tree it ran on (empty for whole-store operations).
        tree: String,
        /// What the backend said.
        #[source]
        source: Cause,
    },
    /// A key read back from a tree is not UTF-8.
    #[error("store tree {tree:?} holds a key that is not UTF-8 (hex {key_hex}); the store was written by another program or is corrupt")]
    BadKey {
        /// The tree.
        tree: String,
        /// The key's bytes in hex.
        key_hex: String,
    },
    /// A value could not be encoded as JSON.
    #[error("cannot encode the value for tree {tree:?} key {key:?} as JSON: {source}")]
    Encode {
        /// The tree.
        tree: String,
        /// The key.
        key: String,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
    /// A stored value is not valid JSON for the requested type.
    #[error("store tree {tree:?} key {key:?} does not hold a valid {type_name}: {source}; the record is corrupt or was written by an incompatible version")]
    Decode {
        /// The tree.
        tree: String,
        /// The key.
        key: String,
        /// The Rust type that was asked for.
        type_name: &'static str,
        /// What serde_json said.
        #[source]
        source: serde_json::Error,
    },
}

/// A durable, ordered key-value store with named trees. Object safe: services hold a
/// [`SharedStore`].
///
/// Every write (`put`, `put_batch`, `delete`) is flushed to durable storage before it
/// returns `Ok`. Scans return entries in byte order of their keys.
pub trait Store: Send + Sync + Debug {
    /// The value at `key` in `tree`, if any. A tree that was never written is empty.
    fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Writes `value` at `key` in `tree`, replacing any old value; durable on return.
    fn put(&self, tree: &str, key: &str, value: &[u8]) -> Result<(), StoreError>;

    /// Writes all `items` into `tree` atomically (after a crash, all or none are there);
    /// durable on return. A later item with the same key as an earlier one wins.
    fn put_batch(&self, tree: &str, items: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        self.write_batch(tree, items, &[])
    }

    /// Removes `deletes` from `tree` and writes `puts` in one atomic batch (after a
    /// crash, all or none of it is there); durable on return. The puts are applied
    /// after the deletes.
    fn write_batch(
        &self,
        tree: &str,
        puts: &[(String, Vec<u8>)],
        deletes: &[String],
    ) -> Result<(), StoreError>;

    /// Removes `key` from `tree` (no error if it was absent); durable on return.
    fn delete(&self, tree: &str, key: &str) -> Result<(), StoreError>;

    /// Every entry of `tree`, in key order.
    fn scan(&self, tree: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// The entries of `tree` whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, tree: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Makes every write so far durable. Writes already flush; this is for shutdown paths
    /// that want to be explicit.
    fn flush(&self) -> Result<(), StoreError>;

    /// Whether a call may wait on a disk (or anything slower than memory). Stores
    /// that answer from memory say `false`, and [`OffRuntime`] calls them directly.
    fn may_block(&self) -> bool {
        true
    }
}

/// The store handle that services share between tasks.
pub type SharedStore = Arc<dyn Store>;

/// Typed access to a [`Store`] through JSON. Implemented for every store, including
/// `dyn Store`.
pub trait StoreExt: Store {
    /// The value at `key` decoded from JSON, if any.
    fn get_json<T: DeserializeOwned>(
        &self,
        tree: &str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.get(tree, key)? {
            None => Ok(None),
            Some(bytes) => decode(tree, key, &bytes).map(Some),
        }
    }

    /// Writes `value` as JSON at `key`; durable on return.
    fn put_json<T: Serialize + ?Sized>(
        &self,
        tree: &str,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Encode {
            tree: tree.to_owned(),
            key: key.to_owned(),
            source,
        })?;
        self.put(tree, key, &bytes)
    }

    /// Every entry of `tree` decoded from JSON, in key order. Fails on the first entry
    /// that does not decode, naming its key.
    fn scan_json<T: DeserializeOwned>(&self, tree: &str) -> Result<Vec<(String, T)>, StoreError> {
        let mut out = Vec::new();
        for (key, bytes) in self.scan(tree)? {
            let value = decode(tree, &key, &bytes)?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// The entries of `tree` under `prefix` decoded from JSON, in key order.
    fn scan_prefix_json<T: DeserializeOwned>(
        &self,
        tree: &str,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let mut out = Vec::new();
        for (key, bytes) in self.scan_prefix(tree, prefix)? {
            let value = decode(tree, &key, &bytes)?;
            out.push((key, value));
        }
        Ok(out)
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

fn decode<T: DeserializeOwned>(tree: &str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        tree: tree.to_owned(),
        key: key.to_owned(),
        type_name: std::any::type_name::<T>(),
        source,
    })
}

// ---------------------------------------------------------------------------------------
// sled

/// The on-disk store, over sled. One process at a time may hold a directory open.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    path: PathBuf,
    trees: Mutex<HashMap<String, sled::Tree>>,
}

/// sled reports a held lock as an `Io` error with this text (sled 0.34.7, `config.rs`).
const SLED_LOCK_MESSAGE: &str = "could not acquire lock";

/// sled's page cache by default: 64 MiB (sled's own default is 1 GiB, which a
/// service with 100,000 node records then mostly fills).
pub const DEFAULT_CACHE_BYTES: u64 = 64 * 1024 * 1024;

impl SledStore {
    /// Opens (creating if needed) the store in directory `path`, with a page cache
    /// of [`DEFAULT_CACHE_BYTES`].
    ///
    /// Fails with [`StoreError::Locked`] if another process, or another handle in this
    /// process, holds it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// The same with a page cache of `cache_bytes`.
    pub fn open_with_cache(path: impl AsRef<Path>, cache_bytes: u64) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(|e| open_error(&path, e))?;
        Ok(SledStore {
            db,
            path,
            trees: Mutex::new(HashMap::new()),
        })
    }

    /// The store's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn trees(&self) -> MutexGuard<'_, HashMap<String, sled::Tree>> {
        // The map only caches handles; a panic elsewhere cannot leave it inconsistent.
        self.trees
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        let mut trees = self.trees();
        if let Some(tree) = trees.get(name) {
            return Ok(tree.clone());
        }
        let tree = self
            .db
            .open_tree(name.as_bytes())
            .map_err(|e| backend("open_tree", name, e))?;
        trees.insert(name.to_owned(), tree.clone());
        Ok(tree)
    }

    fn flush_db(&self, op: &'static str, tree: &str) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| backend(op, tree, e))?;
        Ok(())
    }

    fn collect(
        tree_name: &str,
        iter: sled::Iter,
        op: &'static str,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for entry in iter {
            let (key, value) = entry.map_err(|e| backend(op, tree_name, e))?;
            let key = String::from_utf8(key.to_vec()).map_err(|e| StoreError::BadKey {
                tree: tree_name.to_owned(),
                key_hex: hex::encode(e.as_bytes()),
            })?;
            out.push((key, value.to_vec()));
        }
        Ok(out)
    }
}

fn open_error(path: &Path, err: sled::Error) -> StoreError {
    if let sled::Error::Io(io) = &err {
        if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains(SLED_LOCK_MESSAGE)
        {
            return StoreError::Locked {
                path: path.to_path_buf(),
            };
        }
    }
    StoreError::Open {
        path: path.to_path_buf(),
        source: Box::new(err),
    }
}

fn backend(op: &'static str, tree: &str, err: sled::Error) -> StoreError {
    StoreError::Backend {
        op,
        tree: tree.to_owned(),
        source: Box::new(err),
    }
}

impl Store for SledStore {
    fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let t = self.tree(tree)?;
        let value = t.get(key.as_bytes()).map_err(|e| backend("get", tree, e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn put(&self, tree: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let t = self.tree(tree)?;
        t.insert(key.as_bytes(), value)
            .map_err(|e| backend("put", tree, e))?;
        self.flush_db("put", tree)
    }

    fn write_batch(
        &self,
        tree: &str,
        puts: &[(String, Vec<u8>)],
        deletes: &[String],
    ) -> Result<(), StoreError> {
        let t = self.tree(tree)?;
        let mut batch = sled::Batch::default();
        for key in deletes {
            batch.remove(key.as_bytes());
        }
        for (key, value) in puts {
            batch.insert(key.as_bytes(), value.as_slice());
        }
        t.apply_batch(batch)
            .map_err(|e| backend("write_batch", tree, e))?;
        self.flush_db("write_batch", tree)
    }

    fn delete(&self, tree: &str, key: &str) -> Result<(), StoreError> {
        let t = self.tree(tree)?;
        t.remove(key.as_bytes())
            .map_err(|e| backend("delete", tree, e))?;
        self.flush_db("delete", tree)
    }

    fn scan(&self, tree: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let t = self.tree(tree)?;
        Self::collect(tree, t.iter(), "scan")
    }

    fn scan_prefix(&self, tree: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let t = self.tree(tree)?;
        Self::collect(tree, t.scan_prefix(prefix.as_bytes()), "scan_prefix")
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.flush_db("flush", "")
    }
}

// ---------------------------------------------------------------------------------------
// memory

type Trees = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

/// An in-memory store for tests and the simulator. Clones share the same data, so a test
/// can "restart" a service by handing the clone to a new instance.
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    trees: Arc<Mutex<Trees>>,
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        MemStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Trees> {
        // Every operation leaves the maps consistent before it can panic.
        self.trees
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Store for MemStore {
    fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let trees = self.lock();
        Ok(trees.get(tree).and_then(|t| t.get(key)).cloned())
    }

    fn put(&self, tree: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut trees = self.lock();
        trees
            .entry(tree.to_owned())
            .or_default()
            .insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn write_batch(
        &self,
        tree: &str,
        puts: &[(String, Vec<u8>)],
        deletes: &[String],
    ) -> Result<(), StoreError> {
        let mut trees = self.lock();
        let t = trees.entry(tree.to_owned()).or_default();
        for key in deletes {
            t.remove(key);
        }
        for (key, value) in puts {
            t.insert(key.clone(), value.clone());
        }
        Ok(())
    }

    fn delete(&self, tree: &str, key: &str) -> Result<(), StoreError> {
        let mut trees = self.lock();
        if let Some(t) = trees.get_mut(tree) {
            t.remove(key);
        }
        Ok(())
    }

    fn scan(&self, tree: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let trees = self.lock();
        let mut out = Vec::new();
        if let Some(t) = trees.get(tree) {
            for (key, value) in t {
                out.push((key.clone(), value.clone()));
            }
        }
        Ok(out)
    }

    fn scan_prefix(&self, tree: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let trees = self.lock();
        let mut out = Vec::new();
        if let Some(t) = trees.get(tree) {
            for (key, value) in t.range(prefix.to_owned()..) {
                if !key.starts_with(prefix) {
                    break;
                }
                out.push((key.clone(), value.clone()));
            }
        }
        Ok(out)
    }

    fn may_block(&self) -> bool {
        false
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A store whose calls, made from an async task, leave the runtime's worker
/// free: on a multi-threaded tokio runtime each call runs under
/// `tokio::task::block_in_place` (the worker's other tasks move to another
/// thread while the flushed write waits for the disk); elsewhere it is a plain
/// call. Services whose logic calls the store synchronously from async code
/// (the controller's domains) hold their store through this, *because* a slow
/// disk must not stall every other task of the process.
#[derive(Debug)]
pub struct OffRuntime(pub SharedStore);

impl OffRuntime {
    /// `store`, wrapped.
    pub fn shared(store: SharedStore) -> SharedStore {
        Arc::new(OffRuntime(store))
    }

    fn run<T>(&self, f: impl FnOnce(&dyn Store) -> T) -> T {
        // Handing the worker over costs a thread wake-up per call: only worth it for
        // a store that can wait.
        let on_workers = self.0.may_block()
            && tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if on_workers {
            tokio::task::block_in_place(|| f(self.0.as_ref()))
        } else {
            f(self.0.as_ref())
        }
    }
}

impl Store for OffRuntime {
    fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.run(|s| s.get(tree, key))
    }
    fn put(&self, tree: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.run(|s| s.put(tree, key, value))
    }
    fn write_batch(
        &self,
        tree: &str,
        puts: &[(String, Vec<u8>)],
        deletes: &[String],
    ) -> Result<(), StoreError> {
        self.run(|s| s.write_batch(tree, puts, deletes))
    }
    fn delete(&self, tree: &str, key: &str) -> Result<(), StoreError> {
        self.run(|s| s.delete(tree, key))
    }
    fn scan(&self, tree: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.run(|s| s.scan(tree))
    }
    fn scan_prefix(&self, tree: &str, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.run(|s| s.scan_prefix(tree, prefix))
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.run(|s| s.flush())
    }
    fn may_block(&self) -> bool {
        self.0.may_block()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Node {
        id: String,
        state: u32,
    }

    /// The same behaviour, checked on every implementation.
    fn exercise(store: &dyn Store) {
        assert_eq!(store.get("nodes", "a").unwrap(), None);
        assert!(store.scan("nodes").unwrap().is_empty());

        store.put("nodes", "b", b"2").unwrap();
        store.put("nodes", "a", b"1").unwrap();
        store.put("other", "a", b"x").unwrap();
        assert_eq!(store.get("nodes", "a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(store.get("other", "a").unwrap(), Some(b"x".to_vec()));

        store.put("nodes", "a", b"1bis").unwrap();
        assert_eq!(store.get("nodes", "a").unwrap(), Some(b"1bis".to_vec()));

        store
            .put_batch(
                "nodes",
                &[
                    ("run1/n2".to_owned(), b"r2".to_vec()),
                    ("run1/n1".to_owned(), b"r1".to_vec()),
                    ("run2/n1".to_owned(), b"s1".to_vec()),
                ],
            )
            .unwrap();
        let keys: Vec<String> = store
            .scan("nodes")
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["a", "b", "run1/n1", "run1/n2", "run2/n1"]);

        let run1 = store.scan_prefix("nodes", "run1/").unwrap();
        assert_eq!(
            run1,
            vec![
                ("run1/n1".to_owned(), b"r1".to_vec()),
                ("run1/n2".to_owned(), b"r2".to_vec())
            ]
        );
        assert!(store.scan_prefix("nodes", "zzz").unwrap().is_empty());
        assert_eq!(store.scan_prefix("nodes", "").unwrap().len(), 5);

        store.delete("nodes", "a").unwrap();
        store.delete("nodes", "never-there").unwrap();
        store.delete("no-such-tree", "x").unwrap();
        assert_eq!(store.get("nodes", "a").unwrap(), None);
        assert_eq!(store.scan("nodes").unwrap().len(), 4);

        // One batch deletes and writes; a key both deleted and written is written.
        store
            .write_batch(
                "nodes",
                &[
                    ("run2/n1".to_owned(), b"s1bis".to_vec()),
                    ("run3/n1".to_owned(), b"t1".to_vec()),
                ],
                &[
                    "run1/n1".to_owned(),
                    "run2/n1".to_owned(),
                    "never".to_owned(),
                ],
            )
            .unwrap();
        let after: Vec<(String, Vec<u8>)> = store.scan("nodes").unwrap();
        assert_eq!(
            after,
            vec![
                ("b".to_owned(), b"2".to_vec()),
                ("run1/n2".to_owned(), b"r2".to_vec()),
                ("run2/n1".to_owned(), b"s1bis".to_vec()),
                ("run3/n1".to_owned(), b"t1".to_vec()),
            ]
        );
        store
            .write_batch("nodes", &[], &["run3/n1".to_owned()])
            .unwrap();
        assert_eq!(store.scan("nodes").unwrap().len(), 3);

        let node = Node {
            id: "n-1".into(),
            state: 600,
        };
        store.put_json("typed", "n-1", &node).unwrap();
        assert_eq!(store.get_json::<Node>("typed", "n-1").unwrap(), Some(node));
        assert_eq!(store.get_json::<Node>("typed", "n-2").unwrap(), None);
        assert_eq!(store.scan_json::<Node>("typed").unwrap().len(), 1);
        assert_eq!(
            store.scan_prefix_json::<Node>("typed", "n-").unwrap().len(),
            1
        );

        store.put("typed", "broken", b"{not json").unwrap();
        let err = store.get_json::<Node>("typed", "broken").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("\"typed\"") && msg.contains("\"broken\""),
            "{msg}"
        );
        assert!(store.scan_json::<Node>("typed").is_err());

        store.flush().unwrap();
    }

    #[test]
    fn mem_store_behaves() {
        exercise(&MemStore::new());
    }

    #[test]
    fn sled_store_behaves() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path().join("db")).unwrap();
        exercise(&store);
    }

    #[test]
    fn shared_store_gets_typed_helpers() {
        let store: SharedStore = Arc::new(MemStore::new());
        store.put_json("t", "k", &vec![1, 2, 3]).unwrap();
        assert_eq!(
            store.get_json::<Vec<i32>>("t", "k").unwrap(),
            Some(vec![1, 2, 3])
        );
    }

    #[test]
    fn mem_store_clones_share_data() {
        let a = MemStore::new();
        let b = a.clone();
        a.put("t", "k", b"v").unwrap();
        assert_eq!(b.get("t", "k").unwrap(), Some(b"v".to_vec()));
    }

    #[test]
    fn sled_store_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = SledStore::open(&path).unwrap();
            store.put("nodes", "n1", b"running").unwrap();
            store
                .put_batch("nodes", &[("n2".to_owned(), b"pending".to_vec())])
                .unwrap();
            store.put("nodes", "gone", b"x").unwrap();
            store.delete("nodes", "gone").unwrap();
        }
        let store = SledStore::open(&path).unwrap();
        assert_eq!(store.get("nodes", "n1").unwrap(), Some(b"running".to_vec()));
        assert_eq!(store.get("nodes", "n2").unwrap(), Some(b"pending".to_vec()));
        assert_eq!(store.get("nodes", "gone").unwrap(), None);
        assert_eq!(store.path(), path.as_path());
    }

    #[test]
    fn second_open_of_a_held_store_is_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _held = SledStore::open(&path).unwrap();
        let err = SledStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("locked by another process"), "{msg}");
    }

    #[test]
    fn open_on_a_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-dir");
        std::fs::write(&path, b"plain file").unwrap();
        let err = SledStore::open(&path).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cannot open store at"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }
}

#[cfg(test)]
mod off_runtime_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A store whose writes take 100 ms, as a slow disk's flush would.
    #[derive(Debug, Default)]
    struct SlowDisk(MemStore);

    impl Store for SlowDisk {
        fn get(&self, tree: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
            self.0.get(tree, key)
        }
        fn put(&self, tree: &str, key: &str, value: &[u8]) -> Result<(), StoreError> {
            std::thread::sleep(Duration::from_millis(100));
            self.0.put(tree, key, value)
        }
        fn write_batch(
            &self,
            tree: &str,
            puts: &[(String, Vec<u8>)],
            deletes: &[String],
        ) -> Result<(), StoreError> {
            self.0.write_batch(tree, puts, deletes)
        }
        fn delete(&self, tree: &str, key: &str) -> Result<(), StoreError> {
            self.0.delete(tree, key)
        }
        fn scan(&self, tree: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.0.scan(tree)
        }
        fn scan_prefix(
            &self,
            tree: &str,
            prefix: &str,
        ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
            self.0.scan_prefix(tree, prefix)
        }
        fn flush(&self) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// Ticks of a 5 ms ticker while another task makes five slow writes, on a
    /// runtime with a single worker.
    async fn ticks_during_slow_writes(store: SharedStore) -> usize {
        let ticks = Arc::new(AtomicUsize::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                t.fetch_add(1, Ordering::SeqCst);
            }
        });
        // Let the ticker start.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let before = ticks.load(Ordering::SeqCst);
        let writer = tokio::spawn(async move {
            for i in 0..5 {
                store.put("t", &format!("k{i}"), b"v").expect("put");
            }
        });
        writer.await.expect("writer");
        let during = ticks.load(Ordering::SeqCst) - before;
        ticker.abort();
        during
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_slow_write_does_not_stall_the_other_tasks() {
        let direct = ticks_during_slow_writes(Arc::new(SlowDisk::default())).await;
        let off = ticks_during_slow_writes(OffRuntime::shared(Arc::new(SlowDisk::default()))).await;
        // 500 ms of writes: the ticker runs on beside them only when the writes
        // leave the worker (about 100 ticks); on the worker itself it barely does.
        assert!(
            direct <= 10,
            "the direct writes should block the only worker: {direct} ticks"
        );
        assert!(
            off >= 30,
            "off the runtime, the ticker goes on: {off} ticks"
        );
    }

    #[test]
    fn outside_a_runtime_it_is_a_plain_call() {
        let s = OffRuntime::shared(Arc::new(MemStore::new()));
        s.put("t", "k", b"v").expect("put");
        assert_eq!(s.get("t", "k").expect("get"), Some(b"v".to_vec()));
    }

    #[test]
    fn only_stores_that_can_wait_are_moved_off_the_workers() {
        assert!(!OffRuntime::shared(Arc::new(MemStore::new())).may_block());
        assert!(OffRuntime::shared(Arc::new(SlowDisk::default())).may_block());
        let dir = tempfile::tempdir().expect("tempdir");
        let sled = SledStore::open(&dir.path().join("s")).expect("open");
        assert!(OffRuntime::shared(Arc::new(sled)).may_block());
    }
}
