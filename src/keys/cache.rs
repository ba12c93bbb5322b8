//! The bounded plaintext key cache.
//!
//! Unwrapping a data key is a KMS round trip; opening the same file again within a few minutes
//! should not be. Entries are keyed by a SHA-256 of (key id, wrapped key, canonical context),
//! never by path alone, so a hit proves the same ciphertext was unwrapped under the same
//! context. The cache is bounded by an entry count and a time to live; plaintext keys live in
//! a locked, non-dumpable arena and are zeroized when evicted or expired. Concurrent misses
//! for one key share a single fetch (single flight), so a directory walk that opens one file
//! from many threads costs one KMS call. Failures are not cached.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use sha2::{Digest, Sha256};

use super::locked::LockedArena;
use super::{KeyError, KeyErrorKind, KmsOp};
use crate::format::context::EncryptionContext;
use crate::format::envelope::WrappedKey;
use crate::secret::DataKey;

pub const DEFAULT_ENTRIES: usize = 10_000;
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// 0 disables caching (single flight still applies).
    pub max_entries: usize,
    pub ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: DEFAULT_ENTRIES,
            ttl: DEFAULT_TTL,
        }
    }
}

/// A digest naming one (wrapped key, context) pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    pub fn new(wrapped: &WrappedKey, ctx: &EncryptionContext) -> Self {
        let mut h = Sha256::new();
        for part in [wrapped.key_id.as_bytes(), &wrapped.blob, &ctx.serialize()] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        CacheKey(h.finalize().into())
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Misses that waited for another thread's fetch instead of calling KMS.
    pub coalesced: u64,
    pub evictions: u64,
    pub expirations: u64,
    pub entries: u64,
    /// Key memory is locked (never swapped).
    pub locked: bool,
    /// Key memory is excluded from core dumps.
    pub excluded_from_dumps: bool,
}

struct Entry {
    slot: usize,
    expires: Instant,
}

type FlightResult = Option<Result<DataKey, KeyError>>;

#[derive(Default)]
struct Flight {
    result: Mutex<FlightResult>,
    done: Condvar,
}

impl Flight {
    fn finish(&self, result: &Result<DataKey, KeyError>) {
        *self.result.lock().unwrap() = Some(
            result
                .as_ref()
                .map(DataKey::duplicate)
                .map_err(Clone::clone),
        );
        self.done.notify_all();
    }

    fn wait(&self) -> Result<DataKey, KeyError> {
        let mut r = self.result.lock().unwrap();
        while r.is_none() {
            r = self.done.wait(r).unwrap();
        }
        r.as_ref()
            .unwrap()
            .as_ref()
            .map(DataKey::duplicate)
            .map_err(Clone::clone)
    }
}

struct Inner {
    lru: Option<LruCache<CacheKey, Entry>>,
    arena: LockedArena,
    inflight: HashMap<CacheKey, Arc<Flight>>,
    last_purge: Instant,
}

impl Inner {
    fn purge_expired(&mut self, now: Instant) -> u64 {
        let Some(lru) = self.lru.as_mut() else {
            return 0;
        };
        let expired: Vec<CacheKey> = lru
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(k, _)| *k)
            .collect();
        for k in &expired {
            if let Some(e) = lru.pop(k) {
                self.arena.release(e.slot);
            }
        }
        self.last_purge = now;
        expired.len() as u64
    }
}

pub struct KeyCache {
    inner: Mutex<Inner>,
    ttl: Duration,
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    evictions: AtomicU64,
    expirations: AtomicU64,
}

/// Completes a flight with an error if the fetch panics, so waiters never hang.
struct FlightGuard<'a> {
    cache: &'a KeyCache,
    key: CacheKey,
    flight: Arc<Flight>,
    armed: bool,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.cache
                .inner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .inflight
                .remove(&self.key);
            self.flight.finish(&Err(KeyError::new(
                KeyErrorKind::Unavailable,
                KmsOp::Decrypt,
                "-",
                "the fetching thread failed",
            )));
        }
    }
}

impl KeyCache {
    pub fn new(config: CacheConfig) -> std::io::Result<Self> {
        let lru = NonZeroUsize::new(config.max_entries).map(LruCache::new);
        Ok(KeyCache {
            inner: Mutex::new(Inner {
                lru,
                arena: LockedArena::new(config.max_entries)?,
                inflight: HashMap::new(),
                last_purge: Instant::now(),
            }),
            ttl: config.ttl,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            expirations: AtomicU64::new(0),
        })
    }

    /// The cached key for `key`, or the result of `fetch` (called at most once however many
    /// threads miss together), cached on success.
    pub fn get_or_fetch(
        &self,
        key: CacheKey,
        fetch: impl FnOnce() -> Result<DataKey, KeyError>,
    ) -> Result<DataKey, KeyError> {
        let flight = {
            let mut g = self.inner.lock().unwrap();
            let now = Instant::now();
            if now.duration_since(g.last_purge) >= self.ttl / 4 {
                let n = g.purge_expired(now);
                self.expirations.fetch_add(n, Ordering::Relaxed);
            }
            let inner = &mut *g;
            if let Some(lru) = inner.lru.as_mut() {
                match lru.get(&key) {
                    Some(e) if e.expires > now => {
                        let slot = e.slot;
                        self.hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(inner.arena.load(slot));
                    }
                    Some(_) => {
                        let e = lru.pop(&key).expect("present");
                        inner.arena.release(e.slot);
                        self.expirations.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {}
                }
            }
            if let Some(f) = inner.inflight.get(&key).cloned() {
                drop(g);
                self.coalesced.fetch_add(1, Ordering::Relaxed);
                return f.wait();
            }
            self.misses.fetch_add(1, Ordering::Relaxed);
            let f = Arc::new(Flight::default());
            inner.inflight.insert(key, f.clone());
            f
        };
        let mut guard = FlightGuard {
            cache: self,
            key,
            flight,
            armed: true,
        };
        let result = fetch();
        {
            let mut g = self.inner.lock().unwrap();
            g.inflight.remove(&key);
            if let Ok(dek) = &result {
                self.store(&mut g, key, dek);
            }
        }
        guard.flight.finish(&result);
        guard.armed = false;
        result
    }

    /// Caches a key obtained another way (a freshly generated one), so the next unwrap of the
    /// same wrapped key under the same context costs no call.
    pub fn insert(&self, key: CacheKey, dek: &DataKey) {
        let mut g = self.inner.lock().unwrap();
        self.store(&mut g, key, dek);
    }

    /// Puts `dek` in the cache under `key`, replacing an entry for the same key and evicting the
    /// least recently used one when full (its slot is zeroized).
    fn store(&self, inner: &mut Inner, key: CacheKey, dek: &DataKey) {
        let Some(lru) = inner.lru.as_mut() else {
            return;
        };
        if let Some(old) = lru.pop(&key) {
            inner.arena.release(old.slot);
        }
        if lru.len() == lru.cap().get() {
            if let Some((_, old)) = lru.pop_lru() {
                inner.arena.release(old.slot);
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        let slot = inner
            .arena
            .store(dek)
            .expect("the arena has a slot per entry");
        lru.put(
            key,
            Entry {
                slot,
                expires: Instant::now() + self.ttl,
            },
        );
    }

    /// Drops every expired entry now (the daemon calls this periodically).
    pub fn purge_expired(&self) {
        let n = self.inner.lock().unwrap().purge_expired(Instant::now());
        self.expirations.fetch_add(n, Ordering::Relaxed);
    }

    /// Drops and zeroizes every entry.
    pub fn clear(&self) {
        let mut g = self.inner.lock().unwrap();
        let inner = &mut *g;
        if let Some(lru) = inner.lru.as_mut() {
            while let Some((_, e)) = lru.pop_lru() {
                inner.arena.release(e.slot);
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        let g = self.inner.lock().unwrap();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            expirations: self.expirations.load(Ordering::Relaxed),
            entries: g.lru.as_ref().map_or(0, |l| l.len() as u64),
            locked: g.arena.is_locked(),
            excluded_from_dumps: g.arena.is_excluded_from_dumps(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::context::CanonicalPath;
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Barrier;

    fn key(n: u8, path: &str) -> CacheKey {
        let w = WrappedKey {
            key_id: "local:x".into(),
            blob: vec![n; 10],
        };
        let ctx = EncryptionContext::for_file(
            &[0; 16],
            &CanonicalPath::from_user(Path::new(path)).unwrap(),
            &BTreeMap::new(),
        );
        CacheKey::new(&w, &ctx)
    }

    fn dek(n: u8) -> Result<DataKey, KeyError> {
        Ok(DataKey::from_bytes(&[n; 32]))
    }

    #[test]
    fn keyed_by_wrapped_key_and_context() {
        assert_ne!(key(1, "a"), key(1, "b"));
        assert_ne!(key(1, "a"), key(2, "a"));
        assert_eq!(key(1, "a"), key(1, "a"));
    }

    #[test]
    fn hit_after_miss() {
        let c = KeyCache::new(CacheConfig::default()).unwrap();
        assert_eq!(
            c.get_or_fetch(key(1, "a"), || dek(1)).unwrap().expose(),
            &[1; 32]
        );
        let got = c
            .get_or_fetch(key(1, "a"), || panic!("must be cached"))
            .unwrap();
        assert_eq!(got.expose(), &[1; 32]);
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.entries), (1, 1, 1));
    }

    #[test]
    fn bounded_by_entry_count() {
        let c = KeyCache::new(CacheConfig {
            max_entries: 3,
            ttl: DEFAULT_TTL,
        })
        .unwrap();
        for i in 0..10u8 {
            c.get_or_fetch(key(i, "a"), || dek(i)).unwrap();
        }
        let s = c.stats();
        assert_eq!(s.entries, 3);
        assert_eq!(s.evictions, 7);
        // The oldest went first; the newest are still there.
        c.get_or_fetch(key(9, "a"), || panic!("recent entry evicted"))
            .unwrap();
        let mut fetched = false;
        c.get_or_fetch(key(0, "a"), || {
            fetched = true;
            dek(0)
        })
        .unwrap();
        assert!(fetched);
    }

    #[test]
    fn entries_expire() {
        let c = KeyCache::new(CacheConfig {
            max_entries: 10,
            ttl: Duration::from_millis(50),
        })
        .unwrap();
        c.get_or_fetch(key(1, "a"), || dek(1)).unwrap();
        std::thread::sleep(Duration::from_millis(80));
        c.purge_expired();
        assert_eq!(c.stats().entries, 0);
        let mut fetched = false;
        c.get_or_fetch(key(1, "a"), || {
            fetched = true;
            dek(1)
        })
        .unwrap();
        assert!(fetched);
    }

    #[test]
    fn errors_are_not_cached() {
        let c = KeyCache::new(CacheConfig::default()).unwrap();
        let err = KeyError::new(KeyErrorKind::Throttled, KmsOp::Decrypt, "k", "");
        assert!(c.get_or_fetch(key(1, "a"), || Err(err.clone())).is_err());
        assert!(c.get_or_fetch(key(1, "a"), || dek(1)).is_ok());
    }

    #[test]
    fn disabled_cache_fetches_every_time() {
        let c = KeyCache::new(CacheConfig {
            max_entries: 0,
            ttl: DEFAULT_TTL,
        })
        .unwrap();
        c.get_or_fetch(key(1, "a"), || dek(1)).unwrap();
        c.get_or_fetch(key(1, "a"), || dek(1)).unwrap();
        assert_eq!(c.stats().misses, 2);
    }

    #[test]
    fn concurrent_misses_share_one_fetch() {
        let c = Arc::new(KeyCache::new(CacheConfig::default()).unwrap());
        let fetches = Arc::new(AtomicU64::new(0));
        let barrier = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (c, fetches, barrier) = (c.clone(), fetches.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    c.get_or_fetch(key(7, "a"), || {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(100));
                        dek(7)
                    })
                    .unwrap()
                    .expose()
                    .to_vec()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), vec![7u8; 32]);
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        let s = c.stats();
        assert_eq!(s.misses, 1);
        assert_eq!(s.coalesced + s.hits, 7);
    }

    #[test]
    fn a_panicking_fetch_releases_waiters() {
        let c = Arc::new(KeyCache::new(CacheConfig::default()).unwrap());
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                c2.get_or_fetch(key(1, "a"), || panic!("provider bug"))
            }));
        });
        t.join().unwrap();
        // The flight is gone; a new fetch proceeds.
        assert!(c.get_or_fetch(key(1, "a"), || dek(1)).is_ok());
    }
}
