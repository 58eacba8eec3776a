//! Shared state per key, created on first use: the one pattern behind the
//! per-destination circuit counters, retry and backup budgets, latency
//! histograms, round-robin cursors and metric series.
//!
//! [`shared`] finds the entry under a read lock (uncontended on the request
//! path: a hash and an `Arc` clone) and takes the write lock only the first
//! time a key appears. A poisoned map hands out a fresh, unshared value:
//! what is lost is precision (a count, a cursor), never the request.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, RwLock};

/// The entry of `key` in `map`, inserted as `V::default()` if missing.
pub fn shared<K, Q, V>(map: &RwLock<HashMap<K, Arc<V>>>, key: &Q) -> Arc<V>
where
    K: Borrow<Q> + Eq + Hash,
    Q: ?Sized + Eq + Hash + ToOwned<Owned = K>,
    V: Default,
{
    if let Ok(m) = map.read() {
        if let Some(v) = m.get(key) {
            return Arc::clone(v);
        }
    }
    match map.write() {
        Ok(mut m) => Arc::clone(m.entry(key.to_owned()).or_default()),
        Err(_) => Arc::new(V::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn one_entry_per_key() {
        let m: RwLock<HashMap<String, Arc<AtomicU32>>> = RwLock::default();
        shared(&m, "a").fetch_add(1, Ordering::Relaxed);
        shared(&m, "a").fetch_add(1, Ordering::Relaxed);
        shared(&m, "b").fetch_add(5, Ordering::Relaxed);
        assert_eq!(shared(&m, "a").load(Ordering::Relaxed), 2);
        assert_eq!(shared(&m, "b").load(Ordering::Relaxed), 5);
        assert_eq!(m.read().unwrap().len(), 2);
    }
}
